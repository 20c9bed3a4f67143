"""Tests for interp.generation against independent computations: a hand-written greedy loop
that recomputes the whole sequence at every step (no cache, no padding, no batching), the
softmax of the model's own logits for sampling, the tokenizer's `apply_chat_template`, and
masks of injected positions built by hand."""

from __future__ import annotations

import pytest
import torch

from interp import generation as G
from interp import hooks
from interp.layout import inference_layout
from interp.models import load

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [11, 12, 13], [20, 21, 22, 23, 24], [40, 41]]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def model(request):
    return load(request.param)


@pytest.fixture(scope="module")
def llama():
    return load("tiny-llama")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def reference(model, prompt, n, add=None):
    """Greedy decode by full recomputation; `add=(layer, vector, start)` adds `vector` to
    resid_pre of `layer` at positions >= start of the unpadded sequence (a plain TL hook)."""
    tokens = torch.tensor([prompt])
    fwd = []
    if add is not None:
        layer, vector, start = add

        def add_vector(act, hook):
            act = act.clone()
            act[:, start:] += vector
            return act

        fwd = [(f"blocks.{layer}.hook_resid_pre", add_vector)]
    for _ in range(n):
        nxt = model.run_with_hooks(tokens, fwd_hooks=fwd)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return tokens[0, len(prompt):].tolist()


# --------------------------------------------------------------------------------------------
# Greedy decoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_greedy_equals_full_recomputation(model, batch_size):
    out = G.generate_with(model, PROMPTS, max_new_tokens=8, batch_size=batch_size,
                          progress=False)
    assert out.prompt_tokens == PROMPTS and out.texts is None
    assert out.tokens == [reference(model, p, 8) for p in PROMPTS]
    assert out.stopped_by == ["length"] * len(PROMPTS)


def test_old_imports_still_work():
    from interp.concepts import vectors as V

    assert V.generate_with is G.generate_with and V.next_token_logits is G.next_token_logits
    assert V.left_pad is G.left_pad and V.token_lists is G.token_lists
    assert V.Generation is G.Generation and V._pad_id is G.pad_id


def test_hooks_outside_the_call_and_captures_see_the_kv_cache(llama):
    """A capture with append=True gets the prompt, then one position per step; concatenated,
    it equals the activations of a plain forward pass over prompt + completion."""
    prompt = PROMPTS[0]
    cap = hooks.capture(llama, "resid_post", layers=[1], append=True)
    out = G.generate_with(llama, [prompt], hooks=cap, max_new_tokens=5, progress=False)
    seen = torch.cat(cap["blocks.1.hook_resid_post"], dim=1)
    _, cache = llama.run_with_cache(torch.tensor([prompt + out.tokens[0][:-1]]))
    torch.testing.assert_close(seen, cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=1e-5)
    assert not llama.hook_dict["blocks.1.hook_resid_post"].fwd_hooks  # detached again


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_independent_of_batch_size(llama):
    kw = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 3, "progress": False}
    one = G.generate_with(llama, PROMPTS, batch_size=1, **kw).tokens
    assert G.generate_with(llama, PROMPTS, batch_size=3, **kw).tokens == one
    assert G.generate_with(llama, PROMPTS, **kw).tokens == one
    other = G.generate_with(llama, PROMPTS, **{**kw, "seed": 4}).tokens
    assert other != one
    greedy = G.generate_with(llama, PROMPTS, max_new_tokens=8, progress=False).tokens
    assert one != greedy
    # top_k=1 keeps only the most likely token: greedy decoding.
    assert G.generate_with(llama, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1,
                           progress=False).tokens == greedy


def test_sampled_first_tokens_follow_the_softmax(llama):
    """Each of 2000 copies of one prompt draws its own first token; frequencies must match the
    model's softmax at temperature 0.7 (restricted to the top 5 tokens with top_k=5)."""
    prompt, n, t = PROMPTS[1], 2000, 0.7
    logits = llama(torch.tensor([prompt]))[0, -1].double()
    top = logits.topk(5)
    probs = torch.softmax(top.values / t, -1)
    out = G.generate_with(llama, [prompt] * n, max_new_tokens=1, temperature=t, top_k=5,
                          seed=0, progress=False)
    first = torch.tensor([row[0] for row in out.tokens])
    assert set(first.tolist()) <= set(top.indices.tolist())
    freq = torch.stack([(first == i).double().mean() for i in top.indices])
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-3).all()


