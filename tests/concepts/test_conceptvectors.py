"""The ConceptVectors data loader and the knowledge filter, against hand counts."""

from __future__ import annotations

import pytest

from interp.concepts import conceptvectors as CV


def test_knowledge_score_by_hand():
    article = "Warsaw is the capital of Poland. The Vistula river flows north."
    answers = ["The capital is Warsaw, by the Vistula.", "It is Berlin, famous for beer."]
    questions = ["What is the capital of Poland?", "Which city?"]
    # content words: answer 1 -> warsaw, vistula ('capital' is in the question; 'the', 'is',
    # 'by' are stop words or too short) -> 2/2 in the article; answer 2 -> berlin, famous,
    # beer -> 0/3
    assert CV.knowledge_score(answers, questions, "Poland", article) == pytest.approx(0.5)
    assert CV.knowledge_score(["the of and"], ["q"], "x", article) == 0.0
    assert CV.knowledge_score([], [], "x", article) == 0.0


def test_content_words_by_hand():
    assert CV.content_words("The Vistula flows past Warsaw and Krakow", {"warsaw"}) == [
        "vistula", "flows", "past", "krakow"]


def test_knowledge_score_length_mismatch():
    with pytest.raises(ValueError, match="2 answers for 1 questions"):
        CV.knowledge_score(["a", "b"], ["q"], "x", "text")


def test_load_concepts_merges_both_files_once():
    concepts = CV.load_concepts()
    names = [c["Concept"] for c in concepts]
    assert len(names) == len(set(names)) == 28
    for c in concepts:
        assert {"Concept", "QA", "unrelated_QA", "text_completion", "wikipedia_content"} <= set(c)
    picked = CV.load_concepts(["Poland", names[0]])
    assert [c["Concept"] for c in picked] == ["Poland", names[0]]


def test_unknown_concept_lists_known():
    with pytest.raises(CV.UnknownConceptError, match=r"unknown concept\(s\) \['Atlantis'\]; known: .*Poland"):
        CV.load_concepts(["Atlantis"])
