"""interp.tasks.ioi: generated IOI pairs, the (normalised) logit difference, external pair files.

Checks read the prompts back as text and re-tokenise them with the model, count names with
plain string operations, and compute logit differences by hand from full logits; they never
compare the code with its own output.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter

import pytest
import torch

from interp import models
from interp.attribution.metrics import LogitDiff
from interp.tasks import ioi
from interp.tasks.ioi import generate_ioi, load_pairs, logit_diff

NAME_SET = set(ioi.NAMES)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _names(text: str) -> list[str]:
    """Names in `text` in order of occurrence (words from the name list)."""
    return [w for w in re.findall(r"[A-Za-z]+", text) if w in NAME_SET]


def _skeleton(text: str) -> str:
    """The text with names, places and objects blanked: what remains is the template wording."""
    words = set(ioi.NAMES) | set(ioi.PLACES) | set(ioi.OBJECTS)
    return re.sub(r"[A-Za-z]+", lambda m: "_" if m.group() in words else m.group(), text)


def _decode(model, token_id) -> str:
    return model.tokenizer.decode([int(token_id)])


@pytest.fixture(scope="module")
def abc(default_model):
    return generate_ioi(default_model, 96, seed=0, corruption="abc")


@pytest.fixture(scope="module")
def swap(default_model):
    return generate_ioi(default_model, 96, seed=0, corruption="swap")


@pytest.fixture(scope="module")
def end50(default_model):
    """50 "abc" pairs on the default model, with TransformerLens's own full-vocabulary logits
    (final norm + unembedding) and final residual stream at each prompt's last token, found by
    re-tokenising the text. (Full logits at every position cost ~25x more on CPU.)"""
    model = default_model
    pairs = generate_ioi(model, 50, seed=1, corruption="abc")
    out = {"pairs": pairs}
    for which in ("clean", "corrupt"):
        texts = getattr(pairs, f"{which}_texts")
        last = torch.tensor([len(model.to_tokens(t)[0]) - 1 for t in texts])
        resid = model(getattr(pairs, f"{which}_tokens"), stop_at_layer=model.cfg.n_layers)
        resid = resid[torch.arange(len(pairs)), last]
        out[f"{which}_resid"] = resid
        out[f"{which}_logits"] = model.unembed(model.ln_final(resid[:, None]))[:, 0]
    return out


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["abc", "swap"])
def test_generated_pairs_tokenise_like_their_texts(default_model, abc, swap, which):
    pairs = {"abc": abc, "swap": swap}[which]
    assert len(pairs) == 96 == pairs.clean_tokens.shape[0] == len(pairs.clean_texts)
    assert pairs.clean_tokens.shape == pairs.corrupt_tokens.shape
    for i in range(len(pairs)):
        clean = default_model.to_tokens(pairs.clean_texts[i])[0]
        corrupt = default_model.to_tokens(pairs.corrupt_texts[i])[0]
        assert len(clean) == len(corrupt), (pairs.clean_texts[i], pairs.corrupt_texts[i])
        n = len(clean)
        assert int(pairs.end_pos[i]) == n - 1
        assert torch.equal(pairs.clean_tokens[i, :n], clean)
        assert torch.equal(pairs.corrupt_tokens[i, :n], corrupt)
        assert (pairs.clean_tokens[i, n:] == pairs.pad_token_id).all()
        assert not pairs.clean_texts[i].endswith(" ")


@pytest.mark.parametrize("which", ["abc", "swap"])
def test_answer_is_the_indirect_object_and_wrong_is_the_subject(default_model, abc, swap, which):
    pairs = {"abc": abc, "swap": swap}[which]
    for i, text in enumerate(pairs.clean_texts):
        counts = Counter(_names(text))
        assert sorted(counts.values()) == [1, 2], text
        io = next(n for n, c in counts.items() if c == 1)
        s = next(n for n, c in counts.items() if c == 2)
        assert _decode(default_model, pairs.answer_ids[i]) == " " + io
        assert _decode(default_model, pairs.wrong_ids[i]) == " " + s
        # The slot positions hold those names in the clean prompt.
        assert pairs.clean_tokens[i, pairs.positions["IO"][i]] == pairs.answer_ids[i]
        assert pairs.clean_tokens[i, pairs.positions["S1"][i]] == pairs.wrong_ids[i]
        assert pairs.clean_tokens[i, pairs.positions["S2"][i]] == pairs.wrong_ids[i]
        assert pairs.positions["end"][i] == pairs.end_pos[i]


def test_both_orders_and_many_templates(abc):
    orders, templates = Counter(), set()
    for text, reported in zip(abc.clean_texts, abc.orders):
        names = _names(text)
        order = "ABBA" if Counter(names)[names[0]] == 1 else "BABA"  # IO first -> ABBA
        assert order == reported, text
        orders[order] += 1
        templates.add((_skeleton(text), order))
    assert orders["ABBA"] >= 30 and orders["BABA"] >= 30, orders
    # 24 built-in templates (12 sentences x 2 orders), all used over n = 96.
    assert len(templates) >= 20, templates


def test_abc_corruption_uses_three_new_distinct_names(abc):
    for clean, corrupt in zip(abc.clean_texts, abc.corrupt_texts):
        new = _names(corrupt)
        assert len(new) == 3 and len(set(new)) == 3, corrupt
        assert not set(new) & set(_names(clean)), (clean, corrupt)
        assert _skeleton(clean) == _skeleton(corrupt)  # same template, place and object


def test_swap_corruption_flips_the_answer(default_model, swap):
    for i, (_clean, corrupt) in enumerate(zip(swap.clean_texts, swap.corrupt_texts)):
        counts = Counter(_names(corrupt))
        assert sorted(counts.values()) == [1, 2], corrupt
        single = next(n for n, c in counts.items() if c == 1)
        # The name that now occurs once, the new correct answer, is the clean subject.
        assert " " + single == _decode(default_model, swap.wrong_ids[i])
        diff = (swap.clean_tokens[i] != swap.corrupt_tokens[i]).nonzero()[:, 0].tolist()
        assert diff == [int(swap.positions["S2"][i])]
        assert swap.corrupt_tokens[i, diff[0]] == swap.answer_ids[i]


def test_deterministic_per_seed(default_model, abc):
    again = generate_ioi(default_model, 96, seed=0, corruption="abc")
    assert again.clean_texts == abc.clean_texts and again.corrupt_texts == abc.corrupt_texts
    assert torch.equal(again.clean_tokens, abc.clean_tokens)
    other = generate_ioi(default_model, 96, seed=1, corruption="abc")
    assert sum(a != b for a, b in zip(other.clean_texts, abc.clean_texts)) > 80


def test_too_few_single_token_names(default_model):
    tok = default_model.tokenizer
    names = ["Mary", "John", "Xzylophia", "Zbigniewa", "Quorrakin", "Bartholomew"]
    multi = [n for n in names if len(tok.encode(" " + n, add_special_tokens=False)) > 1]
    assert len(multi) == 4  # the fact the test relies on
    with pytest.raises(ValueError, match=r"Only 2 of 6 names .* needs at least 5.*Xzylophia"):
        generate_ioi(default_model, 4, corruption="abc", names=names)
    # Two names are enough for the swap corruption.
    pairs = generate_ioi(default_model, 4, corruption="swap", names=names)
    assert {_decode(default_model, i) for i in pairs.answer_ids} <= {" Mary", " John"}
    with pytest.raises(ValueError, match=r"Only 0 of 2 places"):
        generate_ioi(default_model, 4, places=["Xzylophia", "Zbigniewa"])


@pytest.mark.unchecked
def test_generation_errors(default_model):
    with pytest.raises(ValueError, match="unknown corruption 'abba'"):
        generate_ioi(default_model, 4, corruption="abba")
    with pytest.raises(ValueError, match=r"\{S2\} must occur exactly once"):
        generate_ioi(default_model, 4, templates=["When {IO} and {S1} met, the ball went to"])
    with pytest.raises(ValueError, match="must follow a space"):
        generate_ioi(default_model, 4, templates=["{IO} and {S1} met, so {S2} gave it to"])
    with pytest.raises(ValueError, match="has no tokenizer"):
        generate_ioi(models.load("tiny-llama"), 4)


def test_custom_templates_and_template_ids(default_model):
    custom = "Today {S1} and {IO} cooked at the {PLACE}, and {S2} served soup to"
    pairs = generate_ioi(default_model, 6, templates=[custom], corruption="swap")
    assert pairs.templates == (custom,) and pairs.orders == ["BABA"] * 6
    for text, answer in zip(pairs.clean_texts, pairs.answer_ids):
        assert text.startswith("Today ") and text.endswith(" served soup to")
        assert _names(text)[1] == _decode(default_model, answer).strip()
    picked = generate_ioi(default_model, 6, templates=[3, 15])
    assert set(picked.template.tolist()) == {3, 15}
    assert all(t.startswith("While ") for t in picked.clean_texts)


def test_select_by_length_and_to(abc):
    groups = abc.by_length()
    assert sum(len(g) for g in groups.values()) == len(abc) and len(groups) > 1
    for n, g in groups.items():
        assert g.clean_tokens.shape[1] == n and not g.is_padded
        for row, text in enumerate(g.clean_texts):
            i = abc.clean_texts.index(text)
            assert torch.equal(g.clean_tokens[row], abc.clean_tokens[i, :n])
            assert torch.equal(g.corrupt_tokens[row], abc.corrupt_tokens[i, :n])
    first = abc[:3]
    assert first.clean_texts == abc.clean_texts[:3] and len(first) == 3
    moved = abc.to("meta")
    assert moved.clean_tokens.device.type == "meta" and moved.positions["S2"].device.type == "meta"
    assert abc.clean_tokens.device.type == "cpu"


# --------------------------------------------------------------------------------------------
# Metric on the model
# --------------------------------------------------------------------------------------------


def _hand_logit_diffs(pairs, end_logits):
    """logit(answer) - logit(wrong), one prompt at a time, from [batch, d_vocab] logits."""
    return torch.tensor([
        (end_logits[i, int(pairs.answer_ids[i])] - end_logits[i, int(pairs.wrong_ids[i])]).item()
        for i in range(len(pairs))
    ])


def test_model_prefers_the_indirect_object(end50):
    ld = _hand_logit_diffs(end50["pairs"], end50["clean_logits"])
    assert ld.mean() > 1.0 and (ld > 0).float().mean() > 0.7, ld


def test_normalised_metric_is_one_on_clean_and_zero_on_corrupt(default_model, end50):
    pairs = end50["pairs"]
    clean_ld = _hand_logit_diffs(pairs, end50["clean_logits"])
    corrupt_ld = _hand_logit_diffs(pairs, end50["corrupt_logits"])
    metric = pairs.metric(default_model, batch_size=16)
    assert metric.clean == pytest.approx(clean_ld.mean().item(), abs=1e-3)
    assert metric.corrupt == pytest.approx(corrupt_ld.mean().item(), abs=1e-3)
    expected = (clean_ld - metric.corrupt) / (metric.clean - metric.corrupt)
    torch.testing.assert_close(metric(end50["clean_logits"]), expected, atol=1e-4, rtol=0)
    assert metric(end50["clean_logits"]).mean().item() == pytest.approx(1.0, abs=1e-3)
    assert metric(end50["corrupt_logits"]).mean().item() == pytest.approx(0.0, abs=1e-3)
    # The model barely separates the clean names on the "abc" corruption.
    assert abs(metric.corrupt) < 0.5 * metric.clean

    # Only the two unembedding columns: the same numbers from the final residual stream.
    torch.testing.assert_close(
        metric.from_final_resid(default_model, end50["clean_resid"]), expected, atol=1e-3, rtol=0
    )
    # A chunk keeps the whole batch's scale.
    chunk = metric.select(slice(10, 20))
    torch.testing.assert_close(chunk(end50["clean_logits"][10:20]), expected[10:20], atol=1e-4, rtol=0)


def test_padded_batch_full_logits_and_metric(default_model, end50):
    """Right-padded full logits read at end_pos equal unpadded single-prompt runs, and the
    metric's baselines (final residual only, in batches) reproduce the hand-computed ones."""
    model, pairs = default_model, end50["pairs"]
    rows = [int(pairs.end_pos.argmin()), int(pairs.end_pos.argmax()), 0, 1, 2, 3]
    sub = pairs.select(rows)
    assert sub.is_padded
    clean = model(sub.clean_tokens)
    for r in (0, 1):
        alone = model(model.to_tokens(sub.clean_texts[r]))[0]
        torch.testing.assert_close(clean[r, : alone.shape[0]], alone, atol=2e-4, rtol=1e-4)
    clean_ld = _hand_logit_diffs(pairs, end50["clean_logits"])[rows]
    corrupt_ld = _hand_logit_diffs(pairs, end50["corrupt_logits"])[rows]
    torch.testing.assert_close(sub.logit_diff(clean), clean_ld, atol=1e-3, rtol=0)
    raw = sub.metric(model, normalise=False)
    torch.testing.assert_close(raw(model(sub.corrupt_tokens)), corrupt_ld, atol=1e-3, rtol=0)
    metric = sub.metric(model, batch_size=4)
    assert metric.clean == pytest.approx(clean_ld.mean().item(), abs=1e-3)
    assert metric.corrupt == pytest.approx(corrupt_ld.mean().item(), abs=1e-3)