def test_top_p_keeps_the_smallest_set_reaching_the_mass(llama):
    prompt = PROMPTS[2]
    probs = torch.softmax(llama(torch.tensor([prompt]))[0, -1].double(), -1)
    ranked = probs.sort(descending=True)
    top_p = float(ranked.values[:3].sum()) - 1e-6  # the top 3 tokens reach it, the top 2 do not
    out = G.generate_with(llama, [prompt] * 400, max_new_tokens=1, temperature=1.0,
                          top_p=top_p, progress=False)
    assert {row[0] for row in out.tokens} == set(ranked.indices[:3].tolist())


# --------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------


def test_per_row_stop_tokens(model):
    free = [reference(model, p, 8) for p in PROMPTS]
    stop0 = free[0][3]
    out = G.generate_with(model, PROMPTS, max_new_tokens=8,
                          stop_tokens=[[stop0], None, (), [free[3][0]]], progress=False)
    cut = free[0].index(stop0) + 1
    assert out.tokens[0] == free[0][:cut] and out.stopped_by[0] == "token"
    assert out.tokens[1:3] == free[1:3]  # no stop token of their own (the model has no EOS)
    assert out.tokens[3] == free[3][:1] and out.stopped_by[3] == "token"
    shared = G.generate_with(model, PROMPTS[:1], max_new_tokens=8, stop_tokens=[stop0],
                             progress=False)
    assert shared.tokens[0] == free[0][:cut]


def test_stop_strings_per_row(default_model):
    with inference_layout(default_model, keep_originals=True):  # laid out once, not per call
        _check_stop_strings(default_model)


def _check_stop_strings(default_model):
    prompts = [G.dialogue(default_model, ["Name three primary colours."]),
               G.dialogue(default_model, ["Write a haiku about the sea."])]
    free = G.generate_with(default_model, prompts, max_new_tokens=8, stop_tokens=(),
                           progress=False)
    word = free.texts[0].split()[2]  # a word in the middle of the first completion
    stopped = G.generate_with(default_model, prompts, max_new_tokens=8, stop_tokens=(),
                              stop_strings=[[word], None], progress=False)
    assert stopped.texts[0] == free.texts[0][: free.texts[0].index(word)]
    assert stopped.stopped_by == ["string", "length"]
    n = len(stopped.tokens[0])
    assert stopped.tokens[0] == free.tokens[0][:n]
    assert word in default_model.tokenizer.decode(stopped.tokens[0])
    assert word not in default_model.tokenizer.decode(stopped.tokens[0][:-1])
    assert stopped.texts[1] == free.texts[1] and stopped.tokens[1] == free.tokens[1]
    kept = G.generate_with(default_model, prompts[:1], max_new_tokens=8, stop_tokens=(),
                           stop_strings=word, keep_stop_string=True, progress=False)
    assert kept.texts[0] == free.texts[0][: free.texts[0].index(word) + len(word)]


# --------------------------------------------------------------------------------------------
# Dialogues
# --------------------------------------------------------------------------------------------


def test_dialogue_matches_the_chat_template(default_model):
    tok = default_model.tokenizer
    turns = ["I will inject a thought. Tell me if you notice it.", "Ok.",
             "Trial 1: Do you detect an injected thought?"]
    messages = [{"role": r, "content": c} for r, c in zip(["user", "assistant", "user"], turns)]
    text = G.dialogue(default_model, turns)
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert tok(text, add_special_tokens=False)["input_ids"] == list(expected)
    assert G.token_lists(default_model, [text]) == [list(expected)]
    prefill = "Yes, I detect an injected thought. The thought is about"
    with_prefill = G.dialogue(default_model, turns, prefill=prefill)
    continued = tok.apply_chat_template(messages + [{"role": "assistant", "content": prefill}],
                                        tokenize=False, continue_final_message=True)
    assert with_prefill == continued
    assert G.dialogue(default_model, [{"role": "system", "content": "Be brief."}, turns[0]]) == \
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, messages[0]],
                                tokenize=False, add_generation_prompt=True)


def test_plain_dialogue_format_and_errors(llama):
    text = G.dialogue(llama, ["Hi.", "Ok.", "Trial 1?"], prefill="Yes,", system="Be brief.",
                      format="plain")
    assert text == ("System: Be brief.\n\nUser: Hi.\n\nAssistant: Ok.\n\nUser: Trial 1?\n\n"
                    "Assistant: Yes,")
    with pytest.raises(ValueError, match="format='plain'"):
        G.dialogue(llama, ["Hi."])  # no tokenizer, so no template
    with pytest.raises(ValueError, match="last turn"):
        G.dialogue(llama, ["Hi.", "Ok."], format="plain")
    with pytest.raises(ValueError, match="alternate"):
        G.dialogue(llama, [{"role": "assistant", "content": "x"}], format="plain")


