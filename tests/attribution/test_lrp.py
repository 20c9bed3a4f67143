"""LRP rules (`interp.attribution.lrp`): exact forward values, rule gradients checked against
independent formulas, conservation, rules read at forward time, clean attach/detach."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from interp import models
from interp.attribution.lrp import (
    LRPContext,
    LRPRules,
    half_rule,
    identity_rule,
    ln_rule,
    lrp_rules,
    scale_grad,
)
from interp.hooks import capture

PRESETS = [LRPRules.relp(), LRPRules.cp(), LRPRules.attnlrp(), LRPRules.off()]


@pytest.fixture(scope="module")
def tiny():
    """name -> tiny model (processing=True unless the name ends with ':raw')."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            base, _, raw = name.partition(":")
            loaded[name] = models.load(base, device="cpu", processing=not raw)
        return loaded[name]

    return get


def _tokens(model, batch=2, pos=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)


def _metric(logits):
    """A logit difference at the last position, summed over the batch."""
    return (logits[:, -1, 3] - logits[:, -1, 7]).sum()


def _run(model, tokens, names, rules=None):
    """(logits, {name: activation}, {name: d metric / d activation}) under `rules` (None: no
    context). The capture is entered after the rules, i.e. its hooks come after theirs."""
    context = lrp_rules(model, rules) if rules is not None else nullcontext()
    with context, capture(model, names, layers=None, keep_grad=True) as store:
        logits = model(tokens)
    acts = [store[n] for n in names]
    grads = torch.autograd.grad(_metric(logits), acts, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(a) for g, a in zip(grads, acts)]
    return (logits.detach(), {n: a.detach() for n, a in zip(names, acts)},
            dict(zip(names, grads)))


def _only(**on) -> LRPRules:
    return LRPRules.from_dict({**LRPRules.off().to_dict(), **on})


def _close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


def _differs(a, b, rel=1e-3):
    return (a - b).abs().max().item() > rel * b.abs().max().item()


# --------------------------------------------------------------------------------------------
# Forward values are bit-identical
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gpt2:raw", "tiny-llama", "tiny-llama:raw"])
def test_forward_bit_identical_tiny(tiny, name):
    model = tiny(name)
    tokens = _tokens(model)
    plain = model(tokens)
    for rules in PRESETS:
        with lrp_rules(model, rules):
            logits = model(tokens)
        assert logits.requires_grad  # the rules were active (they act only with grad on)
        assert torch.equal(logits, plain), rules


def test_forward_bit_identical_default_model(default_model):
    model = default_model
    tokens = _tokens(model, batch=1, pos=5)
    plain = model(tokens)
    for rules in (LRPRules.relp(), LRPRules.attnlrp()):
        with lrp_rules(model, rules) as ctx:
            logits = model(tokens)
        assert torch.equal(logits, plain), rules
    assert len(ctx.activations) == model.cfg.n_layers
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_gemma_every_norm_gets_the_ln_rule(load_or_skip):
    model = load_or_skip("gemma-3-270m", device="cpu")
    scales = {n for n in model.hook_dict if n.endswith("hook_scale")}
    assert any("q_norm" in n for n in scales) and any("ln2_post" in n for n in scales)
    ctx = lrp_rules(model, LRPRules.attnlrp())
    assert scales <= set(ctx.hook_names)
    tokens = _tokens(model, batch=1, pos=4)
    plain = model(tokens)
    seen = {}

    def probe(act, hook):  # runs after the rule hook: a detached scale means the rule applied
        seen[hook.name] = act.requires_grad

    with ctx:
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, probe) for n in scales])
    assert torch.equal(logits, plain)
    assert set(seen) == scales and not any(seen.values())
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


# --------------------------------------------------------------------------------------------
# Each rule's gradient against independent math
# --------------------------------------------------------------------------------------------

SITES = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.mlp.hook_pre",
         "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern",
         "blocks.0.attn.hook_q"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama:raw"])
