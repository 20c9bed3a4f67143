"""Tests for interp.judges.introspection on hand-written transcripts.

Each transcript's expected verdicts are written by hand from the paper's judge criteria (claim
before or along with the concept, not after it; concept as first word is NO; negations NO;
whole words, plural and stem count)."""

from __future__ import annotations

import math

import pytest

from interp.judges import introspection as I
from interp.judges.base import wilson_interval

# (answer, concept, claims_detection, identifies)
TRANSCRIPTS = [
    # plain affirmative claims
    ("Yes", "apple", True, False),
    ("Yes, I detect an injected thought. It seems to be about apples.", "apple", True, True),
    ("I notice something unusual about my thoughts.", "apple", True, False),
    ("I think I detect an injected thought about... apples?", "apple", True, True),
    ("There is an unusual thought in my mind, and it is about the ocean.", "ocean", True, True),
    ("I find myself being drawn to the idea of apples.", "apple", True, True),
    ("I am experiencing an unusual thought related to dancing.", "dance", True, True),  # stem
    ("Do I detect an injected thought? Yes, it is about bread.", "bread", True, True),
    # claim then concept, concept in plural and with a capital letter
    ("I do detect something. The thought is about Apples.", "apple", True, True),
    ("Yes, I sense a thought about berries.", "berry", True, True),  # -ies plural
    # negations
    ("I do not detect an injected thought.", "apple", False, False),
    ("No, I don't notice anything unusual.", "apple", False, False),
    ("No. I detect nothing unusual.", "apple", False, False),
    ("I don't think I detect anything.", "apple", False, False),
    ("I'm not sure I sense anything about apples.", "apple", False, False),
    ("There is no injected thought here.", "apple", False, False),
    ("I am unable to detect any injected thought.", "apple", False, False),
    ("I do not have thoughts or mental states, so I cannot detect injected thoughts.",
     "apple", False, False),
    ("Yes, I do not detect anything.", "apple", False, False),
    ("I detect no injected thought about apples.", "apple", False, False),
    ("I notice that I am not experiencing any injected thought.", "apple", False, False),
    ("Not that I notice.", "apple", False, False),
    ("I'm detecting something. I notice that there is an odd thought about apples.", "apple",
     True, True),
    # concept before the claim
    ("Apples. I detect an injected thought about apples.", "apple", False, False),
    ("apple", "apple", False, False),
    ("I'm thinking about apples. Yes, I notice an injected thought.", "apple", False, False),
    ("I do not detect any apples. No wait, actually, I do notice something. The thought is "
     + "about apples.", "apple", False, False),
    # concept inside another word is no mention
    ("Yes, I detect an injected thought about a category of things.", "cat", True, False),
    ("Categories. I notice an injected thought about cats.", "cat", True, True),
    # claim, then a different concept; then a negated mention
    ("Yes, I notice an injected thought about the sea.", "apple", True, False),
    ("Yes, I detect an injected thought, but it is not about apples.", "apple", True, False),
    # not claims: a question, an unrelated "I have", degenerate text
    ("Do you detect an injected thought?", "apple", False, False),
    ("I have a question about apples.", "apple", False, False),
    ("violent crash violent violent violent", "violence", False, False),
    ("Yes yes yes yes", "apple", False, False),
]


@pytest.mark.parametrize("text,word,claims,ident", TRANSCRIPTS)
def test_hand_written_transcripts(text, word, claims, ident):
    assert I.claims_detection(text, word) is claims
    assert I.identifies(text, word) is ident


def test_mentions_whole_words_plural_and_stem():
    text = "The category of cats, a cat's toy, catalogues, and dancing apples."
    starts = I.concept_mentions(text, "cat")
    assert [text[s:s + 4] for s in starts] == ["cats", "cat'"]
    assert [text[s:s + 7] for s in I.concept_mentions(text, "dance")] == ["dancing"]
    assert I.concept_mentions(text, "apple") == [text.index("apples")]
    assert I.concept_mentions("Golden Gate Bridge views", "golden gate bridge") == [0]
    assert I.concept_mentions("a red fruit", "apple", related=["fruit"]) == [6]


