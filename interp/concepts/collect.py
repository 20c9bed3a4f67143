"""Activation collection: run a model over a data set of texts and keep pooled activations.

`collect(model, texts, hooks)` tokenises the texts (optionally through the model's chat
template), runs them in batches, and at every requested hook point reduces each text's
activation `[pos, ...]` to one vector (`pool`): the last token, the mean over the text's tokens,
or a chosen position. The result is an `Activations`: `{hook_name: Float[Tensor, "n d"]}`
(float32, CPU, rows in the order of `texts`) plus the number of tokens of each text.

**Padding.** Texts are always padded on the *left* and run with an explicit attention mask.
TransformerLens then masks the pad keys in every attention layer and starts the positions
(rotary angles, learned position embeddings) of each row at its first real token, so a text's
activations do not depend on what it is batched with (up to float round-off, ~1e-6 in float32;
`tests/concepts/test_collect.py` checks this). With left padding the last real token of every
row sits at the last position, so `pool="last"` is one index for the whole batch.

**Batching.** Texts are sorted by token length inside each chunk (a stable sort, so the order is
a pure function of the inputs) and cut into batches of at most `batch_size` texts, fewer for long
texts so that one forward pass stays within half of `memory_gb` (a rough estimate of TL's
per-layer working memory: attention scores, MLP hidden states, residual copies). Sorting keeps
padding small. The forward pass stops after the last block that holds a requested hook
(`stop_at_layer`), and pooling happens inside the hook, so no `[batch, pos, d]` tensor is kept.

**Determinism.** There is nothing random in collection: the same model weights, texts and
settings give bit-identical activations (the batching is deterministic too). Changing
`batch_size` or `memory_gb` changes which texts share a batch, which changes results only by
float round-off.

**Memory and disk.** Without `out_dir` everything stays in memory, and a collection whose result
would exceed `memory_gb` is refused up front (with the size it would need). With `out_dir`,
results are written as they are computed, in chunks of texts (safetensors files plus an
`index.json`), each chunk holding at most half of `memory_gb`. An interrupted run called again
with the same model, texts and settings resumes after the chunks already on disk; a different
model (the weights are fingerprinted), different texts or settings are refused rather than
mixed. The returned `Activations` reads the chunks back, into memory when they fit the budget,
otherwise lazily one hook point at a time. `Activations.save` / `Activations.load` use the same
format.

**Chat template.** `chat_template=True` wraps each text as a user message (after an optional
system message) with the tokenizer's `apply_chat_template(..., add_generation_prompt=True)`, so
the last token is the end of the assistant header, where instruction-tuned models decide how to
answer (the refusal-direction work reads activations there). The template decides about BOS
then; `prepend_bos` applies to plain texts only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from interp.hooks import Layers, hook_names
from interp.tokens import Texts, tokenize

__all__ = [
    "Activations",
    "ActivationsMismatchError",
    "Pool",
    "collect",
    "tokenize",
]

#: `"last"` (last real token), `"mean"` (mean over the text's tokens) or an int position in the
#: unpadded text (negative counts from its end).
Pool = Union[Literal["last", "mean"], int]

FORMAT = "interp.activations"
FORMAT_VERSION = 1
_N_TOKENS_KEY = "__n_tokens__"
#: Hook points outside the blocks that fire before block 0 (so `stop_at_layer` can be used).
_BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed", "hook_tokens")
#: Hook points whose position axis is not axis 1; pooling over positions is undefined there.
_NOT_POOLABLE = ("attn.hook_pattern", "attn.hook_attn_scores")


class ActivationsMismatchError(ValueError):
    """`out_dir` holds activations computed from a different model, texts or settings."""


# --------------------------------------------------------------------------------------------
# The result type
# --------------------------------------------------------------------------------------------


class _LazyChunks(Mapping):
    """A read-only `{hook_name: Float[Tensor, "n d"]}` that reads each hook from disk on access
    (concatenating its chunks) and keeps nothing in memory."""

    def __init__(self, root: Path, files: list[str], names: list[str]) -> None:
        self.root, self.files, self.names = root, files, names

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        if name not in self.names:
            raise KeyError(f"no activations for {name!r}; held: {self.names}")
        parts = []
        for file in self.files:
            with safe_open(str(self.root / file), framework="pt") as f:
                parts.append(f.get_tensor(name))
        return torch.cat(parts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Activations:
    """Pooled activations of `n` texts at a set of hook points.

    Attributes:
        acts: `{hook_name: Float[Tensor, "n d"]}`, float32 on CPU, row `i` for text `i`. Hook
            points with more than one trailing axis (`z`: `[pos, head, d_head]`) are flattened
            head-major (`d = head * d_head`). Read lazily from disk when loaded with
            `in_memory=False`.
        n_tokens: number of real (non-pad) tokens of each text, BOS and template included.
        meta: how the activations were made (model, hook names, pool, template, timings...).
    """

    acts: Mapping[str, Float[Tensor, "n d"]]
    n_tokens: Int[Tensor, " n"]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hook_names(self) -> list[str]:
        return list(self.acts)

    def __len__(self) -> int:
        return int(self.n_tokens.shape[0])

    def __getitem__(self, name: str) -> Float[Tensor, "n d"]:
        if name not in self.acts:
            raise KeyError(f"no activations for {name!r}; this object holds {self.hook_names}")
        return self.acts[name]

    def by_layer(self, family: str | None = None) -> dict[int, Float[Tensor, "n d"]]:
        """`{layer: activations}` for the hook points of one family.

        Args:
            family: a short family name (`"resid_post"`) or a hook-name suffix
                (`"hook_resid_post"`, `"mlp.hook_post"`); None when every held hook point is
                in one family already.

        Raises:
            ValueError: no held hook point matches, or `family` is None and the held hook
                points span several families or include ones outside the blocks.
        """
        from interp.hooks import HOOK_FAMILIES

        suffixes: dict[str, int] = {}
        for name in self.acts:
            parts = name.split(".", 2)
            if parts[0] != "blocks" or len(parts) < 3:
                if family is None:
                    raise ValueError(f"{name!r} is not a per-layer hook point; pass family=")
                continue
            suffixes[parts[2]] = suffixes.get(parts[2], 0) + 1
        if family is None:
            if len(suffixes) != 1:
                raise ValueError(f"activations span several families {sorted(suffixes)}; pass family=")
            suffix = next(iter(suffixes))
        else:
            suffix = HOOK_FAMILIES.get(family, family).removeprefix("blocks.{L}.")
        out = {int(name.split(".")[1]): self.acts[name] for name in self.acts
               if name.startswith("blocks.") and name.split(".", 2)[2] == suffix}
        if not out:
            raise ValueError(f"no held hook point is in family {family!r}; held: {self.hook_names}")
        return dict(sorted(out.items()))

    # -- disk format ---------------------------------------------------------------------------

    def save(self, path: str | Path, chunk_size: int | None = None) -> Path:
        """Write `path/index.json` and safetensors chunks of `chunk_size` rows (default: one
        chunk). Overwrites an index already there."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        n = len(self)
        chunk_size = chunk_size or max(n, 1)
        names = self.hook_names
        chunks = []
        for k, start in enumerate(range(0, max(n, 1), chunk_size)):
            stop = min(start + chunk_size, n)
            tensors = {name: self.acts[name][start:stop] for name in names}
            chunks.append(_write_chunk(path, k, start, stop, tensors, self.n_tokens[start:stop]))
        dims = {name: int(self.acts[name].shape[1]) for name in names}
        _write_index(path, {"n": n, "chunk_size": chunk_size, "hook_names": names, "dims": dims,
                            "meta": self.meta, "fingerprint": self.meta.get("fingerprint"),
                            "chunks": chunks, "complete": True})
        return path

    @classmethod
    def load(cls, path: str | Path, hooks: Sequence[str] | None = None,
             in_memory: bool = True) -> Activations:
        """Read activations written by `save` or by `collect(..., out_dir=path)`.

        Args:
            path: the directory with `index.json`.
            hooks: full hook names to read (default all).
            in_memory: read everything now; False reads each hook from disk when accessed.

        Raises:
            FileNotFoundError: no `index.json` there.
            ValueError: the collection there is incomplete, or a hook is not held.
        """
        path = Path(path)
        index = _read_index(path)
        if index is None:
            raise FileNotFoundError(f"{path} holds no activations (no index.json)")
        if not index.get("complete"):
            raise ValueError(
                f"the collection in {path} is incomplete ({len(index['chunks'])} chunks of "
                f"{_n_chunks(index['n'], index['chunk_size'])}); run collect(..., out_dir={str(path)!r}) "
                "again with the same inputs to finish it"
            )
        names = list(index["hook_names"]) if hooks is None else list(hooks)
        missing = [h for h in names if h not in index["hook_names"]]
        if missing:
            raise ValueError(f"{path} holds no activations for {missing}; held: {index['hook_names']}")
        files = [c["file"] for c in sorted(index["chunks"], key=lambda c: c["start"])]
        from safetensors.torch import load_file

        n_tokens = []
        for file in files:
            n_tokens.append(load_file(str(path / file), device="cpu")[_N_TOKENS_KEY])
        n_tok = torch.cat(n_tokens) if n_tokens else torch.zeros(0, dtype=torch.long)
        lazy = _LazyChunks(path, files, names)
        acts: Mapping[str, Tensor] = {name: lazy[name] for name in names} if in_memory else lazy
        return cls(acts=acts, n_tokens=n_tok, meta=dict(index.get("meta", {})))


