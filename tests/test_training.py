"""interp.training: losses against hand computations, scopes, LoRA, resume, a planted rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp import edits, models
from interp.concepts.collect import tokenize
from interp.training import data as D
from interp.training import losses as L
from interp.training import scopes as S
from interp.training.loop import TrainConfig, lr_factor, train

# --------------------------------------------------------------------------------------------
# Hand computations (numpy, float64, loops): independent of the code under test
# --------------------------------------------------------------------------------------------


def _hand_logprobs(logits, tokens, loss_mask, attention):
    """Per row: list of log p(token t+1 | ..t) for every target t+1."""
    lg = logits.double().numpy()
    rows = []
    for b in range(lg.shape[0]):
        out = []
        for t in range(lg.shape[1] - 1):
            if loss_mask[b, t + 1] and attention[b, t + 1]:
                x = lg[b, t]
                lse = math.log(sum(math.exp(v) for v in x))
                out.append(x[int(tokens[b, t + 1])] - lse)
        rows.append(out)
    return rows


def _random_batch(seed=0, batch=3, pos=6, vocab=11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, pos, vocab, generator=gen) * 2
    tokens = torch.randint(0, vocab, (batch, pos), generator=gen)
    attention = torch.ones(batch, pos, dtype=torch.long)
    attention[1, 4:] = 0  # row 1 padded on the right
    loss_mask = torch.rand(batch, pos, generator=gen) > 0.3
    loss_mask[:, 2] = True
    loss_mask &= attention.bool()
    return logits, D.Batch(tokens, attention, loss_mask)


def test_cross_entropy_and_sequence_logprobs_match_hand_computation():
    logits, batch = _random_batch()
    rows = _hand_logprobs(logits, batch.tokens, batch.loss_mask, batch.attention_mask)
    flat = [v for r in rows for v in r]
    assert L.cross_entropy(logits, batch).item() == pytest.approx(-np.mean(flat), abs=1e-5)
    seq = L.sequence_logprobs(logits, batch)
    assert seq.tolist() == pytest.approx([sum(r) for r in rows], abs=1e-5)
    assert L.gradient_ascent(logits, batch).item() == pytest.approx(np.mean(flat), abs=1e-5)


def test_gradient_difference_matches_hand_computation():
    lf, bf = _random_batch(1)
    lr_, br = _random_batch(2, batch=2, pos=4)
    ce_f = -np.mean([v for r in _hand_logprobs(lf, bf.tokens, bf.loss_mask, bf.attention_mask) for v in r])
    ce_r = -np.mean([v for r in _hand_logprobs(lr_, br.tokens, br.loss_mask, br.attention_mask) for v in r])
    got = L.gradient_difference(lf, bf, lr_, br, retain_weight=0.7).item()
    assert got == pytest.approx(-ce_f + 0.7 * ce_r, abs=1e-5)


def test_npo_matches_its_formula_and_is_2_log2_over_beta_at_the_reference():
    gen = torch.Generator().manual_seed(3)
    lp, ref = -10 * torch.rand(5, generator=gen), -10 * torch.rand(5, generator=gen)
    beta = 0.1
    hand = -(2 / beta) * np.mean([math.log(1 / (1 + math.exp(beta * (a - b))))
                                  for a, b in zip(lp.tolist(), ref.tolist())])
    assert L.npo(lp, ref, beta).item() == pytest.approx(hand, rel=1e-5)
    assert L.npo(lp, lp.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_kl_to_reference_matches_hand_computation():
    logits, batch = _random_batch(4)
    ref = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    kls = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            if batch.loss_mask[b, t + 1]:
                p = np.exp(ref[b, t].double().numpy())
                p /= p.sum()
                q = np.exp(logits[b, t].double().numpy())
                q /= q.sum()
                kls.append(float((p * np.log(p / q)).sum()))
    assert L.kl_to_reference(logits, ref, batch).item() == pytest.approx(np.mean(kls), abs=1e-5)
    assert L.kl_to_reference(logits, logits, batch).item() == pytest.approx(0.0, abs=1e-6)


def test_dpo_matches_its_formula():
    gen = torch.Generator().manual_seed(6)
    c, r, rc, rr = (-5 * torch.rand(4, generator=gen) for _ in range(4))
    beta = 0.1
    hand = -np.mean([math.log(1 / (1 + math.exp(-beta * ((a - b) - (x - y)))))
                     for a, b, x, y in zip(c.tolist(), rc.tolist(), r.tolist(), rr.tolist())])
    assert L.dpo(c, r, rc, rr, beta).item() == pytest.approx(hand, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Data helpers
# --------------------------------------------------------------------------------------------


def test_text_chunks_keep_every_word_and_reach_the_minimum_length():
    sentences = [f"Sentence number {i} says something about item {i * 7}." for i in range(40)]
    text = " ".join(sentences)
    chunks = D.text_chunks(text, min_chars=400)
    assert len(chunks) > 1
    assert all(len(c) >= 400 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    assert all(c.endswith(".") for c in chunks)


def test_collate_pads_right_with_masks():
    ex = [D.Example([5, 6, 7], [False, True, True]), D.Example([8, 9], [False, True])]
    b = D.collate(ex)
    assert b.tokens.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.loss_mask.tolist() == [[False, True, True], [False, True, False]]


def test_sft_example_with_the_chat_template_targets_the_response_only(default_model):
    model = default_model
    ex = D.sft_example(model, "What is 2+2?", "It is 4.")
    prompt_ids = tokenize(model, ["What is 2+2?"], chat_template=True)[0][0]
    n = len(prompt_ids)
    assert ex.tokens[:n] == prompt_ids
    assert not any(ex.loss_mask[:n]) and all(ex.loss_mask[n:])
    response = model.tokenizer.decode(ex.tokens[n:])
    assert response.startswith("It is 4.") and "<|im_end|>" in response


def test_padded_batch_gives_the_same_sequence_logprobs_as_one_row_at_a_time():
    model = models.load("tiny-llama", device="cpu", processing=False)
    ex = [D.Example([1, 2, 3, 4, 5, 6], [False] * 3 + [True] * 3), D.Example([7, 8, 9], [False, True, True])]
    together = L.sequence_logprobs(model(D.collate(ex).tokens, attention_mask=D.collate(ex).attention_mask), D.collate(ex))
    alone = [L.sequence_logprobs(model(D.collate([e]).tokens), D.collate([e])).item() for e in ex]
    assert together.tolist() == pytest.approx(alone, abs=1e-5)


# --------------------------------------------------------------------------------------------
# Training runs on tiny models
# --------------------------------------------------------------------------------------------


def _tiny(seed=0):
    return models.load("tiny-llama", device="cpu", processing=False, seed=seed)


def _text_set(n=6, length=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [D.Example(torch.randint(0, 256, (length,), generator=gen).tolist(), [True] * length)
            for _ in range(n)]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


QUIET = {"progress": False}


def _set_ce(model, examples):
    batch = D.collate(examples)
    with torch.no_grad():
        return L.cross_entropy(model(batch.tokens, attention_mask=batch.attention_mask), batch).item()


def test_named_scope_changes_only_the_matched_parameters():
    model = _tiny()
    before = _snapshot(model)
    result = train(model, TrainConfig(loss="sft", lr=1e-2, max_steps=2, batch_size=2, **QUIET),
                   _text_set(), scope=S.Named("blocks.*.mlp.W_out"))
    assert result.trainable == ["blocks.0.mlp.W_out", "blocks.1.mlp.W_out"]
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in result.trainable), name
        assert p.requires_grad  # flags restored


def test_needle_changes_one_value_vector_and_nothing_else_bit_for_bit():
    model = _tiny()
    noise = edits.add_noise(model, layer=1, index=5, sigma=0.5)
    assert noise.record["kind"] == "add_noise"
    before = _snapshot(model)
    # AdamW with weight decay would move every entry of W_out without the restore step.
    cfg = TrainConfig(loss="ga", lr=1e-2, max_steps=3, batch_size=2, weight_decay=0.1, **QUIET)
    forget = _text_set()
    ce_before = _set_ce(model, forget)
    result = train(model, cfg, forget, scope=S.needle(1, 5))
    assert result.n_trainable == model.cfg.d_model
    for name, p in model.named_parameters():
        if name != "blocks.1.mlp.W_out":
            assert torch.equal(p, before[name]), name
    w, w0 = model.blocks[1].mlp.W_out, before["blocks.1.mlp.W_out"]
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    keep[5] = False
    assert torch.equal(w[keep], w0[keep])
    assert not torch.equal(w[5], w0[5])
    assert _set_ce(model, forget) > ce_before  # gradient ascent: the forget CE grows


def test_lora_trains_adapters_only_and_merges_into_equal_logits():
    model = _tiny()
    before = _snapshot(model)
    scope = S.LoRA(("blocks.*.attn.W_Q", "blocks.*.mlp.W_in"), rank=2, alpha=4.0)
    train(model, TrainConfig(loss="sft", lr=1e-2, max_steps=3, batch_size=2, **QUIET),
          _text_set(), scope=scope)
    assert S.has_lora(model)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(tokens)
    assert S.merge_lora(model) == 4 and not S.has_lora(model)
    with torch.no_grad():
        merged = model(tokens)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for name in before:
        changed = not torch.equal(after[name], before[name])
        assert changed == (name.endswith(("attn.W_Q", "mlp.W_in"))), name


def test_lora_merge_equals_w_plus_scaled_a_b():
    model = _tiny()
    w0 = model.blocks[0].mlp.W_out.detach().clone()
    S.LoRA("blocks.0.mlp.W_out", rank=3, alpha=6.0).apply(model).close()
    adapter = model.blocks[0].mlp.parametrizations.W_out[0]
    with torch.no_grad():
        adapter.B.normal_()
    expected = w0 + 2.0 * adapter.A.detach() @ adapter.B.detach()
    S.merge_lora(model)
    torch.testing.assert_close(model.blocks[0].mlp.W_out.detach(), expected)


class _Interrupt(RuntimeError):
    pass


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    data, retain = _text_set(7), _text_set(5, seed=1)
    cfg = dict(loss="npo_gd", lr=5e-3, max_steps=6, batch_size=2, grad_accum=2, warmup_steps=2,
               schedule="cosine", weight_decay=0.01, **QUIET)
    straight = _tiny()
    full = train(straight, TrainConfig(**cfg), data, retain=retain)

    def stop_at_5(info):
        if info.step == 5:
            raise _Interrupt

    ck = str(tmp_path / "ck")
    with pytest.raises(_Interrupt):
        train(_tiny(), TrainConfig(**cfg, checkpoint_dir=ck, checkpoint_every=2), data,
              retain=retain, callbacks=[stop_at_5])
    resumed_model = _tiny()
    resumed = train(resumed_model, TrainConfig(**cfg, checkpoint_dir=ck, checkpoint_every=2),
                    data, retain=retain, resume=True)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    for (name, p), q in zip(straight.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    assert resumed.losses == full.losses
    with pytest.raises(ValueError, match="another configuration"):
        train(_tiny(), TrainConfig(**dict(cfg, lr=1e-3), checkpoint_dir=ck), data, retain=retain,
              resume=True)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_tiny(), TrainConfig(**cfg, checkpoint_dir=ck), data, retain=retain)


def test_gradient_accumulation_equals_one_big_batch():
    data = _text_set(4)
    base = dict(loss="sft", lr=0.1, max_steps=1, optimizer="sgd", max_grad_norm=None, **QUIET)
    a, b = _tiny(), _tiny()
    train(a, TrainConfig(**base, batch_size=4), data)
    train(b, TrainConfig(**base, batch_size=2, grad_accum=2), data)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_learning_rate_schedule():
    assert [lr_factor(s, 10, 4, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert cos[:2] == [0.5, 1.0] and cos[2] == pytest.approx(1.0)
    assert cos[-1] == pytest.approx(0.1)
    mid = 2 + 7 / 2  # half-way through the decay (steps 2..9)
    assert lr_factor(int(mid), 10, 2, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 7)))
    result = train(_tiny(), TrainConfig(loss="sft", lr=1.0, max_steps=4, warmup_steps=2,
                                        optimizer="sgd", **QUIET), _text_set(2))
    assert result.lrs == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_a_tiny_model_learns_a_planted_rule_with_sft():
    """After pattern X the answer is token A, after pattern Y token B (random prefixes)."""
    x, y, a, b = [30, 31, 32], [40, 41, 42], 100, 200
    gen = torch.Generator().manual_seed(0)

    def prompts(n):
        return [torch.randint(50, 90, (3,), generator=gen).tolist() for _ in range(n)]

    pairs = [(p + x, [a]) for p in prompts(16)] + [(p + y, [b]) for p in prompts(16)]
    model = _tiny()
    examples = D.sft_examples(model, pairs)
    assert all(e.n_targets == 1 for e in examples)
    test = [(p + x, a) for p in prompts(8)] + [(p + y, b) for p in prompts(8)]

    def accuracy():
        with torch.no_grad():
            preds = model(torch.tensor([p for p, _ in test]))[:, -1].argmax(-1)
        return float((preds == torch.tensor([t for _, t in test])).float().mean())

    assert accuracy() < 0.5
    result = train(model, TrainConfig(loss="sft", lr=3e-3, max_steps=40, batch_size=8, **QUIET),
                   examples)
    assert accuracy() == 1.0
    assert result.losses[-1] < 0.1 * result.losses[0]


def test_dpo_prefers_the_chosen_response():
    model = _tiny()
    items = [([60 + i, 61, 62], [100, 101], [200, 201]) for i in range(6)]
    pairs = D.preference_pairs(model, items)
    result = train(model, TrainConfig(loss="dpo", lr=3e-3, max_steps=15, batch_size=3, **QUIET), pairs)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert result.losses[-1] < result.losses[0]
    assert result.parts["margin"][-1] > result.parts["margin"][0]


def test_npo_kl_runs_and_starts_at_its_reference_value():
    result = train(_tiny(), TrainConfig(loss="npo_kl", lr=1e-3, max_steps=2, batch_size=2, **QUIET),
                   _text_set(4), retain=_text_set(4, seed=2))
    assert result.parts["npo"][0] == pytest.approx(20 * math.log(2), rel=1e-5)
    assert result.parts["retain_kl"][0] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_clear_errors_for_bad_input():
    model = _tiny()
    with pytest.raises(ValueError, match="forget set is empty"):
        train(model, TrainConfig(loss="ga", **QUIET), [])
    with pytest.raises(ValueError, match="needs a non-empty retain set"):
        train(model, TrainConfig(loss="gd", **QUIET), _text_set(2))
    with pytest.raises(ValueError, match=r"matches no parameter.*blocks\.0\."):
        S.Named("blocks.*.mlp.W_nope").apply(model)
    with pytest.raises(ValueError, match=r"shape \(3, 4\) but the weight has shape \(128, 64\)"):
        S.Masked({"blocks.0.mlp.W_out": torch.ones(3, 4, dtype=torch.bool)}).apply(model)
    other = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=16, d_vocab=300,
        act_fn="gelu", normalization_type="LN"))
    with pytest.raises(ValueError, match="vocabulary of 300 tokens but the model has 256"):
        train(model, TrainConfig(loss="npo", **QUIET), _text_set(2), reference=other)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        train(model, TrainConfig(loss="sft", **QUIET), [D.Example([1, 999], [False, True])])
    with pytest.raises(ValueError, match="response to .* has no tokens"):
        D.sft_examples(model, [([1, 2], [])])


# --------------------------------------------------------------------------------------------
# The embedded models (raw weights), and CUDA / bfloat16
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(models.EMBEDDED_MODELS))
def test_embedded_raw_weights_take_a_needle_step(name):
    model = models.load(name, device="cpu", processing=False)
    layer = model.cfg.n_layers // 2
    forget = D.text_examples(model, ["The Eiffel Tower is a wrought-iron lattice tower in Paris."])
    before = model.blocks[layer].mlp.W_out.detach().clone()
    result = train(model, TrainConfig(loss="ga", lr=1e-3, max_steps=1, batch_size=1, **QUIET),
                   forget, scope=S.needle(layer, 7))
    after = model.blocks[layer].mlp.W_out.detach()
    assert math.isfinite(result.losses[0])
    changed = (after != before).any(-1)
    assert changed.nonzero().flatten().tolist() == [7]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_needle_and_lora():
    model = models.load("tiny-llama", device="cuda", dtype="bfloat16", processing=False)
    before = _snapshot(model)
    train(model, TrainConfig(loss="ga", lr=1e-2, max_steps=2, batch_size=2, weight_decay=0.1, **QUIET),
          _text_set(), scope=S.needle(0, 3))
    for name, p in model.named_parameters():
        if name != "blocks.0.mlp.W_out":
            assert torch.equal(p, before[name]), name
    assert torch.equal(model.blocks[0].mlp.W_out[4:], before["blocks.0.mlp.W_out"][4:])
    train(model, TrainConfig(loss="npo", lr=1e-2, max_steps=2, batch_size=2, **QUIET),
          _text_set(), scope=S.LoRA("blocks.*.mlp.W_in", rank=2))
    tokens = torch.randint(0, 256, (2, 8), device="cuda")
    with torch.no_grad():
        adapted = model(tokens).float()
        S.merge_lora(model)
        merged = model(tokens).float()
    torch.testing.assert_close(merged, adapted, rtol=0.02, atol=0.05)