def test_smollm2_greedy_chat_equals_full_recomputation(default_model):
    """The first prompt against the hand loop; all three by teacher forcing: one forward pass
    over prompt + completion must put its argmax on every next completion token, which holds
    exactly when the full-recomputation loop produces the completion (each position sees the
    tokens that loop's step sees)."""
    texts = [G.dialogue(default_model, [q]) for q in
             ["Who wrote Hamlet?", "Why is the sky blue?", "What is 12 times 7?"]]
    out = G.generate_with(default_model, texts, max_new_tokens=16, stop_tokens=(),
                          progress=False)
    ids = G.token_lists(default_model, texts)
    assert out.prompt_tokens == ids
    assert out.tokens[0] == reference(default_model, ids[0], 16)
    for x, completion in zip(ids, out.tokens):
        logits = default_model(torch.tensor([x + completion]))[0, len(x) - 1:-1]
        assert logits.argmax(-1).tolist() == completion
    # Prefill: generation continues the forced start of the answer.
    pre = G.dialogue(default_model, ["Who wrote Hamlet?"], prefill="The play Hamlet was written by")
    cont = G.generate_with(default_model, pre, max_new_tokens=4, progress=False)
    assert "Shakespeare" in cont.text


# --------------------------------------------------------------------------------------------
# Hooks from a marked position on
# --------------------------------------------------------------------------------------------


def _added_mask(before, after):
    """Where the steer hook changed resid_pre, from captures before and after it."""
    diff = torch.cat(after, dim=1) - torch.cat(before, dim=1)
    return diff.abs().amax(-1) > 0, diff


def test_injection_positions_under_left_padding(model):
    """Per-row starts within each prompt, a control row, prompts of different lengths: the
    vector is added exactly from each row's start (in the padded frame: pads + start) through
    every generated token, nowhere in the control row; outputs equal the per-prompt reference
    with the vector added from that token on."""
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]  # longest first: batch rows keep this order
    starts = [3, None, 1]
    n_new = 6
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)) * 3
    name = "blocks.1.hook_resid_pre"
    before = hooks.capture(model, name, layers=None, append=True)
    steer = hooks.steer(model, vector, layers=[1])
    after = hooks.capture(model, name, layers=None, append=True)
    out = G.generate_with(model, prompts, hooks=[before, steer, after], start=starts,
                          max_new_tokens=n_new, stop_tokens=(), progress=False)
    touched, diff = _added_mask(before[name], after[name])
    width = max(map(len, prompts))
    expected = torch.zeros(len(prompts), width + n_new - 1, dtype=torch.bool)
    for b, (p, s) in enumerate(zip(prompts, starts)):
        if s is not None:
            expected[b, width - len(p) + s:] = True
    assert torch.equal(touched, expected)
    torch.testing.assert_close(diff[touched], vector.expand(int(touched.sum()), -1))
    assert out.starts == starts
    for b, (p, s) in enumerate(zip(prompts, starts)):
        add = None if s is None else (1, vector, s)
        assert out.tokens[b] == reference(model, p, n_new, add=add)
    assert steer.selection.from_position is None  # the hook's own selection is given back


def test_start_errors(llama):
    v = torch.ones(llama.cfg.d_model)
    with pytest.raises(ValueError, match="selects positions"):
        G.generate_with(llama, PROMPTS, hooks=hooks.steer(llama, v, layers=0, positions=-1),
                        start=0, progress=False)
    with pytest.raises(ValueError, match="one per prompt"):
        G.generate_with(llama, PROMPTS, hooks=hooks.steer(llama, v, layers=0), start=[0, 1],
                        progress=False)
    with pytest.raises(ValueError, match="outside the prompt"):
        G.generate_with(llama, PROMPTS, hooks=hooks.steer(llama, v, layers=0), start=5,
                        progress=False)
    with pytest.raises(ValueError, match="needs a text prompt"):
        G.generate_with(llama, PROMPTS, hooks=hooks.steer(llama, v, layers=0),
                        start=G.Marker("x"), progress=False)


