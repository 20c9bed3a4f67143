"""Query, key and value input sites and the AtP* QK fix on them and on the residual stream.

Exact patching of the split q/k/v inputs is checked against TransformerLens's own generic
patching; AtP* against hand-hooked runs on a model whose metric is linear in its (only)
attention pattern and values, where the QK fix must be exact."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tl_patching

from interp import models
from interp.attribution.atp import attribution_patching
from interp.attribution.atp_star import atp_star
from interp.attribution.patching import exact_patching
from interp.attribution.sites import families, site_config

QKV = ["q_input", "k_input", "v_input"]
QKV_BY_POS = [f"{f}_by_pos" for f in QKV]


def _pairs(model, batch=2, pos=6, seed=0):
    from tests.conftest import _random_pairs

    return _random_pairs(model, batch=batch, pos=pos, seed=seed)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_patching_of_qkv_inputs_equals_transformer_lens(name, direction):
    """TransformerLens's `generic_activation_patch` on `hook_{q,k,v}_input`, run with the same
    flags (split inputs; grouped-query attention ungrouped, so k/v inputs are per query head)."""
    model = models.load(name)
    clean, corrupt, metric = _pairs(model)
    ours = exact_patching(model, clean, corrupt, metric, QKV + QKV_BY_POS, direction=direction,
                          progress=False)
    assert not model.cfg.use_split_qkv_input and not model.cfg.ungroup_grouped_query_attention
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    with site_config(model, families(QKV)):
        _, source_cache = model.run_with_cache(source)
        for fam in QKV + QKV_BY_POS:
            by_pos = fam.endswith("_by_pos")
            theirs = tl_patching.generic_activation_patch(
                model, target, source_cache, lambda logits: metric(logits).mean(),
                patch_setter=(tl_patching.layer_pos_head_vector_patch_setter if by_pos
                              else tl_patching.layer_head_vector_patch_setter),
                activation_name=fam.removesuffix("_by_pos"),
                index_axis_names=("layer", "pos", "head") if by_pos else ("layer", "head"),
            )
            mine = ours[fam].values + ours[fam].baseline
            assert mine.shape == theirs.shape, fam
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0, msg=fam)
            assert ours[fam].values.abs().max() > 1e-2, fam


def test_grouped_key_input_patch_changes_one_query_head_only():
    """Patching head h's key input (GQA: 4 query heads, 2 key/value heads) changes the pattern
    of head h only, even though head h shares its key/value head with another query head."""
    model = models.load("tiny-llama")
    clean, corrupt, metric = _pairs(model)
    fam = families(["k_input"])
    with site_config(model, fam):
        _, source_cache = model.run_with_cache(clean)
        _, target_cache = model.run_with_cache(corrupt)

        def patch(act, hook):
            act = act.clone()
            act[:, :, 1] = source_cache[hook.name][:, :, 1]
            return act

        seen = {}
        model.run_with_hooks(corrupt, fwd_hooks=[
            ("blocks.0.hook_k_input", patch),
            ("blocks.0.attn.hook_pattern", lambda act, hook: seen.setdefault("p", act))])
    changed = (seen["p"] - target_cache["blocks.0.attn.hook_pattern"]).abs().amax((0, 2, 3))
    assert changed[1] > 1e-3 and torch.all(changed[[0, 2, 3]] == 0)


def _linear_in_pattern_model(rotary: bool = True, n_kv: int | None = 2) -> HookedTransformer:
    """One attention layer, no MLP, no norms: the logits are affine in the layer's pattern (with
    the values fixed) and in its values (with the pattern fixed), so AtP*'s step from the exact
    pattern (or values) to the metric is exact. Rotary and grouped-query attention by default."""
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=50, attn_only=True,
        normalization_type=None, act_fn="gelu", seed=3, n_key_value_heads=n_kv,
        positional_embedding_type="rotary" if rotary else "standard",
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:  # sharper patterns: the softmax is far from linear
            block.attn.W_Q.mul_(12.0)
    return model.eval()


@pytest.mark.parametrize("rotary,n_kv", [(True, 2), (False, None)], ids=["rotary-gqa", "standard"])
def test_atp_star_equals_exact_patching_when_the_metric_is_linear_in_the_pattern(rotary, n_kv):
    """Patching a query or key input moves the pattern only, patching a value input the values
    only; when the metric is affine in both, the QK fix (exact pattern, then linear) is exact
    and AtP* equals exact patching, where AtP (linear through the softmax) does not."""
    model = _linear_in_pattern_model(rotary, n_kv)
    clean, corrupt, metric = _pairs(model, batch=3, pos=7)
    fams = QKV + QKV_BY_POS
    exact = exact_patching(model, clean, corrupt, metric, fams, progress=False)
    star = atp_star(model, clean, corrupt, metric, fams)
    atp = attribution_patching(model, clean, corrupt, metric, fams)
    for fam in fams:
        assert star[fam].method == "atp_star" and star[fam].dims == exact[fam].dims
        assert exact[fam].values.abs().max() > 1e-2, fam
        torch.testing.assert_close(star[fam].values, exact[fam].values, atol=1e-4, rtol=1e-4,
                                   msg=fam)
    for fam in ("q_input", "k_input"):  # the softmax bends: AtP is off, which AtP* fixes
        assert (atp[fam].values - exact[fam].values).abs().max() > 1e-3, fam


@pytest.mark.parametrize("rotary,n_kv", [(True, 2), (False, None)], ids=["rotary-gqa", "standard"])
def test_resid_qk_fix_equals_its_three_paths_patched_apart(rotary, n_kv):
    """On the linear-in-pattern model, patching the residual stream at position p acts through
    three paths: the pattern (query row p and key column p together), the values at p, and the
    stream itself. AtP* with the QK fix is exactly the sum of their effects, each measured by a
    hand-hooked run (it leaves out only the pattern x values interaction, which exact patching of
    the site contains):

    - pattern: the target run with its pattern replaced by the one captured from a run with
      resid_pre[p] patched;
    - values: the target run with every head's value input at p patched (split inputs);
    - stream: the target run with the stream after the layer shifted by the patch's delta at p.
    With `qk_layers=0` the resid scores are AtP's."""
    model = _linear_in_pattern_model(rotary, n_kv)
    clean, corrupt, metric = _pairs(model, batch=3, pos=7)
    star = atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=1,
                    resid_through="pattern")["resid"].values[0]
    resid, pattern_hook = "blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern"
    with torch.no_grad():
        _, src = model.run_with_cache(clean)
        _, tgt = model.run_with_cache(corrupt)
        baseline = metric(model(corrupt)).mean()
        delta = src[resid] - tgt[resid]
        expected = torch.zeros(clean.shape[1])
        for p in range(clean.shape[1]):
            def patch_resid(act, hook, p=p):
                act = act.clone()
                act[:, p] = src[hook.name][:, p]
                return act

            seen = {}
            model.run_with_hooks(corrupt, fwd_hooks=[
                (resid, patch_resid), (pattern_hook, lambda act, hook, seen=seen: seen.setdefault("A", act))])
            via_pattern = model.run_with_hooks(corrupt, fwd_hooks=[(pattern_hook, lambda act, hook, seen=seen: seen["A"])])

            def shift(act, hook, p=p):
                act = act.clone()
                act[:, p] += delta[:, p] if act.ndim == 3 else delta[:, p, None]
                return act

            via_stream = model.run_with_hooks(corrupt, fwd_hooks=[("blocks.0.hook_resid_post", shift)])
            with site_config(model, families(["v_input"])):
                via_values = model.run_with_hooks(corrupt, fwd_hooks=[("blocks.0.hook_v_input", shift)])
            expected[p] = sum(metric(logits).mean() - baseline
                              for logits in (via_pattern, via_stream, via_values))
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(star, expected, atol=1e-4, rtol=1e-4)
    atp = attribution_patching(model, clean, corrupt, metric, ["resid"])["resid"].values
    assert (atp[0] - expected).abs().max() > 1e-2  # the fix changes something here
    plain = atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=0)["resid"].values
    torch.testing.assert_close(plain, atp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rotary,n_kv", [(True, 2), (False, None)], ids=["rotary-gqa", "standard"])
def test_resid_fix_through_head_outputs_equals_exact_patching_when_the_metric_is_linear_in_z(rotary, n_kv):
    """With `resid_through="head_output"` the fix computes each head's output exactly for the
    query, key and value change at p together (pattern x value interaction included); on the
    one-layer model the metric is affine in the head outputs and the stream, so AtP* equals
    exact patching of the residual stream, where the pattern-only fix does not."""
    model = _linear_in_pattern_model(rotary, n_kv)
    clean, corrupt, metric = _pairs(model, batch=3, pos=7)
    exact = exact_patching(model, clean, corrupt, metric, ["resid"], progress=False)["resid"].values
    z = atp_star(model, clean, corrupt, metric, ["resid"])["resid"]  # the default: head outputs
    pattern = atp_star(model, clean, corrupt, metric, ["resid"],
                       resid_through="pattern")["resid"].values
    assert exact.abs().max() > 1e-2
    torch.testing.assert_close(z.values, exact, atol=1e-4, rtol=1e-4)
    assert (pattern - exact).abs().max() > 1e-3  # the interaction term matters here


def _sharp_two_layer_model(n_key_value_heads: int | None = None) -> HookedTransformer:
    """Two rotary attention layers, no norms or MLPs; layer 1's queries scaled up so that its
    pattern reacts strongly to a shift of its input stream (the second-order term is large)."""
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=16,
                                  d_vocab=50, attn_only=True, normalization_type=None,
                                  act_fn="gelu", seed=5, positional_embedding_type="rotary",
                                  n_key_value_heads=n_key_value_heads)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        model.blocks[1].attn.W_Q.mul_(12.0)
    return model


