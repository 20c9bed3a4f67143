"""Fixtures for the attribution tests: an attribution-patching reference written with plain
TransformerLens hooks and autograd, independent of interp's hooks and reductions."""

from __future__ import annotations

import pytest
import torch

#: The hook point of each site family, as TransformerLens names it.
HOOKS = {
    "resid": "blocks.{L}.hook_resid_pre",
    "attn": "blocks.{L}.hook_attn_out",
    "mlp": "blocks.{L}.hook_mlp_out",
    "heads": "blocks.{L}.attn.hook_z",
    "heads_by_pos": "blocks.{L}.attn.hook_z",
    "neurons": "blocks.{L}.mlp.hook_post",
}

#: Which activation axes (batch first) each family sums over to get its site axes.
SUMMED = {
    "resid": (0, 2),  # batch pos d_model -> pos
    "attn": (0, 2),
    "mlp": (0, 2),
    "heads": (0, 1, 3),  # batch pos head d_head -> head
    "heads_by_pos": (0, 3),  # -> pos head
    "neurons": (0, 1),  # batch pos neuron -> neuron
}


def hand_metric(logits, metric):
    """The (normalised) logit difference at the last position, per prompt, from full logits."""
    rows = torch.arange(logits.shape[0])
    last = logits[:, -1]
    diff = last[rows, metric.answer_ids] - last[rows, metric.wrong_ids]
    if metric.clean is None:
        return diff
    return (diff - metric.corrupt) / (metric.clean - metric.corrupt)


def plain_atp(model, clean, corrupt, metric, fams, direction="denoise"):
    """`(a_source - a_target) . d mean(metric) / d a` (gradient on the target run) per family,
    `[layer, *site axes]`: source activations from `run_with_cache`, target activations kept by
    TransformerLens forward hooks, the gradient by `torch.autograd.grad` of the metric computed
    by hand from the full logits. Hooks already on the model (e.g. LRP rules) stay in effect,
    so run inside `lrp_rules` it gives RelP."""
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    layers = range(model.cfg.n_layers)
    names = sorted({HOOKS[f].format(L=layer) for f in fams for layer in layers})
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
    kept = {}

    def start_graph(act, hook):  # the embeddings become a leaf: every activation needs grad
        return act.detach().requires_grad_(True)

    def keep(act, hook):
        kept[hook.name] = act

    hooks = [("hook_embed", start_graph)] + [(n, keep) for n in names]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(target)
    value = hand_metric(logits, metric).mean()
    grads = torch.autograd.grad(value, [kept[n] for n in names], allow_unused=True)
    grad = {n: g if g is not None else torch.zeros_like(kept[n]) for n, g in zip(names, grads)}
    out = {}
    for f in fams:
        rows = []
        for layer in layers:
            n = HOOKS[f].format(L=layer)
            rows.append(((source_cache[n] - kept[n].detach()) * grad[n]).sum(SUMMED[f]))
        out[f] = torch.stack(rows).detach()
    return out


@pytest.fixture
def plain_atp_reference():
    """`plain_atp(model, clean, corrupt, metric, fams, direction)` -> {family: values}."""
    return plain_atp


@pytest.fixture
def last_logit_diff():
    """`hand_metric(logits, metric)`: the metric per prompt computed by hand from full logits."""
    return hand_metric
