"""Subject-verb agreement (SVA) prompt pairs for circuit studies.

SVA (Linzen et al. 2016; Finlayson et al. 2021, "Causal analysis of syntactic agreement
mechanisms"; Marks et al. 2024, "Sparse feature circuits"): after "The author near the dogs"
a model should continue with the verb form that agrees with the *subject* " author" (" is",
" was", " has") rather than the plural form (" are", " were", " have"), even though the
nearer noun, the *attractor* " dogs", is plural. The metric is the logit difference
`logit(correct verb) - logit(wrong verb)` at the last token, read with the same `PromptPairs`
machinery as IOI (`PromptPairs.logit_diff`, `PromptPairs.metric`).

**Templates.** `TEMPLATES` holds short noun phrases with the slots `{subj}` and (optionally)
`{attr}`, each ending right before the main verb:

=== =================================== ====================================================
id  template                            structure
=== =================================== ====================================================
0   ``The {subj}``                      simple: no attractor
1   ``The {subj} near the {attr}``      prepositional phrase (PP) with an attractor
2   ``The {subj} behind the {attr}``    PP
3   ``The {subj} next to the {attr}``   PP
4   ``The {subj} with the {attr}``      PP
5   ``The {subj} that the {attr} saw``  object relative clause (RC) across the attractor
6   ``The {subj} that the {attr} liked`` object RC
=== =================================== ====================================================

Every template is grammatical with either number in either slot: the prepositions take both,
and the embedded verb of the relative clauses, which agrees with the *attractor* and not with
the subject, is a past-tense form ("saw", "liked") that English does not inflect for number,
so the template text stays fixed whatever the attractor's number (a present-tense "like(s)"
would have to change with the attractor and would itself be an agreement cue).

**Words.** `NOUNS` are (singular, plural) pairs of mostly animate nouns, irregular plurals
included (man/men, child/children); `VERBS` are (singular, plural) verb forms: is/are,
was/were, has/have. Every noun form sits in its slot after a space and must be one token
*with* that space (" author", " authors"); every verb form must be one token with its leading
space because it is the predicted next token. Pairs where any form is not a single token of
the model's tokenizer are dropped (`sva_vocab` lists what was kept and dropped); too few left
raises a `ValueError` naming the dropped words. As in IOI, a draw whose nouns the tokenizer
merges with the neighbouring text is redrawn, so clean and corrupt prompts of a pair always
have the same number of tokens and the slots sit at the same positions.

**Pairs and the corruption** (`corruption="subject_number"`). Each row draws a template, a
subject noun, a *different* attractor noun and a verb pair:

- clean prompt: subject in the row's clean number, attractor in the *opposite* number (the
  "attractor" or incongruent condition, the hard case: "The author near the dogs");
- corrupt prompt: the same text with only the subject's number flipped ("The authors near the
  dogs"): subject and attractor now agree in number (the congruent condition);
- `answer_ids`: the verb form that agrees with the clean subject (" is"), `wrong_ids`: the
  other form (" are"). As in IOI both refer to the *clean* prompt, so the logit difference
  should be positive on clean prompts and negative on corrupt ones.

With `balanced=True` (default) half of the rows have a plural clean subject ("The authors near
the dog" -> " are" vs " is"), so a circuit cannot score by always preferring one number;
`balanced=False` makes every clean subject singular (and every attractor plural). The clean
number of a row can be read from its answer (`sva_numbers`). `positions` gives the token
position of "subj", "attr" (-1 in templates without an attractor) and "end" (the last real
token, where the verb is predicted).

**Lengths and padding** follow `interp.tasks.ioi`: templates differ in length, so a batch is
right-padded with `PromptPairs.pad_token_id` and `end_pos` holds each row's last real token.
Positions include the BOS token when the model prepends one.

**Caveats.**

- The clean (incongruent) and corrupt (congruent) prompts are not mirror images: agreement
  attraction lowers the clean logit difference, so expect `|corrupt LD| > |clean LD|` on
  attractor templates. The normalised metric (`PromptPairs.metric`) still maps the mean clean
  run to 1 and the mean corrupt run to 0.
- Flipping the subject also changes the subject token's identity (" author" vs " authors"),
  not only an abstract number feature; patching results mix both.
- Template 0 has no attractor; its next token is far from certain to be a verb (" author" can
  be followed by " of", ","...). The metric compares only the two verb forms, which is still a
  clean agreement signal, but small models are less sure there than after a longer phrase.
- Semantics is not controlled: the noun pairs are random ("The horse that the senators liked").
- A template index means the same slots at the same positions only within one template and
  one tokenizer (`PromptPairs.select(pairs.template == t)`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal, NamedTuple

from transformer_lens import HookedTransformer

from interp.tasks.ioi import (
    PromptPairs,
    _fill,
    _Filled,
    _need_tokenizer,
    _slots,
    _spacing_problems,
    pairs_from_rows,
)
from interp.tokens import single_token

__all__ = [
    "NOUNS",
    "TEMPLATES",
    "VERBS",
    "SVAVocab",
    "generate_sva",
    "sva_numbers",
    "sva_vocab",
]

Number = Literal["singular", "plural"]

#: (singular, plural) noun pairs, mostly animate; filtered per model to single tokens.
NOUNS: tuple[tuple[str, str], ...] = (
    ("author", "authors"), ("dog", "dogs"), ("teacher", "teachers"), ("doctor", "doctors"),
    ("student", "students"), ("farmer", "farmers"), ("nurse", "nurses"), ("pilot", "pilots"),
    ("lawyer", "lawyers"), ("artist", "artists"), ("singer", "singers"),
    ("officer", "officers"), ("manager", "managers"), ("driver", "drivers"),
    ("customer", "customers"), ("player", "players"), ("worker", "workers"),
    ("friend", "friends"), ("neighbor", "neighbors"), ("guard", "guards"),
    ("senator", "senators"), ("cat", "cats"), ("horse", "horses"), ("boy", "boys"),
    ("girl", "girls"), ("king", "kings"), ("soldier", "soldiers"), ("parent", "parents"),
    ("engineer", "engineers"), ("scientist", "scientists"), ("writer", "writers"),
    ("actor", "actors"), ("child", "children"), ("man", "men"), ("woman", "women"),
)

#: (singular, plural) forms of the predicted verb; filtered per model to single tokens.
VERBS: tuple[tuple[str, str], ...] = (("is", "are"), ("was", "were"), ("has", "have"))

#: Built-in templates (see the module docstring for why each is grammatical in both numbers).
TEMPLATES: tuple[str, ...] = (
    "The {subj}",
    "The {subj} near the {attr}",
    "The {subj} behind the {attr}",
    "The {subj} next to the {attr}",
    "The {subj} with the {attr}",
    "The {subj} that the {attr} saw",
    "The {subj} that the {attr} liked",
)

_SLOTS = frozenset(("subj", "attr"))
_NUMBERS: tuple[Number, Number] = ("singular", "plural")


class SVAVocab(NamedTuple):
    """Noun and verb pairs of one model: kept ones with their token ids, dropped ones."""

    nouns: list[tuple[tuple[str, int], tuple[str, int]]]
    """((singular, id of " singular"), (plural, id of " plural")) per kept noun pair."""
    verbs: list[tuple[tuple[str, int], tuple[str, int]]]
    """The same for the kept verb pairs."""
    dropped_nouns: list[tuple[str, str]]
    """Noun pairs with a form that is not one token with a leading space."""
    dropped_verbs: list[tuple[str, str]]
    """Verb pairs with a form that is not one token with a leading space."""


def _split(
    model: HookedTransformer, pairs: Sequence[tuple[str, str]], what: str
) -> tuple[list[tuple[tuple[str, int], tuple[str, int]]], list[tuple[str, str]]]:
    kept, dropped = [], []
    for pair in dict.fromkeys((str(a).strip(), str(b).strip()) for a, b in pairs):
        if pair[0] == pair[1]:
            raise ValueError(f"{what} pair {pair} has the same singular and plural form")
        try:
            ids = [single_token(model, " " + w, what) for w in pair]
        except ValueError:
            dropped.append(pair)
            continue
        kept.append(((pair[0], ids[0]), (pair[1], ids[1])))
    return kept, dropped


def sva_vocab(
    model: HookedTransformer,
    nouns: Sequence[tuple[str, str]] | None = None,
    verbs: Sequence[tuple[str, str]] | None = None,
) -> SVAVocab:
    """The noun and verb pairs (default `NOUNS`, `VERBS`) whose singular and plural forms are
    both single tokens of `model` with a leading space, and those dropped."""
    _need_tokenizer(model, "check SVA words")
    noun_kept, noun_dropped = _split(model, NOUNS if nouns is None else nouns, "noun")
    verb_kept, verb_dropped = _split(model, VERBS if verbs is None else verbs, "verb")
    return SVAVocab(noun_kept, verb_kept, noun_dropped, verb_dropped)


def _require(model: HookedTransformer, kept: list, dropped: list, what: str, need: int, why: str) -> None:
    if len(kept) < need:
        shown = ", ".join("/".join(p) for p in dropped[:10]) + (", ..." if len(dropped) > 10 else "")
        raise ValueError(
            f"Only {len(kept)} of {len(kept) + len(dropped)} {what} pairs have both forms as "
            f"single tokens of {model.cfg.model_name} with a leading space; {why} needs at "
            f"least {need}. Dropped (not single tokens): {shown or 'none'}."
        )


def _check_template(template: str) -> None:
    slots = _slots(template)
    problems = []
    unknown = sorted(set(slots) - _SLOTS)
    if unknown:
        problems.append(f"unknown slot(s) {unknown} (allowed: subj, attr)")
    if slots.count("subj") != 1:
        problems.append(f"{{subj}} must occur exactly once (found {slots.count('subj')})")
    if slots.count("attr") > 1:
        problems.append(f"{{attr}} may occur at most once (found {slots.count('attr')})")
    problems += _spacing_problems(template)
    if problems:
        raise ValueError(f"bad SVA template {template!r}: " + "; ".join(problems))


def generate_sva(
    model: HookedTransformer,
    n: int,
    seed: int = 0,
    templates: Sequence[int] | Sequence[str] | None = None,
    balanced: bool = True,
    nouns: Sequence[tuple[str, str]] | None = None,
    verbs: Sequence[tuple[str, str]] | None = None,
) -> PromptPairs:
    """`n` subject-verb agreement prompt pairs for `model`, deterministic for a given seed.

    Each row takes a (template, clean number) combination, every pass through the
    combinations in a freshly shuffled order (so any `n >= 2 * len(templates)` uses every
    template with both clean numbers when `balanced`), then draws a subject noun, a different
    attractor noun and a verb pair. The clean prompt has the subject in the clean number and
    the attractor in the opposite one; the corrupt prompt flips only the subject's number
    (module docstring). Draws whose nouns the tokenizer merges with their neighbours are
    redrawn.

    Args:
        model: supplies the tokenizer and BOS convention; it is not run.
        n: number of pairs.
        seed: seed of the draws (Python's `random.Random`, the same on every platform).
        templates: ids into `TEMPLATES`, or template strings with the slot {subj} and
            optionally {attr} (each after a space, ending right before the verb); default
            all of `TEMPLATES`.
        balanced: half the clean subjects plural (True) or all singular (False).
        nouns, verbs: (singular, plural) word pairs (no leading space) replacing `NOUNS`,
            `VERBS`; only pairs whose forms are all single tokens with a leading space are used.

    Returns:
        `PromptPairs` with `positions` "subj", "attr" (-1 where the template has none) and
        "end"; `corruption` "subject_number"; `template` indexes `TEMPLATES` (or the given
        template strings); `answer_ids`/`wrong_ids` the verb forms agreeing/disagreeing with
        the clean subject.

    Raises:
        ValueError: bad template, `n < 1`, a model without tokenizer, or too few single-token
            noun or verb pairs (the message gives the counts and the dropped words).
    """
    _need_tokenizer(model, "build SVA prompts")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if templates is None:
        table, pool = TEMPLATES, list(range(len(TEMPLATES)))
    elif len(templates) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in templates):
        bad = [t for t in templates if not 0 <= t < len(TEMPLATES)]
        if bad:
            raise ValueError(f"template ids {bad} out of range 0..{len(TEMPLATES) - 1}")
        table, pool = TEMPLATES, list(dict.fromkeys(templates))
    elif len(templates) > 0 and all(isinstance(t, str) for t in templates):
        table = tuple(dict.fromkeys(templates))
        pool = list(range(len(table)))
    else:
        raise ValueError("templates must be a non-empty list of template ids or of template strings")
    for t in pool:
        _check_template(table[t])

    vocab = sva_vocab(model, nouns, verbs)
    with_attr = any("attr" in _slots(table[t]) for t in pool)
    need = 2 if with_attr else 1
    _require(model, vocab.nouns, vocab.dropped_nouns, "noun", need,
             "a template with {attr} (subject and attractor differ)" if with_attr else "SVA")
    _require(model, vocab.verbs, vocab.dropped_verbs, "verb", 1, "SVA")

    numbers = _NUMBERS if balanced else _NUMBERS[:1]
    combos = [(t, k) for t in pool for k in range(len(numbers))]
    rng = random.Random(seed)
    order: list[tuple[int, int]] = []
    while len(order) < n:
        batch = list(combos)
        rng.shuffle(batch)
        order += batch
    order = order[:n]

    # template, answer id, wrong id, clean, corrupt
    rows: list[tuple[int, int, int, _Filled, _Filled]] = []
    for t, k in order:  # k: index of the clean subject's number (0 singular, 1 plural)
        for _attempt in range(100):
            subj, *attr = rng.sample(vocab.nouns, need)
            verb = rng.choice(vocab.verbs)
            common = {"attr": attr[0][1 - k]} if attr else {}
            clean = _fill(model, table[t], {"subj": subj[k], **common})
            corrupt = _fill(model, table[t], {"subj": subj[1 - k], **common})
            if clean and corrupt and len(clean.ids) == len(corrupt.ids) \
                    and clean.positions == corrupt.positions:
                rows.append((t, verb[k][1], verb[1 - k][1], clean, corrupt))
                break
        else:
            raise ValueError(
                f"template {table[t]!r}: in 100 draws the tokenizer of {model.cfg.model_name} "
                "never kept the subject and attractor as their own tokens (it merges them with "
                "the neighbouring text); reword the template"
            )

    return pairs_from_rows(model, rows, table, ("subj", "attr"), "subject_number")


def sva_numbers(
    pairs: PromptPairs, model: HookedTransformer, verbs: Sequence[tuple[str, str]] | None = None
) -> list[Number]:
    """Per row, the clean subject's number ("singular" or "plural"), read from its answer
    verb (the verb pairs `generate_sva` used; default `VERBS`)."""
    vocab = sva_vocab(model, nouns=(), verbs=verbs)
    number: dict[int, Number] = {}
    for sg, pl in vocab.verbs:
        number[sg[1]], number[pl[1]] = "singular", "plural"
    unknown = sorted({int(a) for a in pairs.answer_ids.tolist()} - set(number))
    if unknown:
        raise ValueError(f"answer ids {unknown} are not verb forms of {list(VERBS if verbs is None else verbs)}")
    return [number[int(a)] for a in pairs.answer_ids.tolist()]