def test_swap_corrupt_prefers_the_clean_subject(default_model, swap):
    metric = swap[:24].metric(default_model)
    assert metric.clean > 1.0 and metric.corrupt < -1.0


@pytest.mark.unchecked
def test_logit_diff_positions_and_shapes():
    logits = torch.zeros(2, 3, 5)
    logits[0, 1, 4], logits[0, 2, 4] = 7.0, 1.0
    logits[1, 2, 0], logits[1, 2, 3] = 2.0, 5.0
    answer, wrong = torch.tensor([4, 0]), torch.tensor([2, 3])
    assert logit_diff(logits, answer, wrong).tolist() == [1.0, -3.0]
    assert logit_diff(logits, answer, wrong, torch.tensor([1, 2])).tolist() == [7.0, -3.0]
    assert logit_diff(logits[:, 1], answer, wrong).tolist() == [7.0, 0.0]
    with pytest.raises(ValueError, match="one entry per row"):
        logit_diff(logits, answer[:1], wrong[:1])
    model = models.load("tiny-gpt2")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 4))
    with pytest.raises(ValueError, match="cannot be normalised"):
        LogitDiff(answer, wrong).normalised(model, tokens, tokens)
    with pytest.raises(ValueError, match="end_pos ranges over 0..5 but the tokens have 3"):
        LogitDiff(answer, wrong, end_pos=torch.tensor([0, 5]))(logits)


