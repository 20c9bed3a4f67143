"""Metrics: what a localisation method measures, and which logits it needs to measure it.

Every attribution method (`exact_patching`, `attribution_patching`, `atp_star`,
`integrated_gradients`, `relp`, and the SAE circuit tools in `interp.saes.circuits`) takes a
*metric*: a function of the model's logits with one value per prompt, whose mean over the
prompts the method explains. Any object that follows the `Metric` protocol works with every
method, and so does a plain function of the full logits (wrapped in `CallableMetric`).

**Why a metric declares what it reads.** Exact patching runs thousands of patched forward
passes, and past the patched layer most of their cost is the unembedding of every position
into the whole vocabulary. A metric says where it reads (`end_pos`: each prompt's prediction
position) and which vocabulary columns (`columns`), so a method computes only
`ln_final(resid[end_pos]) @ W_U[:, columns]` (`final_columns`). Three kinds of metric:

| kind | `columns` | `reads_all_positions` | logits a method computes | shipped |
|---|---|---|---|---|
| a few columns | `[batch, k]` ids | False | k columns at each prediction position | `LogitDiff`, `LogSumExpDiff` |
| every column | None | False | the whole vocabulary at each prediction position | `LogProb`, `Prob`, `RefusalScore`, `KLToClean` |
| a function | None | True | the whole vocabulary at *every* position | `CallableMetric` (any plain function) |

A method never computes the logits at positions other than the prediction positions, except
for a plain function, which may read any position (the slow fallback: `[batch, pos, d_vocab]`
logits per patched run, about `n_pos` times the unembedding work of a full-vocabulary metric
and `n_pos * d_vocab / k` times that of a column metric).

**Rows.** Methods evaluate many patched copies of one batch at once. `from_columns`,
`at_end`, `from_final_resid` and `__call__` accept `rows = copies * batch` rows stacked as
`(copies batch)`: row `r` belongs to prompt `r % batch`.

**Binding.** A token set shared by all prompts does not say how many prompts there are. Every
method calls `metric.for_batch(n_prompts, d_vocab)` first (`as_metric` does it, and wraps
plain functions): that checks the metric has one entry per prompt and token ids inside the
vocabulary (a clear `ValueError` otherwise) and fixes the batch size of shared metrics.

**Normalisation.** With `clean` and `corrupt` set (the mean metric of the clean and corrupt
runs, from `normalised`), every metric reports `(m - corrupt) / (clean - corrupt)`: 1 on the
clean run, 0 on the corrupt run on average over prompts, as in the IOI patching literature.

**Padding.** Prompts of different lengths are right-padded to one batch and `end_pos` says where
each prompt's prediction is read. With causal attention the padding after a prompt's end cannot
change anything at or before it, so every method gives the same numbers as it would on the
prompts one by one (a plain function must itself read each prompt where it ends).

**Writing a metric.** Subclass `MetricBase` and implement `raw_from_columns` (the metric per
row from the logits at `columns`, or from the whole vocabulary when `columns` is None), the
columns (`_base_columns`), and which attributes are per prompt (`_per_prompt`); the base class
provides end positions, rows, selection, devices, binding and normalisation. Or pass a function.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Protocol, Sequence, Union, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

__all__ = [
    "CallableMetric",
    "KLToClean",
    "LogProb",
    "LogSumExpDiff",
    "LogitDiff",
    "Metric",
    "MetricBase",
    "MetricFn",
    "MetricLike",
    "Prob",
    "RefusalScore",
    "as_metric",
    "final_columns",
    "final_logits",
]

#: Rows of a metric to keep: a slice, indices, or an index tensor (repeats allowed).
Rows = Union[slice, Sequence[int], Tensor]

#: A plain metric function: full logits `[batch, pos, d_vocab]` -> `[batch]` or a scalar.
MetricFn = Callable[..., Tensor]

#: One token set shared by all prompts (an id, ids, a 1-D tensor) or one set per prompt (a list
#: of id lists, which may differ in length, or a 2-D tensor).
TokenSets = Union[int, Sequence[int], Sequence[Sequence[int]], Int[Tensor, ""], Int[Tensor, " k"],
                  Int[Tensor, "n_sets k"]]

#: Bytes of full-vocabulary logits one call of `from_final_resid` materialises at most (rows are
#: processed in chunks of whole copies of the batch beyond that).
LOGIT_CHUNK_BYTES = 2**28


@runtime_checkable
class Metric(Protocol):
    """What every attribution method uses of a metric. `MetricBase` implements all of it.

    Attributes:
        end_pos: `[batch]` each prompt's prediction position (None: the last position).
        reads_all_positions: True for metrics that need the full logits at every position (a
            plain function); methods then take the slow path (see the module notes).
        columns: `[batch, k]` the vocabulary ids read at each prompt's prediction position, or
            None for all `d_vocab` columns (then `from_columns` receives full logits).
    """

    end_pos: Int[Tensor, " batch"] | None
    reads_all_positions: bool

    @property
    def columns(self) -> Int[Tensor, "batch k"] | None: ...

    def __len__(self) -> int:
        """The number of prompts."""
        ...

    def positions(self, n_pos: int) -> Int[Tensor, " batch"]:
        """Each prompt's prediction position in a batch of `n_pos` positions."""
        ...

    def at_end(self, x: Tensor) -> Tensor:
        """`x [rows, pos, ...]` read at each row's prediction position: `[rows, ...]`."""
        ...

    def from_columns(self, cols: Tensor) -> Tensor:
        """The metric per row (normalised if set) from the logits at `columns` (`[rows, k]`,
        or `[rows, d_vocab]` when `columns` is None), rows `(copies batch)`."""
        ...

    def __call__(self, logits: Tensor) -> Tensor:
        """The metric per row (differentiable) from full logits `[rows, pos, d_vocab]`."""
        ...

    def from_final_resid(self, model: HookedTransformer, resid: Tensor) -> Tensor:
        """The metric per row from the final residual stream `[rows, d_model]` (before
        `ln_final`) at each row's prediction position."""
        ...

    def on_model(self, model: HookedTransformer, tokens: Tensor) -> Tensor:
        """The metric per prompt of `model` run on `tokens` (differentiable)."""
        ...

    def select(self, rows: Rows) -> Metric:
        """The metric for the prompts `rows` (repeats allowed), on the same normalisation."""
        ...

    def for_batch(self, n_prompts: int, d_vocab: int | None = None) -> Metric:
        """This metric checked for (and bound to) a batch of `n_prompts` prompts and a model
        with `d_vocab` tokens; a clear `ValueError` if it does not fit."""
        ...

    def normalised(self, model: HookedTransformer, clean_tokens: Tensor, corrupt_tokens: Tensor,
                   batch_size: int = 64) -> Metric:
        """A copy normalised by this model's mean metric on the clean and corrupt tokens."""
        ...

    def to(self, device: str | torch.device) -> Metric:
        """A copy with its tensors on `device`."""
        ...