def _second_layer_change_by_hand(model, clean, corrupt, metric, frozen: str, inputs: str):
    """Per position p of a layer-0 residual site, `E - D`: E, the effect on the metric of
    replacing layer 1's `frozen` activation (its pattern, or its head outputs) by the one it
    has when layer 1's input stream at p is shifted by the site's clean-minus-corrupt delta
    (hooked runs), D the first-order effect of that shift through layer 1's `inputs` (query,
    key and perhaps value inputs; autograd of the metric with respect to a scale on it)."""
    _, src = model.run_with_cache(clean)
    _, tgt = model.run_with_cache(corrupt)
    delta = src["blocks.0.hook_resid_pre"] - tgt["blocks.0.hook_resid_pre"]
    baseline = metric(model(corrupt)).mean()
    expected = torch.zeros(clean.shape[1])
    name = f"blocks.1.{frozen}"
    for p in range(clean.shape[1]):
        seen = {}

        def shift_stream(act, hook, p=p):
            act = act.clone()
            act[:, p] += delta[:, p]
            return act

        with torch.no_grad():
            model.run_with_hooks(corrupt, fwd_hooks=[
                ("blocks.1.hook_resid_pre", shift_stream),
                (name, lambda act, hook, seen=seen: seen.setdefault("frozen", act))])
            logits = model.run_with_hooks(corrupt, fwd_hooks=[
                (name, lambda act, hook, seen=seen: seen["frozen"])])
        effect = metric(logits).mean() - baseline
        scale = torch.zeros((), requires_grad=True)

        def shift_input(act, hook, p=p, scale=scale):
            act = act.clone()
            act[:, p] += scale * delta[:, p, None]
            return act

        with site_config(model, families(["q_input"])):
            logits = model.run_with_hooks(corrupt, fwd_hooks=[
                (f"blocks.1.hook_{x}_input", shift_input) for x in inputs])
        (first_order,) = torch.autograd.grad(metric(logits).mean(), scale)
        expected[p] = effect - first_order
    return expected