def test_all_rules_off_gives_the_plain_gradient_exactly(tiny, name):
    model = tiny(name)
    tokens = _tokens(model)
    _, _, plain = _run(model, tokens, SITES)
    _, _, off = _run(model, tokens, SITES, LRPRules.off())
    _, _, relp = _run(model, tokens, SITES, LRPRules.relp())
    for site in SITES:
        assert torch.equal(off[site], plain[site]), site
    assert _differs(relp["blocks.0.hook_resid_pre"], plain["blocks.0.hook_resid_pre"])


def _gelu_new_over_x(x):
    """gelu_new(x) / x = 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written without x/x."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _gelu_new_prime(x):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    return g


def test_identity_rule_gradient_is_act_over_x(tiny):
    model = tiny("tiny-gpt2")
    names = ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"]
    _, acts, grads = _run(model, _tokens(model), names, _only(identity=True))
    x, g_post, g_pre = acts[names[0]], grads[names[1]], grads[names[0]]
    _close(g_pre, g_post * _gelu_new_over_x(x))
    assert _differs(g_pre, g_post * _gelu_new_prime(x))  # not the plain chain rule


def test_identity_and_half_rules_in_a_gated_mlp(tiny):
    model = tiny("tiny-llama")
    names = ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post"]
    gate_n, lin_n, post_n = names
    tokens = _tokens(model)

    def sigmoid_prime_silu(g):  # d silu / dg, written out
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))

    for identity, half in [(True, False), (False, True), (True, True), (False, False)]:
        _, acts, grads = _run(model, tokens, names, _only(identity=identity, half=half))
        g, lin, gp = acts[gate_n], acts[lin_n], grads[post_n]
        w = 0.5 if half else 1.0
        local = torch.sigmoid(g) if identity else sigmoid_prime_silu(g)  # silu(g)/g = sigmoid
        _close(grads[lin_n], w * gp * F.silu(g))
        _close(grads[gate_n], w * gp * lin * local)
    # the half rule gives exactly half of the plain product-rule gradient (same run)
    _, acts, grads = _run(model, tokens, names, _only(half=True))
    assert _differs(grads[lin_n], grads[post_n] * F.silu(acts[gate_n]))


@pytest.mark.parametrize("name", ["tiny-gpt2:raw", "tiny-gpt2", "tiny-llama:raw", "tiny-llama"])
def test_ln_rule_gradient_is_that_of_a_constant_scale(tiny, name):
    """Through ln_final: d/dx equals the VJP of (x - mean)/c (LayerNorm) or x/c (RMSNorm) with
    c computed from x independently and held constant."""
    model = tiny(name)
    last = model.cfg.n_layers - 1
    names = [f"blocks.{last}.hook_resid_post", "ln_final.hook_normalized"]
    layer_norm = model.cfg.normalization_type in ("LN", "LNPre")

    def expected(x, g_normalized):
        x = x.detach().double().requires_grad_(True)
        xc = x - x.mean(-1, keepdim=True) if layer_norm else x
        c = (xc.detach().pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        (g,) = torch.autograd.grad(xc / c, x, g_normalized.double())
        return g.float()

    for rules, must_match in [(_only(ln=True), True), (None, False)]:
        _, acts, grads = _run(model, _tokens(model), names, rules)
        want = expected(acts[names[0]], grads[names[1]])
        if must_match:
            _close(grads[names[0]], want, rtol=1e-4)
        else:
            assert _differs(grads[names[0]], want)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_attention_rules_in_the_last_layer(tiny, name):
    """Downstream of the last layer's attention no rule applies, so there: "uniform" gives the
    values 1/2 and queries/keys 1/4 of the plain gradient; "detach" gives the values and the
    pattern their plain gradient and queries/keys none."""
    model = tiny(name)
    last = model.cfg.n_layers - 1
    names = [f"blocks.{last}.attn.{h}" for h in ("hook_z", "hook_pattern", "hook_v", "hook_q",
                                                 "hook_k")]
    z, pattern, v, q, k = names
    tokens = _tokens(model)
    _, _, plain = _run(model, tokens, names)
    _, _, uniform = _run(model, tokens, names, _only(attn_pattern="uniform"))
    _, _, detach = _run(model, tokens, names, _only(attn_pattern="detach"))
    assert torch.equal(uniform[z], plain[z])
    _close(uniform[pattern], 0.5 * plain[pattern], rtol=1e-6)
    _close(uniform[v], 0.5 * plain[v], rtol=1e-6)
    _close(uniform[q], 0.25 * plain[q], rtol=1e-6)
    _close(uniform[k], 0.25 * plain[k], rtol=1e-6)
    assert torch.equal(detach[pattern], plain[pattern]) and torch.equal(detach[v], plain[v])
    assert not detach[q].any() and not detach[k].any() and plain[q].abs().max() > 0


# --------------------------------------------------------------------------------------------
# Conservation
# --------------------------------------------------------------------------------------------


def _standalone_net(x, p, rules: bool, gated: bool):
    """Bias-free pre-norm block (norm -> MLP -> residual) and a normed linear read-out, built
    from the rule functions (or plain ops when `rules` is False)."""

    def norm(h, w):
        hc = h - h.mean(-1, keepdim=True) if not gated else h  # LayerNorm / RMSNorm
        scale = (hc.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        return (ln_rule(hc, scale) if rules else hc / scale) * w

    h = norm(x, p["w1"])
    if gated:
        g, lin = h @ p["W_gate"], h @ p["W_in"]
        a = identity_rule(g, F.silu(g)) if rules else F.silu(g)
        post = half_rule(a, lin) if rules else a * lin
    else:
        pre = h @ p["W_in"]
        post = identity_rule(pre, F.gelu(pre)) if rules else F.gelu(pre)
    resid = x + post @ p["W_out"]
    return (norm(resid, p["w2"]) @ p["u"]).sum()


@pytest.mark.parametrize("gated", [False, True])
def test_conservation_standalone_mlp(gated):
    gen = torch.Generator().manual_seed(1)
    d, m = 16, 48

    def rand(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=gen, dtype=torch.float64))

    p = dict(w1=1 + rand(d, s=0.2), w2=1 + rand(d, s=0.2), W_gate=rand(d, m, s=d**-0.5),
             W_in=rand(d, m, s=d**-0.5), W_out=rand(m, d, s=m**-0.5), u=rand(d))
    x = rand(5, d).requires_grad_(True)
    for rules in (True, False):
        out = _standalone_net(x, p, rules, gated)
        (g,) = torch.autograd.grad(out, x)
        relevance = (x * g).sum()
        if rules:
            assert torch.isclose(relevance, out, rtol=1e-10, atol=0), (relevance, out)
        else:  # plain gradients do not conserve: the test can fail
            assert not torch.isclose(relevance, out, rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gpt2:raw", "tiny-llama", "tiny-llama:raw"])
def test_conservation_through_the_model(name):
    """Biases zeroed: with LN, identity, half rules and detached patterns, the relevance of the
    block-0 residual stream sums to the logit."""
    base, _, raw = name.partition(":")
    model = models.load(base, device="cpu", processing=not raw)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.split(".")[-1].startswith("b"):
                param.zero_()
    model.to(torch.float64)
    tokens = _tokens(model)
    site = "blocks.0.hook_resid_pre"
    for rules, conserved in [(LRPRules.cp(), True), (LRPRules.relp(), False)]:
        logits, acts, grads = _run(model, tokens, [site], rules)
        out = _metric(logits)
        relevance = (acts[site] * grads[site]).sum()
        assert torch.isclose(relevance, out, rtol=1e-9, atol=0) == conserved, (rules, relevance,
                                                                                 out)


# --------------------------------------------------------------------------------------------
# Rules are read at forward time
# --------------------------------------------------------------------------------------------

FIELDS = [("ln", True), ("identity", True), ("half", True), ("attn_pattern", "detach"),
          ("attn_pattern", "uniform")]


@pytest.mark.parametrize("field,value", FIELDS)
def test_rules_are_read_at_forward_time(tiny, field, value):
    model = tiny("tiny-llama")
    tokens = _tokens(model)
    _, _, plain = _run(model, tokens, SITES)
    _, _, from_start = _run(model, tokens, SITES, _only(**{field: value}))
    off_value = LRPRules.off().to_dict()[field]

    # entered with the rule on, switched off before the forward pass: plain gradients
    rules = _only(**{field: value})
    with lrp_rules(model, rules), capture(model, SITES, layers=None, keep_grad=True) as store:
        setattr(rules, field, off_value)
        logits = model(tokens)
    grads = torch.autograd.grad(_metric(logits), [store[s] for s in SITES], allow_unused=True)
    for site, g in zip(SITES, grads):
        assert torch.equal(g if g is not None else torch.zeros_like(plain[site]), plain[site])

    # entered with every rule off, switched on before the forward pass: the rule's gradients
    with lrp_rules(model, LRPRules.off()) as ctx, \
            capture(model, SITES, layers=None, keep_grad=True) as store:
        setattr(ctx.rules, field, value)
        logits = model(tokens)
    grads = torch.autograd.grad(_metric(logits), [store[s] for s in SITES], allow_unused=True)
    for site, g in zip(SITES, grads):
        assert torch.equal(g if g is not None else torch.zeros_like(plain[site]),
                           from_start[site]), site
    assert any(_differs(from_start[s], plain[s]) for s in SITES)


def test_identity_rule_switched_on_after_entering_applies(tiny):
    """The failure of the authors' fork (an identity flag set after loading was ignored)."""
    model = tiny("tiny-gpt2")
    names = ["blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post"]
    rules = LRPRules.off()
    with lrp_rules(model, rules), capture(model, names, layers=None, keep_grad=True) as store:
        rules.identity = True
        logits = model(_tokens(model))
    g_pre, g_post = torch.autograd.grad(_metric(logits), [store[n] for n in names])
    _close(g_pre, g_post * _gelu_new_over_x(store[names[0]].detach()))


