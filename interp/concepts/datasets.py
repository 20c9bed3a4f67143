"""Binary concept data sets: the six Concept Depth sets, and any CSV / JSON / JSONL table.

Every loader returns a `ConceptDataset`: texts, binary labels (1 = the concept holds: true,
positive, yes) and the names of the two labels. Files are read from `interp.data.data_dir()`
(`../shared/data/concept_depth/`, see its README for sources and licences); nothing is copied.

The six sets of "Exploring Concept Depth" (Jin et al. 2024), as the authors' code reads them:

| name | file | text | label 1 / label 0 |
|---|---|---|---|
| `cities` | `cities.csv` | `statement` | `label` 1 / 0 (true / false statement) |
| `common_claim` | `common_claim.csv` | `examples` | `label` "True" / "False"; "Neither" rows are dropped |
| `counterfact` | `counterfact.csv` | `statement` | `label` 1 / 0 |
| `strategyqa` | `StrategyQA_task.json` | `input` + " " + `target` without its leading "Yes."/"No." | `target_scores` Yes / No |
| `coinflip` | `coin_flip.json` | `question` | `answer` "yes" / "no" |
| `sst2` | `stsa.binary.train` (`split="test"`: `.test`) | the sentence | leading 1 (positive) / 0 |

StrategyQA follows the authors' construction: the question followed by the supporting facts of
the reference answer (the facts often give the answer away; that is the paper's setting).

`PROMPTS` holds one instruction per set in the paper's layout (the instruction before the text for
cities, common_claim, counterfact and StrategyQA, after it for SST-2 and coinflip); the wording
is ours. `ConceptDataset.prompted()` applies it. `add_noise` is the paper's input perturbation.

`load_table(path, text_col, label_col)` reads any table, so a new data set needs no code. Labels
must be binary: two distinct values, mapped to 0/1 by their meaning where it is recognised
(false/true, no/yes, negative/positive, 0/1), otherwise by `positive=` or sorted order; more
than two values need `label_map=` (values outside it are an error unless `drop_unmapped=True`).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from interp.data import data_dir

__all__ = [
    "CONCEPT_DEPTH",
    "PROMPTS",
    "ConceptDataset",
    "DatasetError",
    "add_noise",
    "load_dataset",
    "load_table",
]


class DatasetError(ValueError):
    """A data file is missing, lacks a column, or its labels are not binary."""


@dataclass(frozen=True)
class ConceptDataset:
    """Texts with binary labels.

    Attributes:
        name: short name (`cities`, or the file stem for tables).
        texts: the examples.
        labels: 0/1 per text; 1 means the concept holds.
        label_names: (name of 0, name of 1), the raw values they came from.
        source: where the data was read from.
        info: how it was read (dropped rows, subsampling...).
    """

    name: str
    texts: list[str]
    labels: list[int]
    label_names: tuple[str, str] = ("0", "1")
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DatasetError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        bad = sorted({l for l in self.labels if l not in (0, 1)}, key=str)
        if bad:
            raise DatasetError(f"{self.name}: labels must be 0/1, got {bad[:5]}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def counts(self) -> tuple[int, int]:
        """(number of 0 labels, number of 1 labels)."""
        ones = sum(self.labels)
        return len(self.labels) - ones, ones

    def subsample(self, n: int | None, seed: int = 0, balanced: bool = True) -> ConceptDataset:
        """`n` examples drawn with `seed`, in a shuffled order.

        Balanced: `n // 2` of each class (the remainder goes to the larger class), capped by
        what each class has, so the result can be smaller than `n`; otherwise a uniform draw.
        `n=None` or `n >= len` with `balanced=False` keeps everything (shuffled).
        """
        rng = random.Random(seed)
        index = list(range(len(self)))
        if n is not None and n < 1:
            raise DatasetError(f"subsample size must be >= 1, got {n}")
        if balanced and n is not None:
            by_class = {c: [i for i in index if self.labels[i] == c] for c in (0, 1)}
            for c in (0, 1):
                rng.shuffle(by_class[c])
            small = min(by_class, key=lambda c: len(by_class[c]))
            take_small = min(len(by_class[small]), n // 2)
            take_large = min(len(by_class[1 - small]), n - take_small)
            chosen = by_class[small][:take_small] + by_class[1 - small][:take_large]
        else:
            chosen = index[:]
            rng.shuffle(chosen)
            chosen = chosen[:n] if n is not None else chosen
        rng.shuffle(chosen)
        info = dict(self.info, subsample={"n": n, "seed": seed, "balanced": balanced,
                                          "from": len(self)})
        return replace(self, texts=[self.texts[i] for i in chosen],
                       labels=[self.labels[i] for i in chosen], info=info)

    def prompted(self, template: str | None = None) -> ConceptDataset:
        """Each text placed into `template` (a string with `{text}`; default `PROMPTS[name]`)."""
        template = template if template is not None else PROMPTS.get(self.name)
        if template is None:
            raise DatasetError(f"no prompt for {self.name!r}; pass a template with {{text}}")
        if "{text}" not in template:
            raise DatasetError(f"the prompt template must contain {{text}}: {template!r}")
        return replace(self, texts=[template.replace("{text}", t) for t in self.texts],
                       info=dict(self.info, prompt=template))

    def with_noise(self, seed: int = 0) -> ConceptDataset:
        """`add_noise` applied to every text."""
        return replace(self, texts=add_noise(self.texts, seed),
                       info=dict(self.info, noise={"kind": "aaa/bbb prefix", "seed": seed}))


#: Instruction per data set, in the paper's layout (instruction first, or text first); our wording.
PROMPTS: dict[str, str] = {
    "cities": "Is the following statement true or false? {text}",
    "common_claim": "Is the following statement true or false? {text}",
    "counterfact": "Is the following statement true or false? {text}",
    "strategyqa": "Decide whether the answer to this question is yes or no. {text}",
    "coinflip": "{text} Given these flips, is the coin still heads up? Answer yes or no.",
    "sst2": "{text} Is the sentiment of this movie review positive or negative?",
}


def add_noise(texts: Sequence[str], seed: int = 0) -> list[str]:
    """Prefix each text with "aaa" or "bbb" (chosen at random per text, seeded).

    The input perturbation of the Concept Depth code: three copies of a random letter from
    {a, b} glued to the start of the text, which disturbs the first word's tokenisation and
    adds a meaningless token or two. Deterministic for a given seed.
    """
    rng = random.Random(seed)
    return [rng.choice("ab") * 3 + t for t in texts]


# --------------------------------------------------------------------------------------------
# Generic tables
# --------------------------------------------------------------------------------------------

_NEGATIVE = {"0", "false", "no", "negative", "neg", "f", "n"}
_POSITIVE = {"1", "true", "yes", "positive", "pos", "t", "y"}


def _label_key(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _read_rows(path: Path, records_key: str | None) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}: line {i + 1} is not JSON ({exc})") from exc
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            if records_key is None:
                lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
                if len(lists) != 1:
                    raise DatasetError(
                        f"{path} is a JSON object; pass records_key= naming its list of records "
                        f"(keys with lists of records: {lists or 'none'})"
                    )
                records_key = lists[0]
            if records_key not in data:
                raise DatasetError(f"{path} has no key {records_key!r}; keys: {list(data)[:10]}")
            data = data[records_key]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DatasetError(f"{path} must hold a list of records (objects)")
        return data
    raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json or .jsonl")


def _one_class_error(where: str, label_col: str, value: str) -> DatasetError:
    """The error for a data set whose rows all carry one class: a probe needs both."""
    return DatasetError(
        f"{where}: every row has the label {value!r} in column {label_col!r}, so there is one "
        "class only; a probe needs examples of both classes: use a file with both labels (or "
        "another --label-col / label_map)"
    )


def _binarise(raw: list[str], label_col: str, where: str, positive: str | None,
              label_map: Mapping[Any, int] | None) -> tuple[list[int], tuple[str, str]]:
    values = sorted(set(raw))
    if label_map is not None:
        mapping = {_label_key(k): int(v) for k, v in label_map.items()}
        if set(mapping.values()) - {0, 1}:
            raise DatasetError(f"label_map values must be 0 or 1, got {sorted(set(mapping.values()))}")
        names = ["/".join(k for k, v in mapping.items() if v == c) for c in (0, 1)]
        labels = [mapping[v] for v in raw]
        if len(set(labels)) < 2:
            raise _one_class_error(where, label_col, names[labels[0]] if labels else "(none)")
        return labels, (names[0], names[1])
    if len(values) == 1:
        raise _one_class_error(where, label_col, values[0])
    if len(values) != 2:
        shown = values[:10] + (["..."] if len(values) > 10 else [])
        raise DatasetError(
            f"{where}: column {label_col!r} must be binary (two distinct values) but has "
            f"{len(values)}: {shown}; pass label_map={{value: 0 or 1}} (with drop_unmapped=True "
            "to drop the other rows)"
        )
    if positive is not None:
        positive = _label_key(positive)
        if positive not in values:
            raise DatasetError(f"{where}: positive={positive!r} is not a label; labels: {values}")
        pos = positive
    else:
        low = {v: v.lower() for v in values}
        recognised = [v for v in values if low[v] in _POSITIVE]
        if len(recognised) == 1 and low[[v for v in values if v != recognised[0]][0]] in _NEGATIVE:
            pos = recognised[0]
        else:
            pos = values[1]  # sorted order: documented fallback
    neg = next(v for v in values if v != pos)
    return [int(v == pos) for v in raw], (neg, pos)


def load_table(
    path: str | Path,
    text_col: str,
    label_col: str,
    positive: str | None = None,
    label_map: Mapping[Any, int] | None = None,
    drop_unmapped: bool = False,
    records_key: str | None = None,
    name: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    balanced: bool = True,
) -> ConceptDataset:
    """Read texts and binary labels from a CSV, TSV, JSON or JSONL file.

    Args:
        path: the file (`.csv`, `.tsv`, `.json` with a list of records or an object holding
            one, `.jsonl` with one record per line).
        text_col: the column (key) with the text.
        label_col: the column with the label.
        positive: the raw label value that becomes 1 (default: recognised by meaning, else
            the larger in sorted order).
        label_map: `{raw value: 0 or 1}` for columns with more than two values.
        drop_unmapped: with `label_map`, drop rows whose label is not in it (else an error).
        records_key: for a JSON object, the key of its list of records (found automatically
            when there is exactly one).
        name: the data set's name (default the file stem).
        limit, seed, balanced: subsample to `limit` examples (see `ConceptDataset.subsample`).

    Raises:
        DatasetError: the file does not exist or cannot be read; a column is missing (the
            message lists the columns there are); an empty text; labels that are not binary.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    rows = _read_rows(path, records_key)
    if not rows:
        raise DatasetError(f"{path} has no rows")
    for col, what in ((text_col, "text"), (label_col, "label")):
        missing = [i for i, r in enumerate(rows) if col not in r]
        if missing:
            columns = list(rows[missing[0]].keys())
            raise DatasetError(
                f"{path}: the {what} column {col!r} is missing (first in row {missing[0]}); "
                f"columns there: {columns}"
            )
    texts, raw = [], []
    dropped = 0
    mapping = {_label_key(k) for k in label_map} if label_map is not None else None
    for i, r in enumerate(rows):
        label = _label_key(r[label_col])
        if mapping is not None and label not in mapping:
            if drop_unmapped:
                dropped += 1
                continue
            raise DatasetError(
                f"{path}: row {i} has label {label!r}, which label_map does not map; "
                f"mapped: {sorted(mapping)} (pass drop_unmapped=True to drop such rows)"
            )
        text = r[text_col]
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{path}: row {i} has an empty or non-text {text_col!r}: {text!r}")
        texts.append(text)
        raw.append(label)
    labels, names = _binarise(raw, label_col, str(path), positive, label_map)
    ds = ConceptDataset(name=name or path.stem, texts=texts, labels=labels, label_names=names,
                        source=str(path), info={"text_col": text_col, "label_col": label_col,
                                                "dropped_rows": dropped})
    return ds.subsample(limit, seed, balanced) if limit is not None else ds