#: What a method accepts as its metric: a `Metric`, or a plain function of the full logits.
MetricLike = Union[Metric, MetricFn]


def as_metric(metric: MetricLike, n_prompts: int | None = None, d_vocab: int | None = None) -> Metric:
    """`metric` as a `Metric` (a plain function is wrapped in `CallableMetric`), checked for
    (and bound to) `n_prompts` prompts and a vocabulary of `d_vocab` tokens when given."""
    if isinstance(metric, Metric):
        out = metric
    elif callable(metric):
        out = CallableMetric(metric)
    else:
        raise ValueError(
            f"metric must be a Metric (LogitDiff, LogProb, LogSumExpDiff, RefusalScore, "
            f"KLToClean, ...) or a function of the logits [batch, pos, d_vocab] -> [batch]; "
            f"got {type(metric).__name__}"
        )
    return out.for_batch(n_prompts, d_vocab) if n_prompts is not None else out


class MetricBase:
    """The shared machinery of metrics: end positions, rows, selection, devices, binding and
    normalisation `(m - corrupt) / (clean - corrupt)`.

    A subclass sets `end_pos`, `clean` and `corrupt` (and `n_prompts` if it can be shared by
    all prompts), and implements `raw_from_columns` plus, where they differ from the defaults,
    `_base_columns` (None: every column), `_per_prompt` (attributes whose first axis is the
    prompt) and `_token_ids` (ids checked against the vocabulary). Dataclass subclasses are
    copied with `dataclasses.replace`, others with `copy.copy`.
    """

    reads_all_positions: ClassVar[bool] = False
    #: What the metric measures, plural, for messages.
    quantity: ClassVar[str] = "metric values"

    end_pos: Int[Tensor, " batch"] | None
    clean: float | None
    corrupt: float | None

    # -- what a subclass provides ------------------------------------------------------------

    def raw_from_columns(self, cols: Float[Tensor, "rows k"]) -> Float[Tensor, " rows"]:
        """The metric per row before normalisation from the logits at `columns` (or from the
        whole vocabulary when `columns` is None); rows may repeat the batch."""
        raise NotImplementedError

    def _base_columns(self) -> Int[Tensor, "n k"] | None:
        """The columns read, one row per prompt or one row shared by all (None: every column)."""
        return None

    def _per_prompt(self) -> tuple[str, ...]:
        """Attributes holding per-prompt tensors (first axis = prompt); None values are skipped."""
        return ("end_pos",)

    def _token_ids(self) -> list[tuple[str, Tensor]]:
        """(name, ids) of every token-id tensor, checked against the vocabulary."""
        return []

    def _check_vocab(self, d_vocab: int) -> None:
        for name, ids in self._token_ids():
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= d_vocab):
                raise ValueError(
                    f"{type(self).__name__}: {name} must be token ids in [0, {d_vocab}) (this "
                    f"model's vocabulary); got ids from {int(ids.min())} to {int(ids.max())}"
                )

    # -- sizes and rows -----------------------------------------------------------------------

    def _n_prompts(self) -> int | None:
        sizes = self._sizes()
        if sizes:
            return next(iter(sizes.values()))
        return getattr(self, "n_prompts", None)

    def _sizes(self) -> dict[str, int]:
        sizes = {name: getattr(self, name).shape[0] for name in self._per_prompt()
                 if getattr(self, name, None) is not None}
        if getattr(self, "n_prompts", None) is not None:
            sizes["n_prompts"] = self.n_prompts
        return sizes

    def _check_sizes(self) -> None:
        """Every per-prompt attribute (and `n_prompts`) agrees on the number of prompts."""
        sizes = self._sizes()
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{k} {v}" for k, v in sizes.items())
            raise ValueError(f"{type(self).__name__}: the per-prompt inputs disagree on the number "
                             f"of prompts ({detail}); give one entry per prompt")

    def __len__(self) -> int:
        n = self._n_prompts()
        if n is None:
            raise ValueError(
                f"this {type(self).__name__} is not bound to a batch (it is shared by all "
                "prompts): call metric.for_batch(n_prompts) first (every attribution method does)"
            )
        return n

    def _expand_rows(self, t: Tensor, rows: int) -> Tensor:
        """A per-prompt (or shared, one-row) tensor for `rows = copies * batch` rows."""
        n = t.shape[0]
        if n == rows:
            return t
        if n == 1:
            return t.expand(rows, *t.shape[1:])
        if n and rows % n == 0:
            return t.repeat(rows // n, *([1] * (t.ndim - 1)))
        raise ValueError(
            f"{type(self).__name__} holds {n} prompts but got {rows} rows: rows must be the "
            "batch or whole copies of it stacked as (copies batch)"
        )

    @property
    def columns(self) -> Int[Tensor, "batch k"] | None:
        """`[batch, k]` the vocabulary ids read per prompt (one shared row while a shared
        metric is not bound to a batch), or None for every column."""
        cols = self._base_columns()
        n = self._n_prompts()
        return cols if cols is None or n is None else self._expand_rows(cols, n)

    def positions(self, n_pos: int) -> Int[Tensor, " batch"]:
        """Each prompt's prediction position in a batch of `n_pos` positions."""
        if self.end_pos is None:
            return torch.full((len(self),), n_pos - 1, dtype=torch.long)
        if int(self.end_pos.max()) >= n_pos or int(self.end_pos.min()) < 0:
            raise ValueError(
                f"end_pos ranges over {int(self.end_pos.min())}..{int(self.end_pos.max())} but "
                f"the tokens have {n_pos} positions"
            )
        return self.end_pos.long().cpu()

    def at_end(self, x: Float[Tensor, "rows pos *rest"]) -> Float[Tensor, " rows *rest"]:
        """`x` read at each row's prediction position (`x` has one row per prompt, or a whole
        number of copies of the batch stacked as `(copies batch)`)."""
        if self.end_pos is None:
            return x[:, -1]
        pos = self._expand_rows(self.positions(x.shape[1]).to(x.device), x.shape[0])
        return x[torch.arange(x.shape[0], device=x.device), pos]

    # -- values -------------------------------------------------------------------------------

    def _normalise(self, value: Tensor) -> Tensor:
        if self.clean is None or self.corrupt is None:
            return value
        return (value - self.corrupt) / (self.clean - self.corrupt)

    def from_columns(self, cols: Float[Tensor, "rows k"]) -> Float[Tensor, " rows"]:
        """The metric per row from the logits at `columns` (rows may repeat the batch)."""
        return self._normalise(self.raw_from_columns(cols))

    def __call__(
        self, logits: Float[Tensor, "rows pos vocab"] | Float[Tensor, "rows vocab"]
    ) -> Float[Tensor, " rows"]:
        """The metric per row (differentiable) from full logits, or from logits already taken
        at each prompt's prediction position (2-D)."""
        if logits.ndim not in (2, 3):
            raise ValueError(f"logits must be [batch, pos, d_vocab] or [batch, d_vocab], got "
                             f"{tuple(logits.shape)}")
        self._check_vocab(logits.shape[-1])
        at_end = logits if logits.ndim == 2 else self.at_end(logits)
        cols = self._base_columns()
        if cols is None:
            return self.from_columns(at_end)
        cols = self._expand_rows(cols, at_end.shape[0]).to(logits.device)
        return self.from_columns(at_end.gather(-1, cols))

    def from_final_resid(
        self, model: HookedTransformer, resid: Float[Tensor, "rows d_model"]
    ) -> Float[Tensor, " rows"]:
        """The metric from the final residual stream (before `ln_final`) at each row's
        prediction position, computing only the logits it reads: the `columns`
        (`final_columns`), or the whole vocabulary (`final_logits`, in chunks of whole copies
        of the batch of at most `LOGIT_CHUNK_BYTES`)."""
        cols = self._base_columns()
        if cols is not None:
            return self.from_columns(final_columns(model, resid, self._expand_rows(cols, resid.shape[0])))
        rows = resid.shape[0]
        n = self._n_prompts() or 1
        copies = max(1, LOGIT_CHUNK_BYTES // max(1, n * model.cfg.d_vocab * resid.element_size()))
        step = n * copies
        if step >= rows:
            return self.from_columns(final_logits(model, resid))
        return torch.cat([self.from_columns(final_logits(model, resid[lo:lo + step]))
                          for lo in range(0, rows, step)])

    def on_model(self, model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
        """The metric of `model` run on `tokens` (differentiable), computing only the logits it
        reads: the forward pass stops at the final residual stream, then `ln_final` and the
        needed unembedding columns at each prediction position. The same numbers as
        `self(model(tokens))` without the `[batch, pos, d_vocab]` logits (1 GB for a batch of
        50 prompts on Gemma's 262k vocabulary)."""
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        return self.from_final_resid(model, self.at_end(resid))

    # -- copies -------------------------------------------------------------------------------

    def _with(self, **changes: Any) -> Any:
        if dataclasses.is_dataclass(self):
            return replace(self, **changes)
        new = copy.copy(self)
        new.__dict__.update(changes)
        return new

    def select(self, rows: Rows) -> Any:
        """The metric for a subset of the prompts (repeats allowed), on the whole batch's
        normalisation scale."""
        if self._n_prompts() is None:
            return self  # shared by all prompts: nothing to select
        index = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows)
        index = index.long().reshape(-1)
        changes: dict[str, Any] = {}
        for name in self._per_prompt():
            value = getattr(self, name, None)
            if value is not None:
                changes[name] = value[index.to(value.device)]
        if getattr(self, "n_prompts", None) is not None:
            changes["n_prompts"] = len(index)
        return self._with(**changes)

    def for_batch(self, n_prompts: int, d_vocab: int | None = None) -> Any:
        """This metric for a batch of `n_prompts` prompts of a model with `d_vocab` tokens:
        checks it has one entry per prompt and its token ids are in the vocabulary, and binds a
        metric shared by all prompts to the batch size."""
        have = self._n_prompts()
        if have is not None and have != n_prompts:
            raise ValueError(
                f"the metric ({type(self).__name__}) has answers for {have} prompts but the batch "
                f"has {n_prompts}: build it for these prompts, or take its rows with "
                "metric.select(...)"
            )
        if d_vocab is not None:
            self._check_vocab(d_vocab)
        if have is None and hasattr(self, "n_prompts"):
            return self._with(n_prompts=n_prompts)
        return self

    def _mean_on(self, model: HookedTransformer, tokens: Tensor, batch_size: int) -> float:
        """The mean metric over `tokens`, in batches of `batch_size` (no gradient)."""
        values = []
        for lo in range(0, tokens.shape[0], batch_size):
            part = self.select(slice(lo, lo + batch_size))
            values.append(part.on_model(model, tokens[lo:lo + batch_size].to(model.cfg.device)))
        return torch.cat(values).float().mean().item()

    def normalised(self, model: HookedTransformer, clean_tokens: Tensor,
                   corrupt_tokens: Tensor, batch_size: int = 64) -> Any:
        """A copy normalised by this model's mean metric on the clean and the corrupt tokens
        (run in batches of `batch_size`, computing only the logits the metric reads)."""
        if clean_tokens.shape[0] != corrupt_tokens.shape[0]:
            raise ValueError(f"clean and corrupt tokens must have the same number of prompts; got "
                             f"{clean_tokens.shape[0]} and {corrupt_tokens.shape[0]}")
        raw = self.for_batch(clean_tokens.shape[0], model.cfg.d_vocab)._with(clean=None, corrupt=None)
        with torch.no_grad():
            clean, corrupt = (raw._mean_on(model, t, batch_size) for t in (clean_tokens, corrupt_tokens))
        if abs(clean - corrupt) < 1e-6:
            raise ValueError(
                f"clean and corrupt {self.quantity} are equal ({clean:.4g}): the corruption "
                "does not change the metric, so it cannot be normalised"
            )
        return raw._with(clean=clean, corrupt=corrupt)

    def to(self, device: str | torch.device) -> Any:
        """A copy with every tensor on `device`."""
        return self._with(**{k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)})

    def fingerprint_parts(self) -> dict[str, Any]:
        """What the metric's values depend on, field by field (for checkpoint fingerprints)."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dict(vars(self))

    def __repr__(self) -> str:  # dataclass subclasses have their own
        def show(v: Any) -> str:
            return f"tensor{tuple(v.shape)}" if isinstance(v, Tensor) else repr(v)
        fields = ", ".join(f"{k}={show(v)}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# ----------------------------------------------------------------------------------------------
# Logit difference
# ----------------------------------------------------------------------------------------------


@dataclass
class LogitDiff(MetricBase):
    """`logit[answer] - logit[wrong]` at each prompt's prediction position, optionally normalised.

    Reads two columns per prompt. With `clean` and `corrupt` set (the mean logit differences of
    the clean and corrupt runs), the value is `(ld - corrupt) / (clean - corrupt)`.

    Attributes:
        answer_ids: `[batch]` the correct next token of each clean prompt.
        wrong_ids: `[batch]` the competing token.
        clean, corrupt: baselines for normalisation (None: no normalisation).
        end_pos: `[batch]` the position whose logits are read (None: the last position).
    """

    quantity: ClassVar[str] = "logit differences"

    answer_ids: Int[Tensor, " batch"]
    wrong_ids: Int[Tensor, " batch"]
    clean: float | None = None
    corrupt: float | None = None
    end_pos: Int[Tensor, " batch"] | None = None

    def __post_init__(self) -> None:
        if self.answer_ids.shape != self.wrong_ids.shape or self.answer_ids.ndim != 1:
            raise ValueError(
                f"answer_ids {tuple(self.answer_ids.shape)} and wrong_ids "
                f"{tuple(self.wrong_ids.shape)} must be 1-D with one token per prompt"
            )
        if self.end_pos is not None and self.end_pos.shape != self.answer_ids.shape:
            raise ValueError(
                f"end_pos {tuple(self.end_pos.shape)} must have one position per prompt "
                f"({self.answer_ids.shape[0]})"
            )

    def _base_columns(self) -> Int[Tensor, "batch 2"]:
        return torch.stack([self.answer_ids, self.wrong_ids], dim=-1)

    def _per_prompt(self) -> tuple[str, ...]:
        return ("answer_ids", "wrong_ids", "end_pos")

    def _token_ids(self) -> list[tuple[str, Tensor]]:
        return [("answer_ids", self.answer_ids), ("wrong_ids", self.wrong_ids)]

    def raw_from_columns(self, cols: Float[Tensor, "rows 2"]) -> Float[Tensor, " rows"]:
        return cols[..., 0] - cols[..., 1]


# ----------------------------------------------------------------------------------------------
# Token sets
# ----------------------------------------------------------------------------------------------


def _token_sets(tokens: Any, what: str) -> tuple[Tensor, Tensor, bool]:
    """`(ids [n, k], mask [n, k], per_prompt)` from one shared token set (`n = 1`) or one set
    per prompt. Duplicates within a set count once; shorter sets are padded with their own
    first id, masked out."""
    if isinstance(tokens, Tensor):
        if tokens.numel() == 0:
            raise ValueError(f"{what}: the token set is empty; give at least one token id")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"{what}: token ids must be integers, got a {tokens.dtype} tensor")
        if tokens.ndim > 2:
            raise ValueError(f"{what}: tokens must be one set [k] or one set per prompt [batch, k], "
                             f"got shape {tuple(tokens.shape)}")
        per_prompt = tokens.ndim == 2
        sets = tokens.tolist() if per_prompt else [tokens.reshape(-1).tolist()]
    else:
        try:
            sets, per_prompt = [[operator.index(tokens)]], False
        except TypeError:
            items = list(tokens)
            try:
                sets, per_prompt = [[operator.index(t) for t in items]], False
            except TypeError:
                try:
                    sets = [[operator.index(t) for t in s] for s in items]
                except TypeError:
                    raise ValueError(f"{what}: tokens must be token ids (an int, a list of ints, a "
                                     "tensor) or one list of ids per prompt") from None
                per_prompt = True
    if not sets:
        raise ValueError(f"{what}: no token sets given (one set, or one per prompt)")
    for i, s in enumerate(sets):
        where = f" of prompt {i}" if per_prompt else ""
        if not s:
            raise ValueError(f"{what}: the token set{where} is empty; give at least one token id")
        if min(s) < 0:
            raise ValueError(f"{what}: token ids must be >= 0, got {min(s)} in the set{where}")
    sets = [list(dict.fromkeys(s)) for s in sets]
    k = max(len(s) for s in sets)
    ids = torch.tensor([s + [s[0]] * (k - len(s)) for s in sets], dtype=torch.long)
    mask = torch.tensor([[True] * len(s) + [False] * (k - len(s)) for s in sets])
    return ids, mask, per_prompt


def _set_logsumexp(logits: Float[Tensor, "rows vocab"], ids: Tensor, mask: Tensor) -> Float[Tensor, " rows"]:
    """`logsumexp` of each row's logits over its token set (`ids` masked by `mask`)."""
    picked = logits.gather(-1, ids.to(logits.device))
    return picked.masked_fill(~mask.to(logits.device), float("-inf")).logsumexp(-1)


class _TokenSetMetric(MetricBase):
    """A metric of one token set per prompt (or one shared set) read at the prediction
    position over the whole vocabulary."""

    def __init__(
        self,
        tokens: TokenSets,
        end_pos: Int[Tensor, " batch"] | None = None,
        clean: float | None = None,
        corrupt: float | None = None,
        n_prompts: int | None = None,
    ) -> None:
        self.ids, self.mask, self.per_prompt = _token_sets(tokens, type(self).__name__)
        self.end_pos, self.clean, self.corrupt, self.n_prompts = end_pos, clean, corrupt, n_prompts
        if end_pos is not None and end_pos.ndim != 1:
            raise ValueError(f"end_pos must be 1-D with one position per prompt, got shape "
                             f"{tuple(end_pos.shape)}")
        self._check_sizes()

    def _per_prompt(self) -> tuple[str, ...]:
        return (("ids", "mask") if self.per_prompt else ()) + ("end_pos",)

    def _token_ids(self) -> list[tuple[str, Tensor]]:
        return [("tokens", self.ids)]

    def _set_lse(self, logits: Tensor) -> Tensor:
        rows = logits.shape[0]
        return _set_logsumexp(logits, self._expand_rows(self.ids, rows), self._expand_rows(self.mask, rows))


class LogProb(_TokenSetMetric):
    """`log p(S) = log sum_{t in S} softmax(logits)[t]` at each prompt's prediction position.

    The log-probability that the next token is in the set `S` (e.g. `[" Paris", "Paris"]`).
    Its normaliser (the softmax denominator) needs every logit, so this metric reads all
    columns (`columns` None): methods compute the full vocabulary at the prediction positions
    (not at other positions).

    Args:
        tokens: one set shared by all prompts (an id, a list of ids, a 1-D tensor), or one set
            per prompt (a list of id lists, lengths may differ, or a `[batch, k]` tensor).
            Duplicates count once.
        end_pos: `[batch]` each prompt's prediction position (None: the last position).
        clean, corrupt: normalisation baselines (see `normalised`).
        n_prompts: the batch size of a shared set (set by methods through `for_batch`).
    """

    quantity: ClassVar[str] = "log-probabilities"

    def raw_from_columns(self, cols: Float[Tensor, "rows vocab"]) -> Float[Tensor, " rows"]:
        return self._set_lse(cols) - cols.logsumexp(-1)


class Prob(LogProb):
    """`p(S) = sum_{t in S} softmax(logits)[t]` at each prompt's prediction position; arguments
    as in `LogProb` (all columns, for the softmax denominator)."""

    quantity: ClassVar[str] = "probabilities"

    def raw_from_columns(self, cols: Float[Tensor, "rows vocab"]) -> Float[Tensor, " rows"]:
        return super().raw_from_columns(cols).exp()


class RefusalScore(_TokenSetMetric):
    """Arditi et al.'s refusal score: `log p(R) - log(1 - p(R))`, the log-odds that the next
    token is in the refusal set `R`, at each prompt's prediction position.

    Computed stably as `logsumexp(logits[R]) - logsumexp(logits[not R])`, the same quantity as
    `interp.concepts.refusal.refusal_log_odds` (whose `refusal_token_ids(model)` gives the usual
    set). Reads all columns (the complement is the rest of the vocabulary). Arguments as in
    `LogProb`: `tokens` is the refusal set (shared, or one per prompt).
    """

    quantity: ClassVar[str] = "refusal scores"

    def raw_from_columns(self, cols: Float[Tensor, "rows vocab"]) -> Float[Tensor, " rows"]:
        ids = self._expand_rows(self.ids, cols.shape[0]).to(cols.device)
        rest = cols.scatter(-1, ids, float("-inf"))  # padded ids are members: still excluded
        return self._set_lse(cols) - rest.logsumexp(-1)


class LogSumExpDiff(MetricBase):
    """`logsumexp(logits[P]) - logsumexp(logits[N])` at each prompt's prediction position.

    The log-odds of the positive set against the negative set (e.g. `[" Yes", "Yes"]` against
    `[" No", "No"]`), `log p(P) - log p(N)`: the softmax denominator cancels, so only the
    columns of the two sets are read (`columns` `[batch, |P| + |N|]`), like `LogitDiff`; with
    one token in each set it is the logit difference.

    Args:
        positive, negative: token sets, each one shared by all prompts or one per prompt (as
            `tokens` in `LogProb`); a token may not be in both.
        end_pos, clean, corrupt, n_prompts: as in `LogProb`.
    """

    quantity: ClassVar[str] = "log-odds"

    def __init__(
        self,
        positive: TokenSets,
        negative: TokenSets,
        end_pos: Int[Tensor, " batch"] | None = None,
        clean: float | None = None,
        corrupt: float | None = None,
        n_prompts: int | None = None,
    ) -> None:
        name = type(self).__name__
        pos_ids, pos_mask, pos_per = _token_sets(positive, f"{name} (positive)")
        neg_ids, neg_mask, neg_per = _token_sets(negative, f"{name} (negative)")
        self.per_prompt = pos_per or neg_per
        if self.per_prompt:  # one set per prompt on both sides
            n = pos_ids.shape[0] if pos_per else neg_ids.shape[0]
            if pos_per and neg_per and pos_ids.shape[0] != neg_ids.shape[0]:
                raise ValueError(f"{name}: {pos_ids.shape[0]} positive and {neg_ids.shape[0]} "
                                 "negative token sets; give one of each per prompt (or one shared)")
            pos_ids, pos_mask = pos_ids.expand(n, -1).clone(), pos_mask.expand(n, -1).clone()
            neg_ids, neg_mask = neg_ids.expand(n, -1).clone(), neg_mask.expand(n, -1).clone()
        for i in range(pos_ids.shape[0]):
            both = set(pos_ids[i][pos_mask[i]].tolist()) & set(neg_ids[i][neg_mask[i]].tolist())
            if both:
                where = f" of prompt {i}" if self.per_prompt else ""
                raise ValueError(f"{name}: token ids {sorted(both)} are in both the positive and "
                                 f"the negative set{where}")
        self.n_positive = pos_ids.shape[1]
        self.ids = torch.cat([pos_ids, neg_ids], dim=-1)
        self.mask = torch.cat([pos_mask, neg_mask], dim=-1)
        self.end_pos, self.clean, self.corrupt, self.n_prompts = end_pos, clean, corrupt, n_prompts
        if end_pos is not None and end_pos.ndim != 1:
            raise ValueError(f"end_pos must be 1-D with one position per prompt, got shape "
                             f"{tuple(end_pos.shape)}")
        self._check_sizes()

    def _base_columns(self) -> Int[Tensor, "n k"]:
        return self.ids

    def _per_prompt(self) -> tuple[str, ...]:
        return (("ids", "mask") if self.per_prompt else ()) + ("end_pos",)

    def _token_ids(self) -> list[tuple[str, Tensor]]:
        return [("positive and negative tokens", self.ids)]

    def raw_from_columns(self, cols: Float[Tensor, "rows k"]) -> Float[Tensor, " rows"]:
        mask = self._expand_rows(self.mask, cols.shape[0]).to(cols.device)
        kp = self.n_positive
        lse = [c.masked_fill(~m, float("-inf")).logsumexp(-1)
               for c, m in ((cols[:, :kp], mask[:, :kp]), (cols[:, kp:], mask[:, kp:]))]
        return lse[0] - lse[1]


# ----------------------------------------------------------------------------------------------
# KL divergence to the clean run
# ----------------------------------------------------------------------------------------------


class KLToClean(MetricBase):
    """`KL(clean || run)`: the KL divergence (nats) of a run's next-token distribution from the
    clean run's, at each prompt's prediction position.

    `sum_t p_clean(t) (log p_clean(t) - log p_run(t))`: 0 on the clean run, larger the further
    a run's prediction moves from it. Reads all columns. Sign convention: methods report
    `metric(patched) - metric(target)`, so a site's score is how much patching it moves the
    prediction *away* from the clean one: with `direction="noise"` (corrupt values into the clean
    run, target KL 0) important sites score positive; with `"denoise"` (clean values into the
    corrupt run) a site that restores the clean prediction scores negative. Normalised, the
    value is `1 - KL / KL_corrupt` on average (1 on the clean run, 0 on the corrupt run).

    Args:
        clean_logits: `[batch, d_vocab]` the clean run's logits at each prediction position
            (or use `KLToClean.from_model(model, clean_tokens)`). Only their log-softmax is kept.
        end_pos, clean, corrupt: as in `LogitDiff`.
    """

    quantity: ClassVar[str] = "KL divergences"

    def __init__(
        self,
        clean_logits: Float[Tensor, "n_clean vocab"],
        end_pos: Int[Tensor, " batch"] | None = None,
        clean: float | None = None,
        corrupt: float | None = None,
    ) -> None:
        if clean_logits.ndim != 2:
            raise ValueError(f"KLToClean: clean_logits must be [batch, d_vocab] (each prompt's "
                             f"logits at its prediction position), got {tuple(clean_logits.shape)}")
        self.clean_logprobs = clean_logits.detach().log_softmax(-1)
        self.end_pos, self.clean, self.corrupt = end_pos, clean, corrupt
        self._check_sizes()

    @classmethod
    def from_model(
        cls,
        model: HookedTransformer,
        clean_tokens: Int[Tensor, "batch pos"],
        end_pos: Int[Tensor, " batch"] | None = None,
        batch_size: int = 64,
    ) -> KLToClean:
        """The metric with `model`'s clean logits at each prediction position (no gradient;
        the full vocabulary at those positions only, in batches of `batch_size`)."""
        n = clean_tokens.shape[0]
        pos = torch.full((n,), clean_tokens.shape[1] - 1) if end_pos is None else end_pos.long().cpu()
        if int(pos.max()) >= clean_tokens.shape[1] or int(pos.min()) < 0:
            raise ValueError(f"end_pos ranges over {int(pos.min())}..{int(pos.max())} but the "
                             f"tokens have {clean_tokens.shape[1]} positions")
        out = []
        with torch.no_grad():
            for lo in range(0, n, batch_size):
                tokens = clean_tokens[lo:lo + batch_size].to(model.cfg.device)
                resid = model(tokens, stop_at_layer=model.cfg.n_layers)
                rows = torch.arange(tokens.shape[0], device=resid.device)
                out.append(final_logits(model, resid[rows, pos[lo:lo + batch_size].to(resid.device)]))
        return cls(torch.cat(out), end_pos=end_pos)

    def _per_prompt(self) -> tuple[str, ...]:
        return ("clean_logprobs", "end_pos")

    def _check_vocab(self, d_vocab: int) -> None:
        if self.clean_logprobs.shape[-1] != d_vocab:
            raise ValueError(f"KLToClean: the clean logits have {self.clean_logprobs.shape[-1]} "
                             f"columns but the model's vocabulary has {d_vocab} tokens")

    def raw_from_columns(self, cols: Float[Tensor, "rows vocab"]) -> Float[Tensor, " rows"]:
        ref = self._expand_rows(self.clean_logprobs, cols.shape[0]).to(cols.device, cols.dtype)
        terms = ref.exp() * (ref - cols.log_softmax(-1))
        return torch.where(ref > float("-inf"), terms, torch.zeros_like(terms)).sum(-1)


# ----------------------------------------------------------------------------------------------
# Plain functions
# ----------------------------------------------------------------------------------------------


class CallableMetric(MetricBase):
    """Any function of the full logits as a metric: `fn(logits [batch, pos, d_vocab])` returns
    one value per prompt (`[batch]`) or a scalar (taken as the batch mean, like
    TransformerLens's patching metrics; every prompt then gets that value).

    The slow fallback: the function may read any position and column, so methods compute the
    full logits at every position. Gradient methods (AtP, AtP*, IG, RelP) run one ordinary
    forward pass to the logits; exact patching unembeds every position of every patched run
    into the whole vocabulary (one batch of patched runs at a time, the target run's logits
    reused for the positions before the patch), and calls `fn` once per patched copy of the
    batch. Write a `MetricBase` subclass instead where speed matters.

    The function is defined on its whole batch, so the metric cannot be restricted to a subset
    of the prompts (`select` accepts only whole copies of the batch, as the IG activation path
    uses). Methods wrap a bare function in this class themselves.

    Args:
        fn: `logits [batch, pos, d_vocab] -> [batch]` or a scalar tensor (differentiable for
            gradient methods).
        n_prompts: the batch size (set by methods through `for_batch`).
        name: a stable name of the function for checkpoint fingerprints (default: its repr,
            which names its address, so a checkpoint resumes only in the same process; giving a
            name promises that the same name always means the same function and data).
        clean, corrupt: normalisation baselines (see `normalised`).
    """

    reads_all_positions: ClassVar[bool] = True

    def __init__(
        self,
        fn: MetricFn,
        n_prompts: int | None = None,
        name: str | None = None,
        clean: float | None = None,
        corrupt: float | None = None,
    ) -> None:
        if not callable(fn):
            raise ValueError(f"CallableMetric needs a function of the logits, got {type(fn).__name__}")
        self.fn, self.n_prompts, self.name = fn, n_prompts, name
        self.clean, self.corrupt = clean, corrupt
        self.end_pos = None
        self.copies = 1

    def _per_prompt(self) -> tuple[str, ...]:
        return ()

    def _n_prompts(self) -> int | None:
        return None if self.n_prompts is None else self.n_prompts * self.copies

    def for_batch(self, n_prompts: int, d_vocab: int | None = None) -> CallableMetric:
        if self.n_prompts is None:
            return self._with(n_prompts=n_prompts)
        return super().for_batch(n_prompts, d_vocab)

    def raw_from_columns(self, cols: Tensor) -> Tensor:
        raise ValueError("a CallableMetric reads the full logits at every position and has no "
                         "column form: call it on logits [batch, pos, d_vocab]")

    def from_final_resid(self, model: HookedTransformer, resid: Tensor) -> Tensor:
        raise ValueError("a CallableMetric reads the full logits at every position, not only the "
                         "final residual stream at the prediction positions: call it on logits "
                         "[batch, pos, d_vocab] (on_model does)")

    def __call__(self, logits: Float[Tensor, "rows pos vocab"]) -> Float[Tensor, " rows"]:
        """`fn` on each copy of the batch in `logits` (`(copies batch)` rows), normalised."""
        if logits.ndim != 3:
            raise ValueError(f"a CallableMetric needs the full logits [batch, pos, d_vocab], got "
                             f"shape {tuple(logits.shape)}")
        rows = logits.shape[0]
        n = self.n_prompts or rows
        if rows % n:
            raise ValueError(f"the metric function is defined on a batch of {n} prompts but got "
                             f"{rows} rows (rows must be whole copies of the batch)")
        values = []
        for lo in range(0, rows, n):
            value = self.fn(logits[lo:lo + n])
            if not isinstance(value, Tensor):
                raise ValueError(f"the metric function must return a tensor ([batch] or a scalar, "
                                 f"differentiable for gradient methods), got {type(value).__name__}")
            if value.ndim == 0:
                value = value.expand(n)
            elif tuple(value.shape) != (n,):
                raise ValueError(f"the metric function returned shape {tuple(value.shape)} for a "
                                 f"batch of {n} prompts; it must return one value per prompt "
                                 f"[{n}] or a scalar")
            values.append(value)
        return self._normalise(torch.cat(values))

    def on_model(self, model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
        """`fn` on the full logits of `model` run on `tokens` (every position, every column)."""
        return self(model(tokens))

    def select(self, rows: Rows) -> CallableMetric:
        """Whole copies of the batch only (`(copies batch)` order): a function of the whole
        batch cannot be evaluated on some of its prompts."""
        if self.n_prompts is None:
            raise ValueError("bind the CallableMetric to its batch first (metric.for_batch(n))")
        n = self.n_prompts
        index = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows)
        index = index.long().reshape(-1).cpu() % n
        copies = len(index) // n
        if copies == 0 or not torch.equal(index, torch.arange(n).repeat(copies)):
            raise ValueError(
                f"a metric given as a plain function is defined on its whole batch of {n} prompts "
                f"(the function sees them all at once), so it cannot be restricted to the rows "
                f"{index.tolist()[:10]}{'...' if len(index) > 10 else ''}; write the metric as a "
                "MetricBase subclass (one value per row in raw_from_columns) to select prompts"
            )
        return self._with(copies=copies)

    def _mean_on(self, model: HookedTransformer, tokens: Tensor, batch_size: int) -> float:
        return self.on_model(model, tokens.to(model.cfg.device)).float().mean().item()

    def to(self, device: str | torch.device) -> CallableMetric:
        return self

    def fingerprint_parts(self) -> dict[str, Any]:
        return {"fn": self.name if self.name is not None else repr(self.fn), "n_prompts": self.n_prompts,
                "copies": self.copies, "clean": self.clean, "corrupt": self.corrupt}


# ----------------------------------------------------------------------------------------------
# Logits from the final residual stream
# ----------------------------------------------------------------------------------------------


def final_columns(
    model: HookedTransformer, resid: Float[Tensor, "rows d_model"], columns: Int[Tensor, "rows k"]
) -> Float[Tensor, "rows k"]:
    """Logits at `columns` from the final residual stream at the prediction position (before
    the final norm): `ln_final(resid) @ W_U[:, cols] + b_U[cols]`, soft-capped where the model
    caps its logits. The same numbers as the full logits gathered at `columns`, without the
    `[rows, d_vocab]` matmul.
    """
    x = resid[:, None, :]  # norms expect a position axis
    if hasattr(model, "ln_final"):  # models without normalisation have none
        x = model.ln_final(x)
    x = x[:, 0]
    columns = columns.to(x.device, torch.long)
    w = model.W_U.T[columns]  # rows k d_model
    logits = torch.einsum("rd,rkd->rk", x, w.to(x.dtype)) + model.b_U[columns].to(x.dtype)
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def final_logits(
    model: HookedTransformer, resid: Float[Tensor, "rows d_model"] | Float[Tensor, "rows pos d_model"]
) -> Float[Tensor, "rows d_vocab"] | Float[Tensor, "rows pos d_vocab"]:
    """Every logit from the final residual stream (before the final norm), at one position per
    row (`[rows, d_model]`) or at every position: `ln_final`, the unembedding and the soft-cap,
    as the model's own forward pass does after its last block."""
    x = resid if resid.ndim == 3 else resid[:, None, :]
    if hasattr(model, "ln_final"):
        x = model.ln_final(x)
    logits = model.unembed(x)
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits if resid.ndim == 3 else logits[:, 0]
