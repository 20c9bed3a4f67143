"""Indirect-object identification (IOI) prompt pairs and the logit-difference metric.

IOI (Wang et al. 2022, "Interpretability in the Wild"): after
"When Mary and John went to the store, John gave a drink to" a model should predict the
*indirect object* (IO) " Mary" rather than the *subject* (S) " John", the name that occurs twice
(first at S1, then at S2). The logit difference `logit(IO) - logit(S)` at the last position
measures how well the model does the task; patching studies move activations between a clean
prompt and a corrupted one and watch that number.

**Templates.** `TEMPLATES` holds our own sentences with the slots `{IO}`, `{S1}`, `{S2}`,
`{PLACE}` and `{OBJECT}`; each ends where the IO is the natural next word. Every sentence comes in
both name orders of the first clause: *ABBA* (IO first: "When Mary and John ..., John ... to")
and *BABA* (S first: "When John and Mary ..., John ... to"); the order names the sequence of
name occurrences, the predicted IO included. Every slot follows a space and names, places and
objects are single tokens *with* that space (" Mary"), so all prompts of one template have the
same number of tokens and the slots sit at the same positions (`PromptPairs.positions`).

**Corruptions** (the same template, place and object as the clean prompt):

- `"abc"`: the three name slots IO, S1, S2 get three new names C, D, E, distinct from each other
  and from both clean names ("When Lucy and Paul ..., Sam gave a drink to"). No name repeats,
  so the corrupt prompt carries no information on which clean name is the IO; the clean
  logit difference `logit(A) - logit(B)` should be near zero there. Needs five names.
- `"swap"`: only S2 changes, to the IO name ("When Mary and John ..., Mary gave a drink to"),
  so the repeated name, and with it the correct answer, flips from A to B. The clean logit
  difference becomes negative on the corrupt prompt. Needs two names.

`answer_ids` and `wrong_ids` always refer to the *clean* prompt (IO and S); metrics evaluate
both clean and corrupt runs with them.

**Lengths and padding.** Within a pair, clean and corrupt prompts always have the same number
of tokens (checked; external pairs that do not are rejected). Different templates give
different lengths, so a batch is **right-padded** to its longest prompt with
`PromptPairs.pad_token_id`, and `PromptPairs.end_pos` holds each row's last real position,
where the next-token prediction is read. In a causal model a token never sees the tokens after
it, so right padding leaves every real position's activations and logits exactly as in an
unpadded run; no attention mask is needed and positions start at 0 in every row (left padding
would shift them). Two consequences: read metrics at `end_pos`, not at -1 (`PromptPairs.logit_diff`
and `PromptPairs.metric`, the `LogitDiff` every attribution method takes, do it for you), and a
position index means the same slot in
every row only within one template (`PromptPairs.select(pairs.template == t)`) or one length
(`PromptPairs.by_length()`, whose groups carry no padding).

Token positions include the BOS token when the model prepends one
(`model.cfg.default_prepend_bos`); texts are tokenised with `model.to_tokens(text,
prepend_bos=model.cfg.default_prepend_bos)` everywhere, so `clean_tokens[i, :end_pos[i] + 1]`
equals `model.to_tokens(clean_texts[i])`.
"""

from __future__ import annotations

import csv
import json
import random
import string
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, NamedTuple, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.attribution.metrics import LogitDiff
from interp.generation import pad_id
from interp.tokens import single_token

__all__ = [
    "CORRUPTIONS",
    "NAMES",
    "OBJECTS",
    "PLACES",
    "TEMPLATES",
    "PromptPairs",
    "generate_ioi",
    "load_pairs",
    "logit_diff",
    "template_order",
]

Corruption = Literal["abc", "swap"]
Position = Union[int, Int[Tensor, " batch"]]

#: Corruption name -> how many distinct names it needs (see the module docstring).
CORRUPTIONS: dict[str, int] = {"abc": 5, "swap": 2}