def test_gemma_bos_positions_and_padding():
    gemma = models.load("gemma-3-270m", device="cpu")
    assert gemma.cfg.default_prepend_bos
    pairs = generate_ioi(gemma, 8, seed=3, corruption="swap")
    assert (pairs.clean_tokens[:, 0] == gemma.tokenizer.bos_token_id).all()
    for i, text in enumerate(pairs.clean_texts):
        ids = gemma.to_tokens(text)[0]
        assert int(pairs.end_pos[i]) == len(ids) - 1
        assert _decode(gemma, ids[int(pairs.positions["IO"][i])]) == " " + Counter(_names(text)).most_common()[-1][0]
    i = int(pairs.end_pos.argmin())
    alone = gemma(gemma.to_tokens(pairs.clean_texts[i]))[0, -1]
    by_hand = (alone[pairs.answer_ids[i]] - alone[pairs.wrong_ids[i]]).item()
    raw = pairs.metric(gemma, normalise=False)
    assert raw(gemma(pairs.clean_tokens))[i].item() == pytest.approx(by_hand, abs=2e-3)
    metric = pairs.metric(gemma)
    assert metric.clean > 0 > metric.corrupt


# --------------------------------------------------------------------------------------------
# External pairs
# --------------------------------------------------------------------------------------------