def test_resid_qk_fix_of_a_later_layer_equals_its_pattern_patched_by_hand():
    """Two attention layers, no norms or MLPs. Going from `qk_layers=1` to `2` changes the
    score of a layer-0 site by `E - D`: E, the effect of replacing layer 1's pattern by the one
    it has when its input stream at p is shifted by the site's delta (the metric is affine in
    the last layer's pattern, so E is measured exactly by a hooked run), minus D, the first-order
    effect of that shift through layer 1's query and key inputs (autograd of the metric with
    respect to a scale on the shift)."""
    model = _sharp_two_layer_model()
    clean, corrupt, metric = _pairs(model, batch=2, pos=6)
    kw = {"resid_through": "pattern"}
    one = atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=1, **kw)["resid"].values[0]
    two = atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=2, **kw)["resid"].values[0]
    every = atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=None, **kw)["resid"].values[0]
    torch.testing.assert_close(two, every)  # two layers is all there are
    expected = _second_layer_change_by_hand(model, clean, corrupt, metric, "attn.hook_pattern", "qk")
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(two - one, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.unchecked
def test_qk_layers_and_resid_through_are_checked():
    model = models.load("tiny-llama")
    clean, corrupt, metric = _pairs(model)
    with pytest.raises(ValueError, match="qk_layers must be a number of layers >= 0"):
        atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=-1)
    with pytest.raises(ValueError, match="resid_through must be 'pattern' or 'head_output'"):
        atp_star(model, clean, corrupt, metric, ["resid"], resid_through="z")