def test_marker_resolves_per_row_through_offsets(default_model):
    """`Marker("Trial 1", offset=-1)`: the token before the first token that reaches into
    "Trial 1", found independently by decoding growing prefixes of the prompt's tokens."""
    tok = default_model.tokenizer
    intro = "I will inject a thought. Tell me if you notice it."
    texts = [G.dialogue(default_model, [intro, "Ok.", "Trial 1: Do you detect a thought?"]),
             G.dialogue(default_model, ["Hi.", "Ok.", "Trial 1: anything?"],
                        prefill="Yes, I detect")]
    marker = G.Marker("Trial 1", offset=-1)
    ids = G.token_lists(default_model, texts)
    expected = []
    for text, row in zip(texts, ids):
        char = text.index("Trial 1")
        first = next(i for i in range(len(row)) if len(tok.decode(row[:i + 1])) > char)
        expected.append(first - 1)
        assert G.resolve_start(default_model, text, row, marker) == first - 1
    vector = torch.randn(default_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    name = "blocks.3.hook_resid_pre"
    before = hooks.capture(default_model, name, layers=None, append=True)
    after = hooks.capture(default_model, name, layers=None, append=True)
    out = G.generate_with(default_model, texts, start=[marker, None], max_new_tokens=3,
                          stop_tokens=(), progress=False,
                          hooks=[before, hooks.steer(default_model, vector, layers=[3]), after])
    touched, _ = _added_mask(before[name], after[name])
    width = max(map(len, ids))
    want = torch.zeros_like(touched)
    b = [len(r) for r in ids].index(width)  # the longer prompt is the first batch row
    order = [b, 1 - b]
    for row, j in enumerate(order):
        if j == 0:
            want[row, width - len(ids[0]) + expected[0]:] = True
    assert torch.equal(touched, want)
    assert out.starts == [expected[0], None]


# --------------------------------------------------------------------------------------------
# Memory budget and the cache
# --------------------------------------------------------------------------------------------


def test_batch_size_from_a_memory_budget(llama):
    cfg = llama.cfg
    length = 20
    kv = 2 * cfg.n_layers * cfg.n_key_value_heads * cfg.d_head * length * 4  # float32 K and V
    per_row = G.memory_per_row(llama, length)
    assert per_row > kv
    cache = G.PreallocatedKVCache.allocate(llama, 3, length)
    held = sum(e.keys.numel() + e.values.numel() for e in cache.entries) * 4
    assert held == 3 * kv  # the cache is the part of the estimate that is allocated up front
    budget_gb = 2.5 * per_row / 2**30
    assert G.batch_size_for_memory(llama, length, budget_gb) == 2
    assert G.batch_size_for_memory(llama, length, 1e-9) == 1

    sizes = []
    record = [("blocks.0.hook_resid_pre", lambda act, hook: sizes.append(act.shape[0]))]
    prompts = [p[:2] for p in PROMPTS] * 2  # 8 prompts of 2 tokens
    budget_gb = 3.5 * G.memory_per_row(llama, 2 + 4) / 2**30
    with llama.hooks(fwd_hooks=record):
        out = G.generate_with(llama, prompts, max_new_tokens=4, memory_gb=budget_gb,
                              progress=False)
    assert sizes[0] == 3 and sum(s for s in sizes[::4]) == len(prompts)
    assert out.tokens == [reference(llama, p, 4) for p in prompts]


def test_context_length_is_checked(llama):
    with pytest.raises(ValueError, match="n_ctx"):
        G.generate_with(llama, PROMPTS, max_new_tokens=llama.cfg.n_ctx, progress=False)


def test_per_row_from_position_in_a_plain_forward(llama):
    """`Selection.from_position` per row: [2, None, -1] touches row 0 from position 2, row 1
    nowhere, row 2 at its last position only; compared with a mask built by hand."""
    tokens = torch.tensor([PROMPTS[0][:5], PROMPTS[2][:5], PROMPTS[0][1:6]])
    v = torch.randn(llama.cfg.d_model, generator=torch.Generator().manual_seed(2))
    name = "blocks.0.hook_resid_pre"
    before = hooks.capture(llama, name, layers=None)
    after = hooks.capture(llama, name, layers=None)
    with before, hooks.steer(llama, v, layers=[0], from_position=[2, None, -1]), after:
        llama(tokens)
    touched = (after[name] - before[name]).abs().amax(-1) > 0
    expected = torch.zeros(3, 5, dtype=torch.bool)
    expected[0, 2:] = True
    expected[2, 4] = True
    assert torch.equal(touched, expected)
    with pytest.raises(ValueError, match="per-row starts"), \
            hooks.steer(llama, v, layers=[0], from_position=[1, 2]):
        llama(tokens)
