"""Tests for interp.hooks: every check compares with the math (or with an un-hooked run), never
with the code under test."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from interp import hooks
from interp.models import load

MODELS = ["tiny-gpt2", "tiny-llama"]
BATCH, SEQ = 3, 12


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return load(request.param)


@pytest.fixture(scope="module")
def gpt2():
    return load("tiny-gpt2")


def _tokens(seed: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _positions_mask(selected: set[int], seq: int = SEQ) -> torch.Tensor:
    return torch.tensor([p in selected for p in range(seq)])


# --------------------------------------------------------------------------------------------
# Directional ablation
# --------------------------------------------------------------------------------------------


def test_ablate_direction_removes_component_and_keeps_the_rest(model):
    tokens = _tokens(0)
    direction = _randn(model.cfg.d_model, seed=1)
    unit = (direction / direction.norm()).double()
    families = ("resid_pre", "attn_out", "mlp_out")
    with (
        hooks.capture(model, families) as before,
        hooks.ablate_direction(model, direction),
        hooks.capture(model, families) as after,
    ):
        model(tokens)
    assert len(after) == 3 * model.cfg.n_layers
    for name in after:
        x, y = before[name].double(), after[name].double()
        component = y @ unit
        assert (component.abs() <= 1e-5 * y.norm(dim=-1)).all(), name
        # The orthogonal part is what the hook was given: x - (x . d) d.
        expected = x - (x @ unit)[..., None] * unit
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # And the ablation really did something: the un-ablated input had a component.
    assert (before["blocks.0.hook_resid_pre"].double() @ unit).abs().max() > 1e-2


def test_ablate_direction_at_positions_only(gpt2):
    tokens = _tokens(1)
    direction = _randn(64, seed=2)
    _, base = gpt2.run_with_cache(tokens)
    name = "blocks.1.hook_resid_pre"
    with hooks.ablate_direction(gpt2, direction, layers=1, hooks="resid_pre", positions=[0, -1]):
        with hooks.capture(gpt2, name, layers=None) as store:
            gpt2(tokens)
    unit = direction / direction.norm()
    x, y = base[name], store[name]
    touched = _positions_mask({0, SEQ - 1})
    assert torch.equal(y[:, ~touched], x[:, ~touched])
    xt = x[:, touched]
    torch.testing.assert_close(y[:, touched], xt - (xt @ unit)[..., None] * unit)


def test_ablate_direction_per_layer_directions(gpt2):
    tokens = _tokens(2)
    directions = _randn(2, 64, seed=3)
    with (
        hooks.capture(gpt2, "resid_pre") as before,
        hooks.ablate_direction(gpt2, directions, hooks="resid_pre"),
        hooks.capture(gpt2, "resid_pre") as after,
    ):
        gpt2(tokens)
    for layer in range(2):
        name = f"blocks.{layer}.hook_resid_pre"
        unit = directions[layer] / directions[layer].norm()
        x = before[name]
        torch.testing.assert_close(after[name], x - (x @ unit)[..., None] * unit)


# --------------------------------------------------------------------------------------------
# Steering
# --------------------------------------------------------------------------------------------

STEER_CASES = [
    (dict(positions=3), {3}),
    (dict(positions=[1, 4]), {1, 4}),
    (dict(positions=slice(2, 5)), {2, 3, 4}),
    (dict(positions=-1), {SEQ - 1}),
    (dict(positions=[-2, 0]), {SEQ - 2, 0}),
    (dict(positions=slice(-3, None)), {SEQ - 3, SEQ - 2, SEQ - 1}),
    (dict(positions=torch.tensor([5, 6])), {5, 6}),
    (dict(from_position=7), set(range(7, SEQ))),
    (dict(from_position=-2), {SEQ - 2, SEQ - 1}),
    (dict(), set(range(SEQ))),
]


@pytest.mark.parametrize("where, selected", STEER_CASES)
def test_steer_adds_scale_vector_at_positions(model, where, selected):
    tokens = _tokens(3)
    vector = _randn(model.cfg.d_model, seed=4)
    scale = 2.5
    _, base = model.run_with_cache(tokens)
    with (
        hooks.steer(model, vector, layers=[1], scale=scale, **where),
        hooks.capture(model, "resid_pre") as store,
    ):
        model(tokens)
    # Upstream of the steered hook point nothing changes.
    assert torch.equal(store["blocks.0.hook_resid_pre"], base["blocks.0.hook_resid_pre"])
    diff = store["blocks.1.hook_resid_pre"] - base["blocks.1.hook_resid_pre"]
    touched = _positions_mask(selected)
    torch.testing.assert_close(
        diff[:, touched], (scale * vector).expand_as(diff[:, touched]), atol=1e-5, rtol=1e-5
    )
    assert (diff[:, ~touched] == 0).all()


@pytest.mark.parametrize("family", ["resid_post", "attn_out", "mlp_out"])
def test_steer_other_families_and_per_layer_vectors(gpt2, family):
    tokens = _tokens(4)
    vectors = _randn(2, 64, seed=5)
    with (
        hooks.capture(gpt2, family) as before,
        hooks.steer(gpt2, vectors, layers=[0, 1], hook=family, scale=-3.0),
        hooks.capture(gpt2, family) as after,
    ):
        gpt2(tokens)
    for layer in range(2):
        name = hooks.HOOK_FAMILIES[family].format(L=layer)
        expected = (-3.0 * vectors[layer]).expand(BATCH, SEQ, 64)
        torch.testing.assert_close(after[name] - before[name], expected)


@pytest.mark.parametrize(
    "where", [dict(from_position=5), dict(positions=[3, 9]), dict(positions=slice(2, 10))]
)
def test_steer_positions_are_absolute_under_kv_cache(model, where):
    """Running the sequence in two chunks through a KV cache steers the same absolute
    positions as one full forward pass."""
    tokens = _tokens(5, batch=2)
    vector = 3 * _randn(model.cfg.d_model, seed=6)
    with hooks.steer(model, vector, layers=[1], **where):
        full = model(tokens)
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 2)
        ones = torch.ones(2, SEQ, dtype=torch.long)
        first = model(tokens[:, :8], past_kv_cache=cache, attention_mask=ones[:, :8])
        second = model(tokens[:, 8:], past_kv_cache=cache, attention_mask=ones[:, 8:])
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full, model(tokens), atol=1e-3)  # steering had an effect


def test_steer_during_generation_sees_new_tokens(model):
    tokens = _tokens(6, batch=2)
    vector = _randn(64, seed=7)
    with (
        hooks.capture(model, "resid_pre", layers=1, append=True) as before,
        hooks.steer(model, vector, layers=[1], from_position=SEQ + 1),
        hooks.capture(model, "resid_pre", layers=1, append=True) as after,
    ):
        model.generate(
            tokens, max_new_tokens=3, use_past_kv_cache=True, stop_at_eos=False, verbose=False,
            do_sample=False,
        )
    name = "blocks.1.hook_resid_pre"
    shapes = [tuple(t.shape) for t in after[name]]
    assert shapes == [(2, SEQ, 64), (2, 1, 64), (2, 1, 64)]
    # Prompt (positions 0..11) and first new token (12) untouched; tokens 13 and 14 steered.
    for step, steered in enumerate([False, False, True]):
        diff = after[name][step] - before[name][step]
        expected = vector.expand_as(diff) if steered else torch.zeros_like(diff)
        torch.testing.assert_close(diff, expected)


# --------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------


def test_patch_resid_pre_layer0_reproduces_source_logits(model):
    source_tokens, target_tokens = _tokens(7), _tokens(8)
    source_logits, source = model.run_with_cache(source_tokens)
    with hooks.patch(model, source, "resid_pre", layers=0):
        patched = model(target_tokens)
    assert torch.equal(patched, source_logits)
    assert not torch.allclose(model(target_tokens), source_logits)


def _patch_and_capture(model, name, **kwargs):
    """(source, target, patched) activations at hook point `name`."""
    source_tokens, target_tokens = _tokens(9), _tokens(10)
    _, source = model.run_with_cache(source_tokens)
    _, target = model.run_with_cache(target_tokens)
    with (
        hooks.patch(model, source, name, layers=None, **kwargs),
        hooks.capture(model, name, layers=None) as store,
    ):
        model(target_tokens)
    return source[name], target[name], store[name]


def test_patch_heads_and_positions(model):
    name = "blocks.1.attn.hook_z"
    src, tgt, got = _patch_and_capture(model, name, heads=[1, 3], positions=[2, -1])
    expected = tgt.clone()
    for pos in (2, SEQ - 1):
        for head in (1, 3):
            expected[:, pos, head] = src[:, pos, head]
    assert torch.equal(got, expected)
    assert not torch.equal(got, tgt)


def test_patch_pattern_by_head_and_query_position(model):
    name = "blocks.0.attn.hook_pattern"
    src, tgt, got = _patch_and_capture(model, name, heads=2, positions=slice(4, 6))
    expected = tgt.clone()
    expected[:, 2, 4:6, :] = src[:, 2, 4:6, :]  # [batch, head, query_pos, key_pos]
    assert torch.equal(got, expected)


def test_patch_neurons(model):
    src, tgt, got = _patch_and_capture(model, "blocks.1.mlp.hook_post", neurons=[0, 7, -1])
    expected = tgt.clone()
    expected[..., [0, 7, -1]] = src[..., [0, 7, -1]]
    assert torch.equal(got, expected)


def test_patch_gqa_key_heads():
    model = load("tiny-llama")
    src, tgt, got = _patch_and_capture(model, "blocks.0.attn.hook_k", heads=1)
    assert got.shape[2] == model.cfg.n_key_value_heads == 2
    expected = tgt.clone()
    expected[:, :, 1] = src[:, :, 1]
    assert torch.equal(got, expected)
    _, source = model.run_with_cache(_tokens(9))
    bad = hooks.patch(model, source, "k", layers=0, heads=3)
    message = r"head 3 is out of range for 'blocks.0.attn.hook_k', which has 2 heads"
    with pytest.raises(ValueError, match=message):
        model.run_with_hooks(_tokens(10), fwd_hooks=bad.fwd_hooks())


def test_patch_batch_one_source_broadcasts(gpt2):
    _, source = gpt2.run_with_cache(_tokens(11, batch=1))
    target_tokens = _tokens(12)
    _, target = gpt2.run_with_cache(target_tokens)
    name = "blocks.1.hook_resid_pre"
    with (
        hooks.patch(gpt2, source, name, layers=None, positions=-1),
        hooks.capture(gpt2, name, layers=None) as store,
    ):
        gpt2(target_tokens)
    expected = target[name].clone()
    expected[:, -1] = source[name][0, -1]
    assert torch.equal(store[name], expected)


def test_patch_from_dict_without_model(gpt2):
    name = "blocks.0.hook_mlp_out"
    replacement = {name: _randn(1, SEQ, 64, seed=13)}
    h = hooks.patch(None, replacement, name, layers=None, positions=[0])
    store = hooks.capture(None, name, layers=None)
    gpt2.run_with_hooks(_tokens(14), fwd_hooks=h.fwd_hooks() + store.fwd_hooks())
    assert torch.equal(store[name][:, 0], replacement[name][0, 0].expand(BATCH, 64))


@pytest.mark.parametrize("source_shape", [(BATCH, 10), (2, SEQ)])
def test_patch_shape_mismatch_names_hook_and_shapes(gpt2, source_shape):
    _, source = gpt2.run_with_cache(_tokens(15, *source_shape))
    h = hooks.patch(gpt2, source, "resid_pre", layers=1)
    b, s = source_shape
    message = (
        rf"'blocks.1.hook_resid_pre' has shape \({b}, {s}, 64\)"
        rf".*activation's shape \({BATCH}, {SEQ}, 64\)"
    )
    with pytest.raises(ValueError, match=message), h:
        gpt2(_tokens(16))


# --------------------------------------------------------------------------------------------
# Zero, mean and resample ablation
# --------------------------------------------------------------------------------------------


def _run_and_capture(model, hook, name, tokens):
    with hook, hooks.capture(model, name, layers=None) as store:
        model(tokens)
    return store[name]


def test_zero_ablate(model):
    tokens = _tokens(17)
    name = "blocks.1.attn.hook_z"
    _, base = model.run_with_cache(tokens)
    h = hooks.zero_ablate(model, "z", layers=1, heads=0, positions=[1, 2])
    got = _run_and_capture(model, h, name, tokens)
    expected = base[name].clone()
    expected[:, 1:3, 0] = 0
    assert torch.equal(got, expected)


def test_mean_ablate_over_batch(model):
    tokens = _tokens(18)
    _, reference = model.run_with_cache(_tokens(19, batch=5))
    name = "blocks.0.hook_attn_out"
    _, base = model.run_with_cache(tokens)
    h = hooks.mean_ablate(model, reference, "attn_out", layers=0, positions=[0, 5])
    got = _run_and_capture(model, h, name, tokens)
    expected = base[name].clone()
    mean = reference[name].double().sum(0) / 5  # [pos, d_model]
    expected[:, [0, 5]] = mean[[0, 5]].float()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_mean_ablate_over_batch_and_positions_with_neurons(model):
    tokens = _tokens(20)
    _, reference = model.run_with_cache(_tokens(21, batch=4, seq=7))  # any sequence length
    name = "blocks.1.mlp.hook_post"
    _, base = model.run_with_cache(tokens)
    h = hooks.mean_ablate(model, reference, "mlp_post", layers=1, over="batch_pos", neurons=[2, 5])
    got = _run_and_capture(model, h, name, tokens)
    mean = reference[name].double().flatten(0, 1).mean(0)  # [d_mlp]
    expected = base[name].clone()
    expected[..., [2, 5]] = mean[[2, 5]].float()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_mean_ablate_precomputed_means(gpt2):
    tokens = _tokens(22)
    name = "blocks.0.hook_resid_post"
    means = {name: _randn(1, 1, 64, seed=23)}
    h = hooks.mean_ablate(gpt2, means, name, layers=None, over=None)
    got = _run_and_capture(gpt2, h, name, tokens)
    assert torch.equal(got, means[name].expand(BATCH, SEQ, 64))


def test_resample_rows_follow_the_documented_permutation():
    for batch in (2, 5, 8):
        perm = torch.randperm(batch, generator=torch.Generator().manual_seed(3))
        rows = hooks.resample_rows(batch, seed=3)
        for j in range(batch):
            assert rows[perm[j]] == perm[(j + 1) % batch]
        assert sorted(rows.tolist()) == list(range(batch))
        assert (rows != torch.arange(batch)).all()
        assert torch.equal(hooks.resample_rows(batch, seed=3, avoid_self=False), perm)


def test_resample_ablate_takes_rows_from_other_inputs(model):
    tokens = _tokens(24, batch=4)
    _, source = model.run_with_cache(tokens)
    name = "blocks.1.hook_mlp_out"
    h = hooks.resample_ablate(model, source, "mlp_out", layers=1, seed=5, positions=slice(0, 6))
    got = _run_and_capture(model, h, name, tokens)
    rows = h.source_rows
    assert (rows != torch.arange(4)).all()
    for i in range(4):
        assert torch.equal(got[i, :6], source[name][rows[i], :6])
        assert torch.equal(got[i, 6:], source[name][i, 6:])


# --------------------------------------------------------------------------------------------
# Composition, attachment and the plain-callable form
# --------------------------------------------------------------------------------------------


def test_hooks_on_one_hook_point_apply_in_order_entered(gpt2):
    tokens = _tokens(25)
    v = _randn(64, seed=26)
    unit = v / v.norm()
    name = "blocks.1.hook_resid_pre"
    ablate = hooks.ablate_direction(gpt2, v, layers=1, hooks="resid_pre")
    with hooks.steer(gpt2, v, layers=1), ablate:
        with hooks.capture(gpt2, name, layers=None) as store:
            gpt2(tokens)
    assert (store[name] @ unit).abs().max() < 1e-4  # ablation ran last
    with ablate, hooks.steer(gpt2, v, layers=1):
        with hooks.capture(gpt2, name, layers=None) as store:
            gpt2(tokens)
    torch.testing.assert_close(store[name] @ unit, torch.full((BATCH, SEQ), float(v.norm())))


def test_context_managers_remove_only_their_own_hooks(gpt2):
    name = "blocks.0.hook_resid_pre"
    calls = []

    def user_hook(act, hook):
        calls.append(hook.name)

    gpt2.add_hook(name, user_hook)
    try:
        point = gpt2.hook_dict[name]
        assert len(point.fwd_hooks) == 1
        a = hooks.steer(gpt2, _randn(64), layers=0)
        b = hooks.capture(gpt2, "resid_pre", layers=0)
        a.attach()
        b.attach()
        assert len(point.fwd_hooks) == 3
        a.detach()  # not last in, first out
        gpt2(_tokens(27))
        assert b.attached and name in b
        b.detach()
        assert len(point.fwd_hooks) == 1 and point.fwd_hooks[0].user_hook is user_hook
        calls.clear()
        gpt2(_tokens(27))
        assert calls == [name]  # the user's hook still fires
        # Ours survive TransformerLens's own temporary hooks...
        with hooks.steer(gpt2, _randn(64), layers=0) as s:
            gpt2.run_with_hooks(_tokens(27), fwd_hooks=[(name, lambda act, hook: None)])
            assert s.attached and len(point.fwd_hooks) == 2
        # ...and exiting after model.reset_hooks() removed everything is not an error.
        with hooks.steer(gpt2, _randn(64), layers=0):
            gpt2.reset_hooks()
    finally:
        gpt2.reset_hooks()
    assert all(not p.fwd_hooks for p in gpt2.hook_dict.values())
    assert all(not block._forward_pre_hooks for block in gpt2.blocks)


def test_fwd_hooks_form_matches_context_manager_form(model):
    tokens = _tokens(28)
    _, source = model.run_with_cache(_tokens(29))
    makers = [
        lambda: hooks.steer(
            model, _randn(model.cfg.d_model), layers=[0, 1], positions=[2, -1], scale=3.0
        ),
        lambda: hooks.ablate_direction(model, _randn(model.cfg.d_model)),
        lambda: hooks.patch(model, source, "z", layers=1, heads=1),
    ]
    for make in makers:
        h = make()
        with h:
            expected = model(tokens)
        assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=h.fwd_hooks()), expected)
        with model.hooks(fwd_hooks=h.fwd_hooks()):
            assert torch.equal(model(tokens), expected)
        assert not torch.allclose(model(tokens), expected)


def test_capture_keeps_grad_on_request(gpt2):
    with torch.enable_grad():
        vector = _randn(64).requires_grad_()
        with (
            hooks.steer(gpt2, vector, layers=1),
            hooks.capture(gpt2, "resid_pre", layers=1, keep_grad=True) as kept,
        ):
            gpt2(_tokens(30))
        kept["blocks.1.hook_resid_pre"].sum().backward()
        torch.testing.assert_close(vector.grad, torch.full((64,), float(BATCH * SEQ)))
        with hooks.capture(gpt2, "resid_pre", layers=1) as detached:
            gpt2(_tokens(30))
        assert not detached["blocks.1.hook_resid_pre"].requires_grad


def _grads_by_zero_offsets(model, runs, names, loss_of):
    """d loss / d activation at `names` by hand, without `capture`: each forward pass adds a
    zero tensor that requires grad at every hook point (`act + eps` has the value of `act`),
    and the gradient with respect to `eps` is the gradient with respect to the activation."""
    eps: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def add_zero(act, hook):
        e = torch.zeros_like(act, requires_grad=True)
        eps[hook.name].append(e)
        return act + e

    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, add_zero) for n in names]):
        loss = loss_of([model(tokens) for tokens in runs])
        flat = [e for n in names for e in eps[n]]
        grads = iter(torch.autograd.grad(loss, flat))
    return {n: [next(grads) for _ in eps[n]] for n in names}, loss.detach()


def _loss(logits_list):
    return sum((i + 1) * logits[:, -1].logsumexp(-1).sum() for i, logits in enumerate(logits_list))


def test_capture_with_grad_matches_autograd_on_a_hand_hooked_run(model):
    names = hooks.hook_names(model, ["resid_pre", "attn_out", "z", "mlp_post"], layers="all")
    runs = [_tokens(40)]
    expected, expected_loss = _grads_by_zero_offsets(model, runs, names, _loss)
    with torch.enable_grad(), hooks.capture(model, names, keep_grad=True) as kept:
        loss = _loss([model(tokens) for tokens in runs])
        grads = torch.autograd.grad(loss, [kept[n] for n in names])
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=0, atol=0)
    for name, grad in zip(names, grads):
        assert kept[name].requires_grad and kept[name].grad_fn is not None  # not detached
        torch.testing.assert_close(grad, expected[name][0], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        _, cache = model.run_with_cache(runs[0], names_filter=names)
    for name in names:  # the values themselves: the activations the model computed
        torch.testing.assert_close(kept[name].detach(), cache[name], rtol=0, atol=0)


def test_capture_with_grad_append_keeps_one_graph_node_per_forward_pass(gpt2):
    names = hooks.hook_names(gpt2, ["resid_mid", "mlp_out"], layers=[0, 1])
    runs = [_tokens(41), _tokens(42), _tokens(43)]
    expected, _ = _grads_by_zero_offsets(gpt2, runs, names, _loss)
    with torch.enable_grad(), hooks.capture(gpt2, names, keep_grad=True, append=True) as kept:
        loss = _loss([gpt2(tokens) for tokens in runs])
        assert all(len(kept[n]) == len(runs) for n in names)
        grads = torch.autograd.grad(loss, [a for n in names for a in kept[n]])
    grads = iter(grads)
    for name in names:
        for i in range(len(runs)):  # the runs are weighted 1, 2, 3 in the loss: order matters
            torch.testing.assert_close(next(grads), expected[name][i], rtol=1e-5, atol=1e-7)


def test_capture_with_grad_sees_earlier_hooks_not_later_ones(gpt2):
    """A patch entered before the capture is what it records (its leaf gets the gradient); a
    hook entered after it (here: doubling the activation) acts downstream of the capture."""
    name = "blocks.1.hook_resid_pre"
    tokens = _tokens(44)
    with torch.no_grad():
        _, cache = gpt2.run_with_cache(_tokens(45), names_filter=[name])
    leaf = cache[name].clone().requires_grad_(True)
    with torch.enable_grad():
        with (
            hooks.patch(gpt2, {name: leaf}, name),
            hooks.capture(gpt2, name, keep_grad=True) as kept,
            gpt2.hooks(fwd_hooks=[(name, lambda act, hook: 2 * act)]),
        ):
            loss = gpt2(tokens)[:, -1].logsumexp(-1).sum()
        assert kept[name] is leaf
        (grad_kept,) = torch.autograd.grad(loss, [kept[name]])
        # by hand: the same run with the doubled patched value put in at layer 1
        doubled = (2 * cache[name]).requires_grad_(True)
        with gpt2.hooks(fwd_hooks=[(name, lambda act, hook: doubled)]):
            loss_ref = gpt2(tokens)[:, -1].logsumexp(-1).sum()
        (grad_doubled,) = torch.autograd.grad(loss_ref, [doubled])
    torch.testing.assert_close(loss.detach(), loss_ref.detach())
    torch.testing.assert_close(grad_kept, 2 * grad_doubled)  # chain rule through x -> 2x


def test_hook_family_reads_the_registry():
    for family, template in hooks.HOOK_FAMILIES.items():
        assert hooks.hook_family(template) == family
        assert hooks.hook_family(template.format(L=7)) == family
    assert hooks.hook_family("blocks.3.hook_resid_pre.hook_sae_acts_post") is None
    assert hooks.hook_family("hook_embed") is None
    assert hooks.hook_family("blocks.2.ln1.hook_normalized") is None


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.unchecked
def test_errors(gpt2):
    v = _randn(64)
    with pytest.raises(ValueError, match=r"size 32 in its last dimension, expected d_model=64"):
        hooks.steer(gpt2, _randn(32), layers=0)
    with pytest.raises(ValueError, match=r"3 rows, expected one per chosen layer: 2"):
        hooks.steer(gpt2, _randn(3, 64), layers="all")
    with pytest.raises(ValueError, match=r"unknown hook family 'resid'.*known families: resid_pre"):
        hooks.steer(gpt2, v, layers=0, hook="resid")
    with pytest.raises(ValueError, match=r"layer 5 is out of range: the model has n_layers=2"):
        hooks.ablate_direction(gpt2, v, layers=[0, 5])
    with pytest.raises(ValueError, match=r"no hook point 'blocks.0.hook_resid_pree'.*did you mean"):
        hooks.capture(gpt2, "blocks.0.hook_resid_pree")
    with pytest.raises(ValueError, match=r"use_attn_result"):
        hooks.zero_ablate(gpt2, "result", layers=0)
    with pytest.raises(ValueError, match=r"heads= needs hook points with a head axis"):
        hooks.zero_ablate(gpt2, "resid_pre", layers=0, heads=1)
    with pytest.raises(ValueError, match=r"neurons= indexes the last axis"):
        hooks.zero_ablate(gpt2, "z", layers=0, neurons=1)
    with pytest.raises(ValueError, match=r"not both"):
        hooks.steer(gpt2, v, layers=0, positions=1, from_position=2)
    with pytest.raises(ValueError, match=r"positions must be an int"):
        hooks.steer(gpt2, v, layers=0, positions=1.5)
    with pytest.raises(ValueError, match=r"position 12 is out of range.*sequence has 12 tokens"):
        with hooks.steer(gpt2, v, layers=0, positions=[0, 12]):
            gpt2(_tokens(31))
    with pytest.raises(ValueError, match=r"layers='all' needs the model"):
        hooks.steer(None, v, layers="all")
    with pytest.raises(ValueError, match=r"every hook is a full hook name"):
        hooks.steer(gpt2, v, layers=[1], hook="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match=r"direction is zero"):
        hooks.ablate_direction(gpt2, torch.zeros(64))
    with pytest.raises(ValueError, match=r"built without a model"):
        with hooks.steer(None, v, layers=None, hook="blocks.0.hook_resid_pre"):
            pass
    _, cache = gpt2.run_with_cache(_tokens(32, batch=1))
    with pytest.raises(ValueError, match=r"at least 2 source rows"):
        hooks.resample_ablate(gpt2, cache, "resid_pre", layers=0)
    with pytest.raises(ValueError, match=r"over must be"):
        hooks.mean_ablate(gpt2, cache, "resid_pre", layers=0, over="pos")
    with pytest.raises(ValueError, match=r"no activation for 'blocks.0.hook_resid_pre'"):
        other = {"blocks.1.hook_resid_pre": torch.zeros(1, SEQ, 64)}
        hooks.patch(gpt2, other, "resid_pre", layers=0)
    h = hooks.steer(gpt2, v, layers=0)
    with h, pytest.raises(RuntimeError, match=r"already attached"):
        h.attach()


# --------------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------------


def test_bfloat16_model():
    model = load("tiny-llama", dtype="bfloat16")
    tokens = _tokens(33)
    direction = _randn(64, seed=34)
    unit = (direction / direction.norm()).double()
    with (
        hooks.ablate_direction(model, direction),
        hooks.capture(model, ("resid_pre", "attn_out", "mlp_out")) as store,
    ):
        model(tokens)
    for name, act in store.items():
        assert act.dtype == torch.bfloat16
        # bfloat16 rounding of the (float32) result: relative error ~2**-8 per entry.
        assert ((act.double() @ unit).abs() <= 2e-2 * act.double().norm(dim=-1) + 1e-6).all(), name

    vector = _randn(64, seed=35)
    _, base = model.run_with_cache(tokens)
    with (
        hooks.steer(model, vector, layers=1, positions=-1, scale=2.0),
        hooks.capture(model, "resid_pre", layers=1) as store,
    ):
        model(tokens)
    name = "blocks.1.hook_resid_pre"
    diff = store[name].float() - base[name].float()
    torch.testing.assert_close(diff[:, -1], (2.0 * vector).expand(BATCH, 64), atol=0.1, rtol=0.02)
    assert (diff[:, :-1] == 0).all()

    source_logits, source = model.run_with_cache(_tokens(36))
    with hooks.patch(model, source, "resid_pre", layers=0):
        assert torch.equal(model(tokens), source_logits)