@pytest.mark.unchecked
def test_bad_attn_pattern_is_refused(tiny):
    with pytest.raises(ValueError, match="attn_pattern"):
        LRPRules(attn_pattern="softmax")
    model = tiny("tiny-gpt2")
    with lrp_rules(model) as ctx:
        ctx.rules.attn_pattern = "bogus"
        with pytest.raises(ValueError, match="attn_pattern"):
            model(_tokens(model))
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


# --------------------------------------------------------------------------------------------
# Attaching and detaching
# --------------------------------------------------------------------------------------------


def test_hooks_removed_on_exit_and_user_hooks_stay(tiny):
    model = tiny("tiny-llama")
    act_fns = [block.mlp.act_fn for block in model.blocks]

    def user_hook(act, hook):
        return None

    model.add_hook("blocks.0.mlp.hook_post", user_hook)
    model.add_hook("blocks.0.ln1.hook_scale", user_hook)
    before = {n: list(hp.fwd_hooks) for n, hp in model.hook_dict.items()}
    with lrp_rules(model) as ctx:
        assert len(model.hook_dict["blocks.0.mlp.hook_post"].fwd_hooks) == 2
        assert all(block.mlp.act_fn is not f for block, f in zip(model.blocks, act_fns))
        model(_tokens(model))
    assert {n: list(hp.fwd_hooks) for n, hp in model.hook_dict.items()} == before
    assert all(block.mlp.act_fn is f for block, f in zip(model.blocks, act_fns))
    assert not ctx.attached

    with pytest.raises(RuntimeError, match="boom"), lrp_rules(model):
        raise RuntimeError("boom")
    assert {n: list(hp.fwd_hooks) for n, hp in model.hook_dict.items()} == before
    assert all(block.mlp.act_fn is f for block, f in zip(model.blocks, act_fns))
    model.reset_hooks()
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_nesting_is_refused_and_reset_hooks_keeps_the_rules(tiny):
    model = tiny("tiny-gpt2")
    tokens = _tokens(model)
    _, _, want = _run(model, tokens, SITES, LRPRules.cp())
    with lrp_rules(model, LRPRules.cp()):
        with pytest.raises(RuntimeError, match="already active"):
            lrp_rules(model).attach()
        model.reset_hooks()  # the rule hooks are permanent: still there
        with capture(model, SITES, layers=None, keep_grad=True) as store:
            logits = model.run_with_hooks(tokens)  # resets its own level only
        grads = torch.autograd.grad(_metric(logits), [store[s] for s in SITES])
    for site, g in zip(SITES, grads):
        assert torch.equal(g, want[site])
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_rule_hooks_run_first_whatever_the_order_of_entry(tiny):
    """A capture entered before the rules reads the same gradients as one entered after."""
    model = tiny("tiny-llama")
    tokens = _tokens(model)
    names = ["blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern", "blocks.0.mlp.hook_post",
             "blocks.0.mlp.hook_pre"]
    _, _, after = _run(model, tokens, names, LRPRules.attnlrp())
    with capture(model, names, layers=None, keep_grad=True) as store, \
            lrp_rules(model, LRPRules.attnlrp()):
        logits = model(tokens)
    before = torch.autograd.grad(_metric(logits), [store[n] for n in names])
    for name, g in zip(names, before):
        assert torch.equal(g, after[name]), name