def test_site_config_restores_the_flags_also_after_an_error():
    model = models.load("tiny-llama")
    clean, corrupt, metric = _pairs(model)
    atp_star(model, clean, corrupt, metric, ["resid", "k_input"])
    assert not model.cfg.use_split_qkv_input and not model.cfg.ungroup_grouped_query_attention
    with pytest.raises(RuntimeError, match="boom"):
        with site_config(model, families(["q_input"])):
            assert model.cfg.use_split_qkv_input and model.cfg.ungroup_grouped_query_attention
            raise RuntimeError("boom")
    assert not model.cfg.use_split_qkv_input and not model.cfg.ungroup_grouped_query_attention
    with site_config(model, families(["resid"])):  # families without split inputs: no change
        assert not model.cfg.use_split_qkv_input


def test_resid_fix_through_head_outputs_of_a_later_layer_equals_its_outputs_patched_by_hand():
    """As the pattern test above, for `resid_through="head_output"`: from `qk_layers=1` to `2`
    a layer-0 site's score changes by E - D, E the effect of replacing layer 1's head outputs by
    those it computes when its input stream at p is shifted by the site's delta (hooked run;
    the metric is affine in the last layer's z), D the first-order effect of that shift through
    layer 1's query, key and value inputs (autograd)."""
    model = _sharp_two_layer_model(n_key_value_heads=2)
    clean, corrupt, metric = _pairs(model, batch=2, pos=6)
    kw = {"resid_through": "head_output"}
    one = atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=1, **kw)["resid"].values[0]
    two = atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=2, **kw)["resid"].values[0]
    expected = _second_layer_change_by_hand(model, clean, corrupt, metric, "attn.hook_z", "qkv")
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(two - one, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rotary,n_kv", [(True, 2), (False, None)], ids=["rotary-gqa", "standard"])
def test_integrated_gradients_on_value_inputs_equals_exact_patching_when_affine(rotary, n_kv):
    """IG along each activation, on the value inputs of a model whose metric is affine in them
    (one attention layer, no norms): every interpolation point has the same gradient, so IG is
    exact; it also needs the split-input flags on (`site_config`) to see the sites at all."""
    from interp.attribution.ig import integrated_gradients

    model = _linear_in_pattern_model(rotary, n_kv)
    clean, corrupt, metric = _pairs(model, batch=3, pos=7)
    fams = ["v_input", "v_input_by_pos"]
    exact = exact_patching(model, clean, corrupt, metric, fams, progress=False)
    ig = integrated_gradients(model, clean, corrupt, metric, fams, steps=3, path="activations")
    for fam in fams:
        assert exact[fam].values.abs().max() > 1e-2, fam
        torch.testing.assert_close(ig[fam].values, exact[fam].values, atol=1e-4, rtol=1e-4, msg=fam)
    assert not model.cfg.use_split_qkv_input  # flags restored