GOOD = [
    ("When Mary and John went to the store, John gave a drink to",
     "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    ("After Anna and Peter sat in the park, Peter passed a book to",
     "After Anna and Peter sat in the park, Anna passed a book to", " Anna", " Peter"),
    ("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
]


def _write(tmp_path, name, rows, columns=("clean", "corrupt", "answer", "wrong_answer")):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps([dict(zip(columns, r)) for r in rows]))
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
    return path


@pytest.mark.parametrize("name,columns", [
    ("pairs.json", ("clean", "corrupt", "answer", "wrong_answer")),
    ("pairs.csv", ("clean", "corrupt", "answer", "wrong")),
])
def test_load_pairs_round_trip(default_model, tmp_path, name, columns):
    pairs = load_pairs(_write(tmp_path, name, GOOD, columns), default_model)
    assert len(pairs) == 3 and pairs.skipped == []
    for i, (clean, corrupt, answer, wrong) in enumerate(GOOD):
        ids = default_model.to_tokens(clean)[0]
        assert torch.equal(pairs.clean_tokens[i, : len(ids)], ids)
        assert torch.equal(pairs.corrupt_tokens[i, : len(ids)], default_model.to_tokens(corrupt)[0])
        assert int(pairs.end_pos[i]) == len(ids) - 1
        assert _decode(default_model, pairs.answer_ids[i]) == answer
        assert _decode(default_model, pairs.wrong_ids[i]) == wrong
        assert pairs.clean_texts[i] == clean and pairs.corrupt_texts[i] == corrupt


