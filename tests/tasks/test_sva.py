"""interp.tasks.sva: subject-verb agreement prompt pairs.

Checks read the prompts back as text (the subject is the word after the initial "The", the
attractor the word after the inner "the"), re-tokenise them with the model, decode answer
tokens, and compute logit differences by hand from full logits; they never compare the code
with its own output.
"""

from __future__ import annotations

import re

import pytest
import torch

from interp import models
from interp.tasks import sva
from interp.tasks.sva import generate_sva

SINGULAR = {s for s, _ in sva.NOUNS}
PLURAL = {p for _, p in sva.NOUNS}
VERB_SG = {s: p for s, p in sva.VERBS}
VERB_PL = {p: s for s, p in sva.VERBS}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _decode(model, token_id) -> str:
    return model.tokenizer.decode([int(token_id)])


def _nouns(text: str) -> tuple[str, str | None]:
    """(subject, attractor or None) of a prompt built from the built-in templates."""
    m = re.fullmatch(r"The (\w+)(?: (?:near|behind|next to|with|that) the (\w+)(?: \w+)?)?", text)
    assert m, text
    return m.group(1), m.group(2)


@pytest.fixture(scope="module")
def pairs(default_model):
    return generate_sva(default_model, 56, seed=0)


def test_tokens_match_texts_and_lengths_agree(default_model, pairs):
    model = default_model
    assert pairs.corruption == "subject_number" and pairs.templates == sva.TEMPLATES
    for i in range(len(pairs)):
        clean = model.to_tokens(pairs.clean_texts[i])[0]
        corrupt = model.to_tokens(pairs.corrupt_texts[i])[0]
        assert len(clean) == len(corrupt) == int(pairs.end_pos[i]) + 1
        assert torch.equal(pairs.clean_tokens[i, : len(clean)], clean)
        assert torch.equal(pairs.corrupt_tokens[i, : len(corrupt)], corrupt)
        assert (pairs.clean_tokens[i, len(clean):] == pairs.pad_token_id).all()
        assert int(pairs.positions["end"][i]) == len(clean) - 1
    assert pairs.is_padded  # templates 0 and 5 differ in length


def test_clean_and_corrupt_differ_exactly_at_the_subject(default_model, pairs):
    for i in range(len(pairs)):
        n = int(pairs.end_pos[i]) + 1
        diff = (pairs.clean_tokens[i, :n] != pairs.corrupt_tokens[i, :n]).nonzero()[:, 0].tolist()
        assert diff == [int(pairs.positions["subj"][i])], (pairs.clean_texts[i], diff)
        (cs, ca), (ks, ka) = _nouns(pairs.clean_texts[i]), _nouns(pairs.corrupt_texts[i])
        assert ca == ka and cs != ks
        # the same lemma in the other number
        assert (cs, ks) in sva.NOUNS or (ks, cs) in sva.NOUNS


def test_every_slot_is_one_token_at_its_position(default_model, pairs):
    model = default_model
    for i in range(len(pairs)):
        for which in ("clean", "corrupt"):
            text = getattr(pairs, f"{which}_texts")[i]
            tokens = getattr(pairs, f"{which}_tokens")[i]
            subj, attr = _nouns(text)
            assert _decode(model, tokens[int(pairs.positions["subj"][i])]) == " " + subj
            if attr is None:
                assert int(pairs.positions["attr"][i]) == -1 and "{attr}" not in pairs.templates[int(pairs.template[i])]
            else:
                assert _decode(model, tokens[int(pairs.positions["attr"][i])]) == " " + attr
        for token in (pairs.answer_ids[i], pairs.wrong_ids[i]):
            assert len(model.tokenizer.encode(_decode(model, token), add_special_tokens=False)) == 1


def test_answer_agrees_with_clean_subject_and_attractor_has_the_other_number(default_model, pairs):
    model = default_model
    for i in range(len(pairs)):
        subj, attr = _nouns(pairs.clean_texts[i])
        answer, wrong = _decode(model, pairs.answer_ids[i]), _decode(model, pairs.wrong_ids[i])
        assert answer.startswith(" ") and wrong.startswith(" ")
        answer, wrong = answer[1:], wrong[1:]
        if subj in SINGULAR:
            assert VERB_SG.get(answer) == wrong, (pairs.clean_texts[i], answer, wrong)
            assert attr is None or attr in PLURAL
        else:
            assert subj in PLURAL and VERB_PL.get(answer) == wrong, (pairs.clean_texts[i], answer, wrong)
            assert attr is None or attr in SINGULAR
        if attr is not None:
            lemma = next(pair for pair in sva.NOUNS if subj in pair)
            assert attr not in lemma  # attractor is another noun
    assert sva.sva_numbers(pairs, model).count("plural") == len(pairs) // 2