def test_claims_without_concept_and_related_words():
    assert I.claims_detection("I detect an unusual thought.")
    assert not I.claims_detection("I detect nothing.")
    # a related word said first counts like the concept itself
    assert not I.claims_detection("Fruit! I notice an injected thought.", "apple", ["fruit"])
    assert I.identifies("I notice an injected thought about fruit.", "apple", ["fruit"])


def test_find_claim_reports_where_the_claim_starts():
    claim = I.find_claim("Hmm. I think I detect a thought about apples.")
    assert claim is not None and not claim.negated
    assert claim.phrase == "I detect"
    assert I.find_claim("I do not notice anything.") is None
    there = I.find_claim("There seems to be an unusual thought.")
    assert there is not None and there.phrase == "There seems to be an unusual"


@pytest.mark.parametrize("text,word,expected", [
    (" apples.", "apple", True),
    (" the concept of dancing", "dance", True),
    (" something cold, like ice.", "apple", False),
    (" a category of objects", "cat", False),
    (" not apples, but pears.", "apple", False),
    (" apple apple apple apple", "apple", False),  # degenerate
    ("Yes, I detect an injected thought. The thought is about cats.", "cat", True),  # prefill kept
])
def test_forced_identification(text, word, expected):
    assert I.forced_identifies(text, word) is expected


def test_degenerate_text():
    assert I.is_degenerate("word word word")
    assert I.is_degenerate("a b a b a b a b a b")  # 10 words, 2 distinct
    assert not I.is_degenerate("Yes, I notice an injected thought about the ocean.")


@pytest.mark.unchecked
def test_trial_validation():
    with pytest.raises(ValueError, match="trial_type"):
        I.IntrospectionTrial("Yes", "apple", "inject")
    with pytest.raises(ValueError, match="concept"):
        I.IntrospectionTrial("Yes", None, "injection")
    assert I.IntrospectionTrial("x", "apple", "forced_identification").trial_type == "forced"


def test_judge_introspection_metrics_match_hand_counts(tmp_path):
    T = I.IntrospectionTrial
    trials = [
        # injection: 3 claims (2 identify), 1 no claim
        T("Yes, I detect an injected thought about apples.", "apple", "injection"),
        T("I notice an unusual thought. It is about the ocean.", "ocean", "injection"),
        T("I notice an injected thought about bread.", "apple", "injection"),
        T("I do not detect an injected thought.", "bread", "injection"),
        # control: 1 false alarm of 3
        T("No, I don't detect anything.", None, "control"),
        T("I detect an injected thought.", None, "control"),
        T("Nothing unusual here.", "apple", "control"),
        # forced: 1 of 2
        T(" apples, I think.", "apple", "forced"),
        T(" the weather.", "apple", "forced"),
    ]
    res = I.judge_introspection(trials)
    expected = {
        "detection_hit_rate": (3, 4),
        "detection_false_alarm_rate": (1, 3),
        "detection_accuracy": (3 + 2, 7),
        "identification_accuracy_given_claim": (2, 3),
        "combined_detection_and_identification_rate": (2, 4),
        "forced_identification_accuracy": (1, 2),
    }
    for name, (k, n) in expected.items():
        rate = res.rates[name]
        assert (rate.k, rate.n) == (k, n), name
        assert rate.ci95 == pytest.approx(wilson_interval(k, n))
    assert res.rate == pytest.approx(3 / 4)
    assert res.stats == {"n_injection": 4, "n_control": 3, "n_forced": 2}
    assert [it["claims_detection"] for it in res.items] == [True, True, True, False, False, True,
                                                            False, True, True]
    res.save(tmp_path / "intro")
    again = type(res).load(tmp_path / "intro")
    assert again.items == res.items and again.rates == res.rates


def test_no_trials_of_a_kind_gives_nan_rate():
    res = I.judge_introspection([I.IntrospectionTrial("Yes", "apple", "injection")])
    forced = res.rates["forced_identification_accuracy"]
    assert forced.n == 0 and math.isnan(forced.rate)
    assert res.summary()["rates"]["forced_identification_accuracy"]["rate"] is None