def test_load_pairs_errors_name_the_row(default_model, tmp_path):
    long = "When Mary and John went to the big store, Mary gave a drink to"
    n_clean, n_long = (len(default_model.to_tokens(t)[0]) for t in (GOOD[0][0], long))
    rows = [GOOD[0], GOOD[1], (GOOD[0][0], long, " Mary", " John")]
    with pytest.raises(ValueError, match=rf"row 3: clean has {n_clean} tokens but corrupt has {n_long}"):
        load_pairs(_write(tmp_path, "a.json", rows), default_model)
    rows = [GOOD[0], GOOD[1], GOOD[2], GOOD[0], (GOOD[0][0], GOOD[0][1], " Mary Ann", " John")]
    with pytest.raises(ValueError, match=r"row 5 \(line 6\): answer ' Mary Ann' is not a single token"):
        load_pairs(_write(tmp_path, "b.csv", rows), default_model)
    rows = [(GOOD[0][0], GOOD[0][1], " Mary", " Xzylophia")]
    with pytest.raises(ValueError, match=r"row 1: wrong answer ' Xzylophia' is not a single token"):
        load_pairs(_write(tmp_path, "c.json", rows), default_model)
    rows = [GOOD[0], (GOOD[0][0], "", " Mary", " John")]
    with pytest.raises(ValueError, match=r"row 2: corrupt is missing or empty"):
        load_pairs(_write(tmp_path, "d.json", rows), default_model)
    rows = [GOOD[0], (GOOD[0][0], GOOD[0][1], " Mary", " Mary")]
    with pytest.raises(ValueError, match=r"row 2: answer and wrong answer are the same token"):
        load_pairs(_write(tmp_path, "e.json", rows), default_model)


def test_load_pairs_skip_invalid(default_model, tmp_path):
    bad_len = (GOOD[0][0], GOOD[0][1] + " him", " Mary", " John")
    bad_answer = (GOOD[1][0], GOOD[1][1], " Mary Ann", " Peter")
    rows = [GOOD[0], bad_len, GOOD[1], bad_answer, GOOD[2]]
    path = _write(tmp_path, "mixed.csv", rows)
    with pytest.raises(ValueError, match=r"2 of 5 rows are invalid: row 2 .*; row 4 .*skip_invalid"):
        load_pairs(path, default_model)
    with pytest.warns(UserWarning, match="skipped 2 of 5"):
        pairs = load_pairs(path, default_model, skip_invalid=True)
    assert len(pairs) == 3 and pairs.clean_texts == [GOOD[0][0], GOOD[1][0], GOOD[2][0]]
    assert [r for r, _ in pairs.skipped] == [2, 4]
    assert "clean has" in pairs.skipped[0][1] and "not a single token" in pairs.skipped[1][1]
    with pytest.raises(ValueError, match="all 2 rows are invalid"):
        load_pairs(_write(tmp_path, "bad.json", [bad_len, bad_answer]), default_model,
                   skip_invalid=True)


def test_load_pairs_file_level_errors(default_model, tmp_path):
    path = _write(tmp_path, "cols.csv", [GOOD[0][:3]], columns=("clean", "corrupt", "target"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answer', 'wrong_answer'\]; "
                                         r"it has \['clean', 'corrupt', 'target'\]"):
        load_pairs(path, default_model)
    for name, text in [("empty.json", "[]"), ("empty.csv", "clean,corrupt,answer,wrong\n"),
                       ("blank.csv", "")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="has no rows"):
            load_pairs(tmp_path / name, default_model)
    (tmp_path / "obj.json").write_text('{"clean": "x"}')
    with pytest.raises(ValueError, match="holds a JSON dict; expected a list"):
        load_pairs(tmp_path / "obj.json", default_model)
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_pairs(tmp_path / "pairs.txt", default_model)