#: Common English first names (written for this module); filtered per model to single tokens.
NAMES: tuple[str, ...] = tuple(
    """Mary John Anna James Sarah David Emma Michael Laura Robert Alice Thomas Kate Daniel Lucy
    Peter Rachel Mark Helen Paul Julia Steven Grace Kevin Emily Brian Claire Jason Linda Chris
    Nancy Eric Susan Adam Karen Tom Amy Sam Lisa Ryan Jessica Ben Maria Jack Sophie Luke Rose
    Matt Diana George Ellen Frank Nina Henry Olivia Oscar Victoria Simon Dan Amanda Tim Heather
    Andrew Anne Richard Jane Edward Ruth Jacob Sara Joseph Kelly Charles Martin Joe Mike
    Jennifer""".split()
)

#: Places (after "the"); filtered per model to single tokens.
PLACES: tuple[str, ...] = tuple(
    """store park school office beach station market library hospital museum garden restaurant
    bank church airport kitchen theater zoo hotel farm gym bakery lake mall""".split()
)

#: Objects (after "a" or "the": all start with a consonant sound); filtered to single tokens.
OBJECTS: tuple[str, ...] = tuple(
    """ball book drink key gift letter cake phone ring pen hat map coin bag box cup basket
    bottle ticket card watch camera flower sandwich pencil guitar""".split()
)

# Written in the ABBA order (IO before S1); `_baba` derives the other order.
_ABBA_TEMPLATES = (
    "When {IO} and {S1} arrived at the {PLACE}, {S2} handed a {OBJECT} to",
    "After {IO} and {S1} walked into the {PLACE}, {S2} passed the {OBJECT} to",
    "Later that day {IO} and {S1} stopped by the {PLACE}, and {S2} threw the {OBJECT} to",
    "While {IO} and {S1} were waiting at the {PLACE}, {S2} offered a {OBJECT} to",
    "Yesterday {IO} and {S1} visited the {PLACE}, where {S2} sold a {OBJECT} to",
    "At the {PLACE}, {IO} bumped into {S1}. Then {S2} lent a {OBJECT} to",
    "Both {IO} and {S1} were cleaning the {PLACE} when {S2} gave the {OBJECT} to",
    "Once {IO} and {S1} got back from the {PLACE}, {S2} showed the {OBJECT} to",
    "On Sunday {IO} and {S1} drove to the {PLACE}, and {S2} bought a {OBJECT} for",
    "It was late when {IO} and {S1} left the {PLACE}, so {S2} gave a {OBJECT} to",
    "During lunch at the {PLACE}, {IO} and {S1} argued, and afterwards {S2} apologised to",
    "Since {IO} and {S1} were both at the {PLACE}, {S2} mailed a {OBJECT} to",
)


def _baba(template: str) -> str:
    return template.replace("{IO}", "\0").replace("{S1}", "{IO}").replace("\0", "{S1}")


#: Built-in templates: ids 0-11 in ABBA order, 12-23 the same sentences in BABA order.
TEMPLATES: tuple[str, ...] = _ABBA_TEMPLATES + tuple(_baba(t) for t in _ABBA_TEMPLATES)

_NAME_SLOTS = ("IO", "S1", "S2")
_ALL_SLOTS = frozenset((*_NAME_SLOTS, "PLACE", "OBJECT"))


# --------------------------------------------------------------------------------------------
# Prompt pairs
# --------------------------------------------------------------------------------------------