# --------------------------------------------------------------------------------------------
# The Concept Depth data sets
# --------------------------------------------------------------------------------------------


def _strategyqa(path: Path) -> tuple[list[str], list[int], tuple[str, str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    texts, labels = [], []
    for i, ex in enumerate(data.get("examples", [])):
        scores = ex.get("target_scores", {})
        if scores.get("Yes") == scores.get("No"):
            raise DatasetError(f"{path}: example {i} has no single answer: {scores}")
        facts = ex.get("target", "")
        for prefix in ("Yes.", "No."):
            if facts.startswith(prefix):
                facts = facts[len(prefix):].strip()
        texts.append(f"{ex['input']} {facts}".strip())
        labels.append(int(scores.get("Yes") == 1))
    return texts, labels, ("No", "Yes")


def _sst2(path: Path) -> tuple[list[str], list[int], tuple[str, str]]:
    texts, labels = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        label, _, sentence = line.strip().partition(" ")
        if label not in ("0", "1") or not sentence:
            raise DatasetError(f"{path}: line {i + 1} is not '<0|1> <sentence>': {line[:60]!r}")
        texts.append(sentence)
        labels.append(int(label))
    return texts, labels, ("negative", "positive")


#: name -> (file, how to read it). Table entries are `load_table` keyword arguments.
CONCEPT_DEPTH: dict[str, dict[str, Any]] = {
    "cities": {"file": "cities.csv", "text_col": "statement", "label_col": "label", "positive": "1"},
    "common_claim": {"file": "common_claim.csv", "text_col": "examples", "label_col": "label",
                     "label_map": {"True": 1, "False": 0}, "drop_unmapped": True},
    "counterfact": {"file": "counterfact.csv", "text_col": "statement", "label_col": "label",
                    "positive": "1"},
    "strategyqa": {"file": "StrategyQA_task.json", "reader": _strategyqa},
    "coinflip": {"file": "coin_flip.json", "text_col": "question", "label_col": "answer",
                 "positive": "yes", "records_key": "examples"},
    "sst2": {"file": "stsa.binary.train", "reader": _sst2},
}
_ALIASES = {"common": "common_claim", "commonclaim": "common_claim", "coin_flip": "coinflip",
            "stsa": "sst2", "sst-2": "sst2", "sst_2": "sst2"}


def load_dataset(name: str, limit: int | None = None, seed: int = 0, balanced: bool = True,
                 split: str = "train") -> ConceptDataset:
    """One of the six Concept Depth data sets (see the module docstring), labels 0/1.

    Args:
        name: `cities`, `common_claim`, `counterfact`, `strategyqa`, `coinflip` or `sst2`
            (case-insensitive; `common`, `coin_flip`, `stsa` also work).
        limit, seed, balanced: subsample to `limit` examples (see `ConceptDataset.subsample`).
        split: SST-2 only: `"train"` (the paper's file) or `"test"`.

    Raises:
        DatasetError: an unknown name (the message lists the known ones); the file is missing
            from the data directory (the message names the path and `INTERP_DATA_DIR`).
    """
    key = name.lower().replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in CONCEPT_DEPTH:
        raise DatasetError(f"unknown data set {name!r}; known: {', '.join(CONCEPT_DEPTH)} "
                           "(or use load_table(path, text_col, label_col) for your own file)")
    spec = dict(CONCEPT_DEPTH[key])
    file = spec.pop("file")
    if key == "sst2":
        if split not in ("train", "test"):
            raise DatasetError(f"SST-2 split must be 'train' or 'test', got {split!r}")
        file = f"stsa.binary.{split}"
    elif split != "train":
        raise DatasetError(f"{key} has one split only; split={split!r} applies to sst2")
    path = data_dir() / "concept_depth" / file
    if not path.is_file():
        raise DatasetError(f"data file for {key!r} not found: {path} (set INTERP_DATA_DIR to the "
                           "folder holding concept_depth/, see ../shared/data/README.md)")
    reader = spec.pop("reader", None)
    if reader is None:
        ds = load_table(path, name=key, **spec)
    else:
        texts, labels, names = reader(path)
        ds = ConceptDataset(name=key, texts=texts, labels=labels, label_names=names, source=str(path))
    return ds.subsample(limit, seed, balanced) if limit is not None else ds