def test_balance_and_template_coverage(default_model, pairs):
    # 56 = 4 passes over 7 templates x 2 numbers: each combination exactly 4 times.
    numbers = ["singular" if _nouns(t)[0] in SINGULAR else "plural" for t in pairs.clean_texts]
    combos = {}
    for t, num in zip(pairs.template.tolist(), numbers):
        combos[t, num] = combos.get((t, num), 0) + 1
    assert combos == {(t, num): 4 for t in range(len(sva.TEMPLATES)) for num in ("singular", "plural")}
    one_way = generate_sva(default_model, 20, seed=0, balanced=False)
    assert all(_nouns(t)[0] in SINGULAR for t in one_way.clean_texts)
    assert all(_decode(default_model, a) in (" is", " was", " has") for a in one_way.answer_ids)


def test_deterministic_per_seed(default_model, pairs):
    again = generate_sva(default_model, 56, seed=0)
    assert again.clean_texts == pairs.clean_texts and again.corrupt_texts == pairs.corrupt_texts
    assert torch.equal(again.clean_tokens, pairs.clean_tokens)
    assert torch.equal(again.answer_ids, pairs.answer_ids)
    other = generate_sva(default_model, 56, seed=1)
    assert sum(a != b for a, b in zip(other.clean_texts, pairs.clean_texts)) > 40


def test_custom_templates_and_ids(default_model):
    custom = "Yesterday the {subj} beside the {attr}"
    got = generate_sva(default_model, 6, templates=[custom])
    assert got.templates == (custom,)
    assert all(t.startswith("Yesterday the ") for t in got.clean_texts)
    assert (got.positions["attr"] == got.positions["subj"] + 3).all()
    picked = generate_sva(default_model, 8, templates=[0, 5])
    assert set(picked.template.tolist()) == {0, 5}
    assert (picked.positions["attr"][picked.template == 0] == -1).all()


def test_too_few_single_token_words(default_model):
    tok = default_model.tokenizer
    nouns = [("author", "authors"), ("Xzylophia", "Xzylophias"), ("dog", "Quorrakins")]
    assert [len(tok.encode(" " + w, add_special_tokens=False)) > 1 for p in nouns for w in p] == \
        [False, False, True, True, False, True]  # the facts the test relies on
    vocab = sva.sva_vocab(default_model, nouns=nouns)
    assert [p[0][0] for p in vocab.nouns] == ["author"] and len(vocab.dropped_nouns) == 2
    with pytest.raises(ValueError, match=r"Only 1 of 3 noun pairs .* at least 2.*Xzylophia/Xzylophias"):
        generate_sva(default_model, 4, nouns=nouns)
    # One noun pair is enough without an attractor.
    alone = generate_sva(default_model, 4, templates=[0], nouns=nouns)
    assert set(alone.clean_texts) == {"The author", "The authors"}
    with pytest.raises(ValueError, match=r"Only 0 of 1 verb pairs.*Zbloops/Zbloop"):
        generate_sva(default_model, 4, verbs=[("Zbloops", "Zbloop")])


def test_generation_errors(default_model):
    with pytest.raises(ValueError, match="has no tokenizer"):
        generate_sva(models.load("tiny-llama"), 4)
    with pytest.raises(ValueError, match=r"\{subj\} must occur exactly once"):
        generate_sva(default_model, 4, templates=["The {attr} is"])
    with pytest.raises(ValueError, match="unknown slot"):
        generate_sva(default_model, 4, templates=["The {subj} near the {place}"])
    with pytest.raises(ValueError, match="must follow a space"):
        generate_sva(default_model, 4, templates=["{subj} near the {attr}"])
    with pytest.raises(ValueError, match="out of range"):
        generate_sva(default_model, 4, templates=[7])
    with pytest.raises(ValueError, match="n must be at least 1"):
        generate_sva(default_model, 0)


def test_model_prefers_the_agreeing_verb(default_model):
    """Measured on smollm2-135m-instruct, 32 pairs, seed 0: clean logit difference > 0 on 29/32
    (mean 2.4), corrupt < 0 on 32/32. Swapping answer and wrong would give 3/32."""
    model = default_model
    pairs = generate_sva(model, 32, seed=0)
    clean, corrupt = [], []
    for i in range(len(pairs)):
        for text, out in ((pairs.clean_texts[i], clean), (pairs.corrupt_texts[i], corrupt)):
            logits = model(model.to_tokens(text))[0, -1]
            out.append((logits[pairs.answer_ids[i]] - logits[pairs.wrong_ids[i]]).item())
    clean, corrupt = torch.tensor(clean), torch.tensor(corrupt)
    assert (clean > 0).float().mean() >= 0.75 and clean.mean() > 1.0, clean
    assert (corrupt < 0).float().mean() >= 0.9 and corrupt.mean() < -1.0, corrupt
    # The padded batch gives the same numbers at end_pos.
    assert torch.allclose(pairs.logit_diff(model(pairs.clean_tokens)), clean, atol=1e-3)