@dataclass
class PromptPairs:
    """A batch of clean/corrupt prompt pairs with the answer tokens, ready for patching.

    Row `i` of every tensor and list belongs to pair `i`. See the module docstring for the
    padding convention: rows are right-padded, `end_pos` marks each row's last real token.
    """

    clean_tokens: Int[Tensor, "batch pos"]
    """Clean prompts, right-padded with `pad_token_id` (BOS included if the model adds one)."""
    corrupt_tokens: Int[Tensor, "batch pos"]
    """Corrupt prompts; row `i` has exactly as many real tokens as `clean_tokens[i]`."""
    answer_ids: Int[Tensor, " batch"]
    """Correct next token of the clean prompt (the IO for IOI)."""
    wrong_ids: Int[Tensor, " batch"]
    """Competing token (the subject for IOI); the metric is logit(answer) - logit(wrong)."""
    end_pos: Int[Tensor, " batch"]
    """Position of each row's last real token, where the next-token prediction is read."""
    clean_texts: list[str]
    """The clean prompts as text."""
    corrupt_texts: list[str]
    """The corrupt prompts as text."""
    template: Int[Tensor, " batch"]
    """Per row, an index into `templates`."""
    templates: tuple[str, ...]
    """Template texts (`TEMPLATES` for generated pairs; labels from the file for loaded ones)."""
    positions: dict[str, Int[Tensor, " batch"]] = field(default_factory=dict)
    """Token position of each slot per row: `IO`, `S1`, `S2` (generated pairs) and `end`. The
    corrupt prompt holds its (changed) names at the same positions."""
    corruption: str = ""
    """How the corrupt prompts were made: "abc", "swap", or "external" for loaded pairs."""
    pad_token_id: int = 0
    """Token used for right padding (never read by any metric)."""
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """For loaded pairs: (1-based row, reason) of each invalid row left out."""

    def __post_init__(self) -> None:
        batch = self.clean_tokens.shape[0]
        if self.clean_tokens.shape != self.corrupt_tokens.shape:
            raise ValueError(
                f"clean_tokens {tuple(self.clean_tokens.shape)} and corrupt_tokens "
                f"{tuple(self.corrupt_tokens.shape)} must have the same shape"
            )
        for name in ("answer_ids", "wrong_ids", "end_pos", "template"):
            value = getattr(self, name)
            if value.shape != (batch,):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected ({batch},)")
        for name in ("clean_texts", "corrupt_texts"):
            if len(getattr(self, name)) != batch:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {batch}")

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    def __getitem__(self, rows: int | slice | Sequence[int] | Tensor) -> PromptPairs:
        return self.select(rows)

    @property
    def device(self) -> torch.device:
        return self.clean_tokens.device

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Number of real tokens in each row (clean and corrupt alike)."""
        return self.end_pos + 1

    @property
    def is_padded(self) -> bool:
        """Whether any row is shorter than the tensors (i.e. `end_pos` is not always -1)."""
        return bool((self.end_pos != self.clean_tokens.shape[1] - 1).any())

    @property
    def orders(self) -> list[str]:
        """Per row, "ABBA" or "BABA" (name order of its template), "" where not an IOI template."""
        order = [template_order(t, strict=False) for t in self.templates]
        return [order[i] for i in self.template.tolist()]

    def to(self, device: str | torch.device) -> PromptPairs:
        """A copy with every tensor on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        moved["positions"] = {k: v.to(device) for k, v in self.positions.items()}
        return replace(self, **moved)

    def select(self, rows: int | slice | Sequence[int] | Tensor) -> PromptPairs:
        """The pairs at `rows` (indices, a slice or a boolean mask), padding trimmed to the
        longest selected row."""
        if isinstance(rows, int):
            index = torch.tensor([rows])
        elif isinstance(rows, slice):
            index = torch.arange(len(self))[rows]
        else:
            index = torch.as_tensor(rows).cpu()
            if index.dtype == torch.bool:
                if index.shape != (len(self),):
                    raise ValueError(f"boolean mask has shape {tuple(index.shape)}, expected ({len(self)},)")
                index = index.nonzero()[:, 0]
            index = index.long().reshape(-1)
        if index.numel() == 0:
            raise ValueError("selection is empty: a PromptPairs holds at least one pair")
        idx = index.tolist()
        index = index.to(self.device)
        width = int(self.end_pos[index].max()) + 1
        return replace(
            self,
            clean_tokens=self.clean_tokens[index, :width],
            corrupt_tokens=self.corrupt_tokens[index, :width],
            answer_ids=self.answer_ids[index],
            wrong_ids=self.wrong_ids[index],
            end_pos=self.end_pos[index],
            clean_texts=[self.clean_texts[i] for i in idx],
            corrupt_texts=[self.corrupt_texts[i] for i in idx],
            template=self.template[index],
            positions={k: v[index] for k, v in self.positions.items()},
            skipped=list(self.skipped),
        )

    def by_length(self) -> dict[int, PromptPairs]:
        """Unpadded groups: token length -> the pairs of that length, in their original order."""
        lengths = self.lengths.cpu()
        return {
            int(n): self.select(lengths == n) for n in sorted(set(lengths.tolist()))
        }

    def at_end(self, x: Float[Tensor, "batch pos *rest"]) -> Float[Tensor, " batch *rest"]:
        """Each row of `x` (logits, residuals, ... with batch and pos first) at its `end_pos`."""
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, self.end_pos.to(x.device)]

    def logit_diff(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        """`logit(answer) - logit(wrong)` at each row's `end_pos`."""
        return logit_diff(logits, self.answer_ids, self.wrong_ids, self.end_pos)

    def metric(self, model: HookedTransformer, normalise: bool = True, batch_size: int = 64) -> LogitDiff:
        """The logit-difference metric of these pairs, read at each row's `end_pos` (the default
        metric of `attribution.attribute`; every method takes any metric). With `normalise`,
        rescaled by `model`'s mean clean and corrupt logit differences so that clean scores 1
        and corrupt 0 on average (an error if the corruption leaves the mean unchanged)."""
        raw = LogitDiff(self.answer_ids, self.wrong_ids, end_pos=self.end_pos)
        if not normalise:
            return raw
        return raw.normalised(model, self.clean_tokens, self.corrupt_tokens, batch_size=batch_size)


def _stack(pairs_tokens: Sequence[list[int]], pad: int) -> Int[Tensor, "batch pos"]:
    width = max(len(t) for t in pairs_tokens)
    out = torch.full((len(pairs_tokens), width), pad, dtype=torch.long)
    for i, t in enumerate(pairs_tokens):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return out


def _encode(model: HookedTransformer, text: str) -> list[int]:
    """Token ids of `text` with the model's default BOS handling (as `model.to_tokens`)."""
    return model.to_tokens(text, prepend_bos=model.cfg.default_prepend_bos)[0].tolist()


def _need_tokenizer(model: HookedTransformer, what: str) -> None:
    if model.tokenizer is None:
        raise ValueError(
            f"{model.cfg.model_name} has no tokenizer, so it cannot {what}; use a model with "
            "one (e.g. interp.models.load())."
        )


# --------------------------------------------------------------------------------------------
# Templates and generation
# --------------------------------------------------------------------------------------------


def _slots(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def template_order(template: str, strict: bool = True) -> str:
    """"ABBA" if `{IO}` comes before `{S1}` in `template`, "BABA" if after.

    With `strict=False` a text that is not an IOI template gives "" instead of an error.
    """
    try:
        _check_template(template)
    except ValueError:
        if strict:
            raise
        return ""
    return "ABBA" if template.index("{IO}") < template.index("{S1}") else "BABA"


def _check_template(template: str) -> None:
    slots = _slots(template)
    problems = []
    unknown = sorted(set(slots) - _ALL_SLOTS)
    if unknown:
        problems.append(f"unknown slot(s) {unknown} (allowed: IO, S1, S2, PLACE, OBJECT)")
    for name in _NAME_SLOTS:
        if slots.count(name) != 1:
            problems.append(f"{{{name}}} must occur exactly once (found {slots.count(name)})")
    if not problems and slots.index("S2") < max(slots.index("IO"), slots.index("S1")):
        problems.append("{S2} must come after {IO} and {S1}")
    problems += _spacing_problems(template)
    if problems:
        raise ValueError(f"bad IOI template {template!r}: " + "; ".join(problems))


def _spacing_problems(template: str) -> list[str]:
    """What breaks the token layout of a template: every slot value is one token with its
    leading space, so each slot must follow a space, the text must start with a word, and it
    must not end with a space (the predicted token carries it)."""
    problems = []
    pieces = list(string.Formatter().parse(template))
    if not pieces[0][0].strip() or any(not lit.endswith(" ") for lit, f, _, _ in pieces if f is not None):
        problems.append(
            "every slot must follow a space (values are single tokens with a leading space, "
            "' Mary'), and the template must start with a word, not a slot or a space"
        )
    if template.endswith(" "):
        problems.append("the template must not end with a space (the predicted token carries it)")
    return problems


def _vocab(
    model: HookedTransformer, words: Sequence[str], what: str, need: int, why: str
) -> list[tuple[str, int]]:
    """(word, id of " word") for each word that is one token with a leading space."""
    kept, dropped = [], []
    unique = list(dict.fromkeys(w.strip() for w in words))
    for word in unique:
        try:
            kept.append((word, single_token(model, " " + word, what)))
        except ValueError:
            dropped.append(word)
    if len(kept) < need:
        shown = ", ".join(dropped[:10]) + (", ..." if len(dropped) > 10 else "")
        raise ValueError(
            f"Only {len(kept)} of {len(unique)} {what}s are single tokens of "
            f"{model.cfg.model_name} with a leading space; {why} needs at least {need}. "
            f"Not single tokens: {shown or 'none'}."
        )
    return kept


class _Filled(NamedTuple):
    text: str
    ids: list[int]
    positions: dict[str, int]
    """slot -> token position of its value"""


def _fill(
    model: HookedTransformer, template: str, values: dict[str, tuple[str, int]]
) -> _Filled | None:
    """Fill `template` with (word, id of " word") values; None when the tokenizer does not
    keep every value as its own token in this context."""
    text, starts = "", {}
    for literal, name, _, _ in string.Formatter().parse(template):
        text += literal
        if name is not None:
            starts[name] = len(text) - 1  # the space before the value
            text += values[name][0]
    ids = _encode(model, text)
    positions = {}
    for name, start in starts.items():
        prefix = _encode(model, text[:start])
        pos = len(prefix)
        if ids[:pos] != prefix or pos >= len(ids) or ids[pos] != values[name][1]:
            return None
        positions[name] = pos
    return _Filled(text, ids, positions)


def generate_ioi(
    model: HookedTransformer,
    n: int,
    seed: int = 0,
    corruption: Corruption = "abc",
    templates: Sequence[int] | Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    places: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
) -> PromptPairs:
    """`n` IOI prompt pairs for `model`, deterministic for a given seed.

    Templates are used in turn, each pass through them in a freshly shuffled order, so any
    `n >= len(templates)` uses every template. Each row draws two distinct names (IO and S),
    a place and an object; the corruption (module docstring) decides the corrupt prompt.
    Draws whose slot values the tokenizer merges with their neighbours are redrawn.

    Args:
        model: supplies the tokenizer and BOS convention; it is not run.
        n: number of pairs.
        seed: seed of the draws (Python's `random.Random`, the same on every platform).
        corruption: "abc" (three new names) or "swap" (S2 becomes the IO; the answer flips).
        templates: ids into `TEMPLATES`, or template strings with the slots {IO}, {S1}, {S2}
            and optionally {PLACE}, {OBJECT} (each after a space); default all of `TEMPLATES`.
        names, places, objects: word lists (no leading space) replacing `NAMES`, `PLACES`,
            `OBJECTS`; only words that are one token with a leading space are used.

    Returns:
        `PromptPairs` with `positions` "IO", "S1", "S2", "end"; `template` indexes
        `TEMPLATES` (or the given template strings).

    Raises:
        ValueError: unknown corruption, bad template, `n < 1`, a model without tokenizer, or
            too few single-token names/places/objects (the message gives the counts).
    """
    _need_tokenizer(model, "build IOI prompts")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {list(CORRUPTIONS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if templates is None:
        table, pool = TEMPLATES, list(range(len(TEMPLATES)))
    elif all(isinstance(t, int) for t in templates) and len(templates) > 0:
        bad = [t for t in templates if not 0 <= t < len(TEMPLATES)]
        if bad:
            raise ValueError(f"template ids {bad} out of range 0..{len(TEMPLATES) - 1}")
        table, pool = TEMPLATES, list(dict.fromkeys(templates))
    elif all(isinstance(t, str) for t in templates) and len(templates) > 0:
        table = tuple(dict.fromkeys(templates))
        pool = list(range(len(table)))
    else:
        raise ValueError("templates must be a non-empty list of template ids or of template strings")
    for t in pool:
        _check_template(table[t])

    why = f"corruption {corruption!r}"
    name_vocab = _vocab(model, NAMES if names is None else names, "name", CORRUPTIONS[corruption], why)
    uses = set().union(*(_slots(table[t]) for t in pool))
    place_vocab = _vocab(model, PLACES if places is None else places, "place", 1, "a template with {PLACE}") \
        if "PLACE" in uses else [("", -1)]
    object_vocab = _vocab(model, OBJECTS if objects is None else objects, "object", 1, "a template with {OBJECT}") \
        if "OBJECT" in uses else [("", -1)]

    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n:
        batch = list(pool)
        rng.shuffle(batch)
        order += batch
    order = order[:n]

    rows: list[tuple[int, int, int, _Filled, _Filled]] = []  # template, IO id, S id, prompts
    for t in order:
        for _attempt in range(100):
            a, b, *fresh = rng.sample(name_vocab, CORRUPTIONS[corruption])
            common = {"PLACE": rng.choice(place_vocab), "OBJECT": rng.choice(object_vocab)}
            clean = _fill(model, table[t], {"IO": a, "S1": b, "S2": b, **common})
            if corruption == "abc":
                corrupt_names = {"IO": fresh[0], "S1": fresh[1], "S2": fresh[2]}
            else:
                corrupt_names = {"IO": a, "S1": b, "S2": a}
            corrupt = _fill(model, table[t], {**corrupt_names, **common})
            if clean and corrupt and len(clean.ids) == len(corrupt.ids) \
                    and clean.positions == corrupt.positions:
                rows.append((t, a[1], b[1], clean, corrupt))
                break
        else:
            raise ValueError(
                f"template {table[t]!r}: in 100 draws the tokenizer of {model.cfg.model_name} "
                "never kept every name, place and object as its own token (it merges them with "
                "the neighbouring text); reword the template"
            )

    return pairs_from_rows(model, rows, table, _NAME_SLOTS, corruption)


def pairs_from_rows(
    model: HookedTransformer,
    rows: Sequence[tuple[int, int, int, _Filled, _Filled]],
    table: Sequence[str],
    slots: Sequence[str],
    corruption: str,
) -> PromptPairs:
    """`PromptPairs` from generated rows `(template index, answer id, wrong id, clean, corrupt)`
    whose clean and corrupt prompts have the same length; `positions` holds each slot's
    position in the clean prompt (-1 where its template lacks the slot) and `end`."""
    for *_, clean, corrupt in rows:  # the invariant every patching method relies on
        assert len(clean.ids) == len(corrupt.ids), (clean.text, corrupt.text)
    end = torch.tensor([len(clean.ids) - 1 for *_, clean, _ in rows])
    positions = {
        slot: torch.tensor([clean.positions.get(slot, -1) for *_, clean, _ in rows])
        for slot in slots
    }
    positions["end"] = end
    pad = pad_id(model)
    return PromptPairs(
        clean_tokens=_stack([clean.ids for *_, clean, _ in rows], pad),
        corrupt_tokens=_stack([corrupt.ids for *_, corrupt in rows], pad),
        answer_ids=torch.tensor([a for _, a, *_ in rows]),
        wrong_ids=torch.tensor([w for _, _, w, *_ in rows]),
        end_pos=end.clone(),
        clean_texts=[clean.text for *_, clean, _ in rows],
        corrupt_texts=[corrupt.text for *_, corrupt in rows],
        template=torch.tensor([t for t, *_ in rows]),
        templates=tuple(table),
        positions=positions,
        corruption=corruption,
        pad_token_id=pad,
    )


# --------------------------------------------------------------------------------------------
# External pairs
# --------------------------------------------------------------------------------------------

_REQUIRED = ("clean", "corrupt", "answer", "wrong_answer")
_ALIASES = {"wrong": "wrong_answer"}


class PairsFileError(ValueError):
    """A pairs file that `load_pairs` cannot use; the message names the file, the rows and the
    problem (missing columns, multi-token answers, clean and corrupt of unequal lengths)."""


def _read_rows(path: Path) -> tuple[list[dict], list[str], list[str]]:
    """(rows, columns found, a label per row such as "row 3" or "row 3 (line 4)")."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, labels = [], []
            for i, row in enumerate(reader, 1):
                rows.append(row)
                labels.append(f"row {i} (line {reader.line_num})")
            columns = list(reader.fieldnames or [])
        return rows, columns, labels
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8-sig")
        try:
            if suffix == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                rows = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise PairsFileError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(rows, list):
            raise PairsFileError(
                f"{path} holds a JSON {type(rows).__name__}; expected a list of objects with "
                f"the keys {', '.join(_REQUIRED)}"
            )
        columns: list[str] = []
        for row in rows:
            if isinstance(row, dict):
                columns += [k for k in row if k not in columns]
        return rows, columns, [f"row {i}" for i in range(1, len(rows) + 1)]
    raise PairsFileError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .csv")


def _check_row(
    model: HookedTransformer, row: object, keys: dict[str, str]
) -> tuple[str, dict]:
    """Validate one row: ("", parsed) when valid, else (the problem, {})."""
    if not isinstance(row, dict):
        return f"expected an object with {', '.join(_REQUIRED)}, got {type(row).__name__}", {}
    values = {}
    for name in _REQUIRED:
        value = row.get(keys[name])
        if value is None or value == "":
            return f"{name} is missing or empty", {}
        if not isinstance(value, str):
            return f"{name} {value!r} is not a string", {}
        values[name] = value
    ids = {}
    for name in ("answer", "wrong_answer"):
        what = name.replace("_", " ")
        try:
            ids[name] = single_token(model, values[name], what)
        except ValueError:
            pieces = [model.tokenizer.decode([i])
                      for i in model.tokenizer.encode(values[name], add_special_tokens=False)]
            return (f"{what} {values[name]!r} is not a single token (it tokenises to "
                    f"{len(pieces)} tokens {pieces})"), {}
    if ids["answer"] == ids["wrong_answer"]:
        return f"answer and wrong answer are the same token {values['answer']!r}", {}
    clean, corrupt = _encode(model, values["clean"]), _encode(model, values["corrupt"])
    if len(clean) != len(corrupt):
        return f"clean has {len(clean)} tokens but corrupt has {len(corrupt)}", {}
    label = row.get("template")
    return "", {
        "clean_text": values["clean"], "corrupt_text": values["corrupt"],
        "clean": clean, "corrupt": corrupt, "answer": ids["answer"], "wrong": ids["wrong_answer"],
        "template": "" if label is None else str(label),
    }


def load_pairs(path: str | Path, model: HookedTransformer, skip_invalid: bool = False) -> PromptPairs:
    """Clean/corrupt pairs from a JSON list of objects, a JSON-lines file or a CSV file.

    Each row has `clean`, `corrupt` (prompts), `answer` (correct next token of the clean
    prompt, e.g. " Mary" with its leading space) and `wrong_answer` (alias `wrong`), plus an
    optional `template` label. Texts are tokenised with the model's default BOS handling.
    A row is valid when clean and corrupt have the same number of tokens, answer and wrong
    answer are each a single token, and they differ. Rows of different lengths are
    right-padded (module docstring). Rows are numbered from 1 in file order; for CSV the
    message also gives the file line where the row ends (line 1 is the header).

    Args:
        path: a `.json`, `.jsonl` or `.csv` file.
        model: supplies the tokenizer; it is not run.
        skip_invalid: leave invalid rows out (listed in `PromptPairs.skipped`, with a warning)
            instead of raising.

    Raises:
        PairsFileError: no such file; missing columns (naming those found and those
            required); an empty file; invalid rows (each named by row number, field and
            problem) unless `skip_invalid`; no valid row at all.
    """
    _need_tokenizer(model, "tokenise prompt pairs")
    path = Path(path)
    if not path.is_file():
        raise PairsFileError(f"pairs file not found: {path}; pass an existing .json, .jsonl or "
                             ".csv file")
    rows, columns, labels = _read_rows(path)
    if not rows:
        raise PairsFileError(f"{path} has no rows; expected pairs with {', '.join(_REQUIRED)}")
    keys = {c: c for c in _REQUIRED}
    for alias, name in _ALIASES.items():
        if name not in columns and alias in columns:
            keys[name] = alias
    missing = [c for c in _REQUIRED if keys[c] not in columns]
    if missing:
        raise PairsFileError(
            f"{path} is missing column(s) {missing}; it has {columns}. Required: "
            f"{list(_REQUIRED)} ('wrong' is accepted for 'wrong_answer')."
        )

    good, invalid = [], []  # invalid: (row number, "row N ...: problem")
    for number, (label, row) in enumerate(zip(labels, rows), 1):
        problem, parsed = _check_row(model, row, keys)
        if problem:
            invalid.append((number, problem, f"{label}: {problem}"))
        else:
            good.append(parsed)
    if invalid and not skip_invalid:
        shown = "; ".join(m for _, _, m in invalid[:10])
        more = f"; ... ({len(invalid) - 10} more)" if len(invalid) > 10 else ""
        raise PairsFileError(
            f"{path}: {len(invalid)} of {len(rows)} rows are invalid: {shown}{more}. "
            "Fix those rows, or leave them out with skip_invalid=True (`--skip-invalid` in "
            "`interp run relp-ioi`)."
        )
    if not good:
        shown = "; ".join(m for _, _, m in invalid[:10])
        raise PairsFileError(f"{path}: all {len(rows)} rows are invalid: {shown}")
    if invalid:
        warnings.warn(
            f"{path}: skipped {len(invalid)} of {len(rows)} invalid rows: "
            + "; ".join(m for _, _, m in invalid[:5]) + ("; ..." if len(invalid) > 5 else ""),
            stacklevel=2,
        )

    labels_used = list(dict.fromkeys(g["template"] for g in good))
    if labels_used == [""]:
        labels_used = [path.name]
    label_id = {lab: i for i, lab in enumerate(labels_used)}
    end = torch.tensor([len(g["clean"]) - 1 for g in good])
    pad = pad_id(model)
    return PromptPairs(
        clean_tokens=_stack([g["clean"] for g in good], pad),
        corrupt_tokens=_stack([g["corrupt"] for g in good], pad),
        answer_ids=torch.tensor([g["answer"] for g in good]),
        wrong_ids=torch.tensor([g["wrong"] for g in good]),
        end_pos=end,
        clean_texts=[g["clean_text"] for g in good],
        corrupt_texts=[g["corrupt_text"] for g in good],
        template=torch.tensor([label_id.get(g["template"], 0) for g in good]),
        templates=tuple(labels_used),
        positions={"end": end.clone()},
        corruption="external",
        pad_token_id=pad,
        skipped=[(number, problem) for number, problem, _ in invalid],
    )


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _at(logits: Float[Tensor, "batch pos d_vocab"], position: Position) -> Float[Tensor, "batch d_vocab"]:
    if isinstance(position, int):
        return logits[:, position]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, position.to(logits.device)]


def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch d_vocab"],
    answer_ids: Int[Tensor, " batch"],
    wrong_ids: Int[Tensor, " batch"],
    position: Position = -1,
) -> Float[Tensor, " batch"]:
    """`logit(answer) - logit(wrong)` per prompt, read at `position`.

    Args:
        logits: full logits, or logits already taken at the prediction position (2-D; then
            `position` is ignored).
        answer_ids, wrong_ids: one token id per row.
        position: one position for all rows (-1: last column), or one per row, e.g.
            `PromptPairs.end_pos` for right-padded batches.
    """
    if logits.ndim == 3:
        logits = _at(logits, position)
    elif logits.ndim != 2:
        raise ValueError(f"logits must be [batch, pos, d_vocab] or [batch, d_vocab], got {tuple(logits.shape)}")
    if answer_ids.shape != (logits.shape[0],) or wrong_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"answer_ids {tuple(answer_ids.shape)} and wrong_ids {tuple(wrong_ids.shape)} must "
            f"have one entry per row of the logits ({logits.shape[0]})"
        )
    ids = torch.stack([answer_ids, wrong_ids], dim=1).to(logits.device, torch.long)
    picked = logits.gather(1, ids)
    return picked[:, 0] - picked[:, 1]