def test_transformer_lens_backward_hooks_see_the_rule_gradients(tiny):
    """TL backward hooks (the classic AtP recipe) at mlp.hook_pre get the identity-rule
    gradient: the rule sits on the activation function, not on a forward hook there."""
    model = tiny("tiny-gpt2")
    tokens = _tokens(model)
    name = "blocks.0.mlp.hook_pre"
    _, _, want = _run(model, tokens, [name], _only(identity=True))
    _, _, plain = _run(model, tokens, [name])
    got = {}
    with lrp_rules(model, _only(identity=True)), model.hooks(
        bwd_hooks=[(name, lambda g, hook: got.__setitem__(hook.name, g.detach()))]
    ):
        _metric(model(tokens)).backward()
    model.zero_grad(set_to_none=True)
    _close(got[name], want[name], rtol=1e-6)
    assert _differs(got[name], plain[name])


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


def test_rule_functions_keep_values_exactly():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0], requires_grad=True)
    y = F.gelu(x)
    out = identity_rule(x, y)
    assert out.requires_grad and torch.equal(out, y)
    assert torch.equal(torch.signbit(out), torch.signbit(y))  # even the sign of zero
    assert torch.equal(scale_grad(y, 0.5), y) and torch.equal(half_rule(x, y), x * y)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g[2] == 0 and torch.isclose(g[4], F.gelu(torch.tensor(3.0)) / 3.0)
    (g,) = torch.autograd.grad(scale_grad(F.gelu(x), 0.5).sum(), x)
    (plain,) = torch.autograd.grad(F.gelu(x).sum(), x)
    assert torch.equal(g, 0.5 * plain)
    scale = torch.tensor([2.0], requires_grad=True)
    (g_scale,) = torch.autograd.grad(ln_rule(x, scale).sum(), scale, allow_unused=True)
    assert g_scale is None


def test_presets_and_overrides(tiny):
    assert LRPRules.relp() == LRPRules(ln=True, identity=True, half=True, attn_pattern="none")
    assert LRPRules.cp().attn_pattern == "detach" and LRPRules.attnlrp().attn_pattern == "uniform"
    assert not LRPRules.off().any and LRPRules.relp().any
    assert LRPRules.from_dict(LRPRules.cp().to_dict()) == LRPRules.cp()
    with pytest.raises(ValueError, match="unknown"):
        LRPRules.from_dict({"gamma": 0.25})
    model = tiny("tiny-gpt2")
    mine = LRPRules.relp()
    ctx = lrp_rules(model, mine, identity=False)
    assert isinstance(ctx, LRPContext) and ctx.rules is not mine and not ctx.rules.identity
    assert lrp_rules(model, mine).rules is mine
    assert lrp_rules(model).rules == LRPRules.relp()
