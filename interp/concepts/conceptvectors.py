"""The ConceptVectors benchmark's data (Hong et al., arXiv 2406.11614) and the knowledge filter.

The data set (`../shared/data/conceptvectors/`, see its README) ships, per source model
(LLaMA-2-7B-chat, OLMo-7B), a dev file of concepts. Each concept is a dict with

- `Concept`: its name ("Poland");
- `QA`: ten questions about it; `unrelated_QA`: fifty questions about other things;
- `text_completion`: paragraphs split into `First_half` / `Second_half`;
- `wikipedia_content`: the concept's Wikipedia article.

`load_concepts` merges the two files (28 distinct concepts; the LLaMA file first, a concept in
both is taken once). `german_questions` reads the German jailbreak questions, keyed by concept.

**Does the model know the concept?** The paper picks concepts the 7B models know; a 135M model
knows far fewer, so a study must filter, not assume. `knowledge_score` is our own, documented
rule (the paper gives none for new models): the mean over questions of the share of an answer's
*content words* that occur in the concept's article. Content words are lowercased alphabetic
words of at least 3 letters that are neither scikit-learn English stop words nor words of the
question or of the concept's name (so that echoing the question earns nothing). An answer
without content words scores 0. It is a cheap lexical proxy: a fluent answer that is right but
worded unlike the article scores low, and one that copies article vocabulary while wrong scores
high, so read the answers behind a threshold before trusting it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence, Set
from typing import Any

from interp.concepts.parametric import stop_words
from interp.data import data_file

#: The dev files, in the order they are merged.
CONCEPT_FILES = ("llama2-7b_concepts_dev.json", "olmo-7b_concepts_dev.json")
#: The German jailbreak questions (concept -> questions).
GERMAN_FILES = ("llama_jailbreak_German_qa.json", "olmo_jailbreak_German_qa.json")

_WORD = re.compile(r"[A-Za-z]{3,}")


class UnknownConceptError(ValueError):
    """A concept name that the ConceptVectors dev files do not have; the message lists them."""


def load_concepts(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The 28 dev concepts (LLaMA file, then the OLMo file's new ones), or only `names`, in
    that order.

    Raises:
        UnknownConceptError: a name is not a dev concept (the message lists the known ones).
    """
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for f in CONCEPT_FILES:
        for c in json.loads(data_file(f"conceptvectors/{f}").read_text()):
            if c["Concept"] not in seen:
                seen.add(c["Concept"])
                items.append(c)
    if names is None:
        return items
    by = {c["Concept"]: c for c in items}
    missing = [n for n in names if n not in by]
    if missing:
        raise UnknownConceptError(f"unknown concept(s) {missing}; known: {', '.join(by)}")
    return [by[n] for n in names]


def german_questions() -> dict[str, list[str]]:
    """Concept name -> its German jailbreak questions (the first file that has it wins)."""
    out: dict[str, list[str]] = {}
    for f in GERMAN_FILES:
        for k, v in json.loads(data_file(f"conceptvectors/{f}").read_text()).items():
            out.setdefault(k, [q.strip() for q in v])
    return out


def content_words(text: str, exclude: Set[str] = frozenset()) -> list[str]:
    """The lowercased alphabetic words of >= 3 letters in `text` that are not stop words and
    not in `exclude` (lowercase), in order, repeats kept."""
    stop = stop_words()
    return [w for w in (m.lower() for m in _WORD.findall(text)) if w not in stop and w not in exclude]


def knowledge_score(answers: Sequence[str], questions: Sequence[str], concept: str,
                    article: str) -> float:
    """Mean over (answer, question) of the share of the answer's content words that occur in
    `article` (module docstring); 0 for no answers.

    Raises:
        ValueError: `answers` and `questions` differ in length.
    """
    if len(answers) != len(questions):
        raise ValueError(f"knowledge_score: {len(answers)} answers for {len(questions)} questions; "
                         "pass one answer per question")
    vocab = {w.lower() for w in _WORD.findall(article)}
    scores = []
    for a, q in zip(answers, questions):
        exclude = {w.lower() for w in _WORD.findall(q + " " + concept)}
        words = content_words(a, exclude)
        scores.append(sum(w in vocab for w in words) / len(words) if words else 0.0)
    return sum(scores) / len(scores) if scores else 0.0