def _n_chunks(n: int, chunk_size: int) -> int:
    return max(1, math.ceil(n / chunk_size))


def _chunk_file(k: int) -> str:
    return f"chunk_{k:05d}.safetensors"


def _write_chunk(root: Path, k: int, start: int, stop: int, tensors: dict[str, Tensor],
                 n_tokens: Tensor) -> dict[str, Any]:
    """Write one chunk atomically (temporary file, then rename) and return its index entry."""
    from safetensors.torch import save_file

    payload = {name: t.contiguous() for name, t in tensors.items()}
    payload[_N_TOKENS_KEY] = n_tokens.to(torch.long).contiguous()
    file = _chunk_file(k)
    tmp = root / (file + ".tmp")
    save_file(payload, str(tmp))
    os.replace(tmp, root / file)
    return {"file": file, "start": start, "stop": stop}


def _write_index(root: Path, index: dict[str, Any]) -> None:
    tmp = root / "index.json.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **index}, indent=1))
    os.replace(tmp, root / "index.json")


def _read_index(root: Path) -> dict[str, Any] | None:
    file = root / "index.json"
    if not file.exists():
        return None
    index = json.loads(file.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{file} is not an activations index (format {index.get('format')!r})")
    return index


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------


def collect(
    model: HookedTransformer,
    texts: Texts,
    hooks: str | Sequence[str] = "resid_post",
    layers: Layers = "all",
    pool: Pool = "last",
    batch_size: int = 32,
    chat_template: bool = False,
    system_prompt: str | None = None,
    prepend_bos: bool | None = None,
    skip_bos: bool = True,
    max_tokens: int | None = None,
    out_dir: str | Path | None = None,
    memory_gb: float = 2.0,
    chunk_size: int | None = None,
    progress: bool = True,
) -> Activations:
    """Pooled activations of every text at every requested hook point (see the module docstring).

    Args:
        model: a HookedTransformer (any device and dtype; results are float32 on CPU).
        texts: strings, or token ids (lists of ints / a 2-D int tensor, used as they are).
        hooks: hook families (`"resid_post"`, `"mlp_out"`, `"z"`...), templates, suffixes or
            full names, resolved by `interp.hooks.hook_names`.
        layers: the layers of the families (`"all"`, an int or a list); None with full names.
        pool: `"last"`: the last real token. `"mean"`: the mean over the real tokens, pad tokens
            excluded (and the first token when `skip_bos` and it is the BOS token). An int
            `p`: position `p` of the unpadded text, negative counting from its end (-1 is
            `"last"`); a text too short for `p` is an error.
        batch_size: most texts per forward pass (fewer for long texts, see `memory_gb`).
        chat_template: wrap each string with the tokenizer's chat template (see `tokenize`).
        system_prompt: system message for the chat template.
        prepend_bos: BOS before plain strings; None uses the model's default.
        skip_bos: leave a leading BOS token out of `pool="mean"` (its residual stream is an
            attention sink with a large norm, unrelated to the text).
        max_tokens: truncate longer texts from the left (default the model's `n_ctx`).
        out_dir: write chunks there as they are computed and resume from them (see above).
        memory_gb: budget for one chunk of results and one forward pass (each gets half);
            without `out_dir`, a result larger than this is refused.
        chunk_size: texts per chunk on disk (default: as many as fit half of `memory_gb`).
            A resumed collection keeps the chunk size it started with.
        progress: show a tqdm progress bar (texts done).

    Returns:
        `Activations` with rows in the order of `texts`; `meta` records the settings, the
        tokens processed and the seconds spent computing.

    Raises:
        ValueError: unknown hooks or layers (from `hook_names`); attention-pattern hook points
            (their position axes cannot be pooled); bad `pool`; a text shorter than an int
            `pool` position; a result over `memory_gb` without `out_dir`.
        ActivationsMismatchError: `out_dir` holds a collection of other inputs or settings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if memory_gb <= 0:
        raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
    if not (pool in ("last", "mean") or (isinstance(pool, int) and not isinstance(pool, bool))):
        raise ValueError(f"pool must be 'last', 'mean' or an int position, got {pool!r}")
    names = hook_names(model, hooks, layers)
    bad = [n for n in names if n.endswith(_NOT_POOLABLE)]
    if bad:
        raise ValueError(
            f"cannot pool attention patterns/scores {bad}: their axes are [batch, head, query, "
            "key]; collect 'z' or 'attn_out' instead, or use interp.hooks.capture"
        )
    ids, n_truncated = tokenize(model, texts, chat_template, system_prompt, prepend_bos, max_tokens)
    lengths = [len(x) for x in ids]
    if isinstance(pool, int):
        short = [i for i, n in enumerate(lengths) if not (-n <= pool < n)]
        if short:
            raise ValueError(
                f"pool={pool} is outside {len(short)} text(s) (first: text {short[0]} has "
                f"{lengths[short[0]]} tokens); use a position every text has, or pool='last'"
            )
    dims = _hook_dims(model, names)
    bytes_per_text = 4 * sum(dims.values())
    total_gb = len(ids) * bytes_per_text / 1e9
    if out_dir is None and total_gb > memory_gb:
        raise ValueError(
            f"the result needs {total_gb:.2f} GB ({len(ids)} texts x {sum(dims.values())} floats), "
            f"more than memory_gb={memory_gb}; pass out_dir= to write it to disk in chunks, "
            "collect fewer hooks, or raise memory_gb"
        )
    if chunk_size is None:
        chunk_size = max(1, int(memory_gb * 1e9 / 2 // bytes_per_text))
    chunk_size = min(chunk_size, len(ids))
    bos_id = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    settings = {
        "model": model.cfg.model_name, "hook_names": names, "pool": pool,
        "chat_template": chat_template, "system_prompt": system_prompt,
        "prepend_bos": model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos,
        "skip_bos": skip_bos, "bos_token_id": bos_id,
        "max_tokens": max_tokens or model.cfg.n_ctx,
    }
    # Only a resumable collection needs the fingerprint (it costs a pass over the weights).
    fingerprint = _fingerprint(model, ids, settings) if out_dir is not None else None
    meta = {**settings, "n": len(ids), "dims": dims, "n_truncated": n_truncated,
            "tokens_total": sum(lengths), "fingerprint": fingerprint,
            "dtype": str(model.cfg.dtype), "device": str(model.cfg.device)}

    root = Path(out_dir) if out_dir is not None else None
    done: dict[int, dict[str, Any]] = {}
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        index = _read_index(root)
        if index is not None:
            if index.get("fingerprint") != fingerprint:
                raise ActivationsMismatchError(
                    f"{root} already holds activations of other inputs or settings (model "
                    f"{index.get('meta', {}).get('model')!r}, {index.get('n')} texts, hooks "
                    f"{index.get('hook_names', [])[:3]}...); use another out_dir or delete it"
                )
            chunk_size = index["chunk_size"]
            done = {c["start"] // chunk_size: c for c in index["chunks"]
                    if (root / c["file"]).exists()}
            if index.get("complete") and len(done) == _n_chunks(len(ids), chunk_size):
                acts = Activations.load(root, in_memory=total_gb <= memory_gb)
                acts.meta["resumed_chunks"] = len(done)
                return acts
    n_chunks = _n_chunks(len(ids), chunk_size)
    forward_budget = memory_gb * 1e9 / 2
    results: dict[str, list[Tensor]] = {name: [] for name in names}
    seconds, computed_tokens = 0.0, 0
    bar = tqdm(total=len(ids), unit="text", desc="collect", disable=not progress)
    bar.update(sum(c["stop"] - c["start"] for c in done.values()))
    for k in range(n_chunks):
        start, stop = k * chunk_size, min((k + 1) * chunk_size, len(ids))
        if k in done:
            continue
        t0 = time.perf_counter()
        chunk = _run_chunk(model, ids[start:stop], names, pool, batch_size, forward_budget,
                           skip_bos, bos_id, bar)
        seconds += time.perf_counter() - t0
        computed_tokens += sum(lengths[start:stop])
        n_tok = torch.tensor(lengths[start:stop], dtype=torch.long)
        if root is not None:
            done[k] = _write_chunk(root, k, start, stop, chunk, n_tok)
            _write_index(root, {"n": len(ids), "chunk_size": chunk_size, "hook_names": names,
                                "dims": dims, "meta": meta, "fingerprint": fingerprint,
                                "chunks": [done[j] for j in sorted(done)], "complete": False})
        else:
            for name in names:
                results[name].append(chunk[name])
    bar.close()
    meta["seconds"] = seconds
    meta["tokens_computed"] = computed_tokens
    meta["tokens_per_s"] = computed_tokens / seconds if seconds > 0 else None
    if root is not None:
        _write_index(root, {"n": len(ids), "chunk_size": chunk_size, "hook_names": names,
                            "dims": dims, "meta": meta, "fingerprint": fingerprint,
                            "chunks": [done[j] for j in sorted(done)], "complete": True})
        return Activations.load(root, in_memory=total_gb <= memory_gb)
    acts = {name: torch.cat(parts) for name, parts in results.items()}
    return Activations(acts=acts, n_tokens=torch.tensor(lengths, dtype=torch.long), meta=meta)


def _hook_dims(model: HookedTransformer, names: list[str]) -> dict[str, int]:
    """Flattened per-position size of each hook point, from one token through the model."""
    found: dict[str, int] = {}

    def record(act: Tensor, hook: HookPoint) -> None:
        found[hook.name] = int(act[0, 0].numel())

    tokens = torch.zeros((1, 1), dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode():
        model.run_with_hooks(tokens, return_type=None, stop_at_layer=_stop_layer(model, names),
                             fwd_hooks=[(name, record) for name in names])
    return {name: found[name] for name in names}


def _stop_layer(model: HookedTransformer, names: list[str]) -> int | None:
    """The `stop_at_layer` that still runs every hook point in `names` (None: run to the end)."""
    last = -1
    for name in names:
        if name.startswith("blocks."):
            last = max(last, int(name.split(".")[1]))
        elif not name.startswith(_BEFORE_BLOCKS):
            return None  # ln_final.* and similar fire after the last block
    return last + 1


def _fingerprint(model: HookedTransformer, ids: list[list[int]], settings: dict[str, Any]) -> str:
    """A hash of the weights (float64 sum and norm of each tensor), the token ids and the settings."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    with torch.inference_mode():
        for name, tensor in model.state_dict().items():
            h.update(name.encode())
            if tensor.is_floating_point():
                t = tensor.detach()
                h.update(f"{t.sum(dtype=torch.float64).item():.10e}".encode())
                h.update(f"{torch.linalg.vector_norm(t, dtype=torch.float64).item():.10e}".encode())
    for x in ids:
        h.update(len(x).to_bytes(4, "little"))
        h.update(b"".join(int(i).to_bytes(4, "little", signed=True) for i in x))
    return h.hexdigest()[:24]


def _forward_bytes(model: HookedTransformer, length: int) -> float:
    """Rough working memory of one sequence through one block (scores, pattern, MLP, residuals)."""
    cfg = model.cfg
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    per_pos = 3 * cfg.n_heads * length + 4 * d_mlp + 10 * cfg.d_model
    return float(length * per_pos * 4)


def _batches(lengths: list[int], batch_size: int, budget: float, model: HookedTransformer
             ) -> list[list[int]]:
    """Indices grouped into batches: longest first, each within `batch_size` and `budget`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        cap = max(1, min(batch_size, int(budget // _forward_bytes(model, width))))
        if len(current) >= cap:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _run_chunk(model: HookedTransformer, ids: list[list[int]], names: list[str], pool: Pool,
               batch_size: int, budget: float, skip_bos: bool, bos_id: int | None,
               bar: tqdm) -> dict[str, Tensor]:
    """Pooled activations of one chunk of texts, rows in the chunk's order."""
    lengths = [len(x) for x in ids]
    out: dict[str, Tensor] = {}
    stop = _stop_layer(model, names)
    device = model.cfg.device
    pad_id = 0
    if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
        pad_id = model.tokenizer.pad_token_id
    for batch in _batches(lengths, batch_size, budget, model):
        width = max(lengths[i] for i in batch)
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, width - lengths[i]:] = torch.tensor(ids[i], dtype=torch.long)
            mask[row, width - lengths[i]:] = 1
        index, weights = _pool_plan(pool, mask, tokens, skip_bos, bos_id)
        pooled: dict[str, Tensor] = {}

        def hook_fn(act: Tensor, hook: HookPoint, index=index, weights=weights, pooled=pooled) -> None:
            flat = einops.rearrange(act, "b p ... -> b p (...)") if act.ndim > 2 else act[..., None]
            if index is not None:  # one position per row: take it as it is
                vec = flat[torch.arange(flat.shape[0], device=flat.device), index.to(flat.device)]
            else:
                vec = einops.einsum(weights.to(flat.device), flat.float(), "b p, b p d -> b d")
            pooled[hook.name] = vec.float().cpu()

        with torch.inference_mode():
            model.run_with_hooks(tokens.to(device), attention_mask=mask.to(device),
                                 return_type=None, stop_at_layer=stop,
                                 fwd_hooks=[(name, hook_fn) for name in names])
        for name in names:
            if name not in out:
                out[name] = torch.empty((len(ids), pooled[name].shape[1]), dtype=torch.float32)
            out[name][batch] = pooled[name]
        bar.update(len(batch))
    return out


def _pool_plan(pool: Pool, mask: Int[Tensor, "batch pos"], tokens: Int[Tensor, "batch pos"],
               skip_bos: bool, bos_id: int | None
               ) -> tuple[Int[Tensor, " batch"] | None, Float[Tensor, "batch pos"] | None]:
    """Which padded position each row takes (`"last"`, int pools), or the averaging weights of
    each row (`"mean"`: 1/count on real tokens, 0 on pads and a skipped BOS).

    Rows are left-padded, so the real tokens of a row are `[width - length, width)`.
    """
    batch, width = mask.shape
    lengths = mask.sum(1)
    rows = torch.arange(batch)
    if pool == "last":
        return torch.full((batch,), width - 1), None
    if pool == "mean":
        keep = mask.clone().float()
        if skip_bos and bos_id is not None:
            first = width - lengths
            is_bos = (tokens[rows, first] == bos_id) & (lengths > 1)
            keep[rows[is_bos], first[is_bos]] = 0.0
        return None, keep / keep.sum(1, keepdim=True)
    assert isinstance(pool, int)
    if pool >= 0:
        return width - lengths + pool, None
    return torch.full((batch,), width + pool), None
