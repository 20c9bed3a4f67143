"""interp.edits: value-vector edits change only their row, are recorded and undoable."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interp import edits, models
from interp.concepts import vectors


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _only_row_changed(model, before, layer, index):
    name = f"blocks.{layer}.mlp.W_out"
    for n, p in model.named_parameters():
        if n != name:
            assert torch.equal(p, before[n]), n
    w, w0 = dict(model.named_parameters())[name], before[name]
    others = [i for i in range(w.shape[0]) if i != index]
    assert torch.equal(w[others], w0[others])


@pytest.fixture
def model():
    return models.load("tiny-llama", device="cpu", processing=False)


@pytest.mark.parametrize("relative_to", [None, "vector", "layer"])
def test_add_noise_changes_only_the_row_with_the_documented_scale(model, relative_to):
    before = _snapshot(model)
    layer, index, sigma = 1, 9, 0.3
    edit = edits.add_noise(model, layer, index, sigma, relative_to=relative_to, seed=4)
    _only_row_changed(model, before, layer, index)
    v0 = before[f"blocks.{layer}.mlp.W_out"][index]
    delta = model.blocks[layer].mlp.W_out[index].detach() - v0
    # The same draw, written independently: N(0, 1) from the seeded CPU generator, scaled.
    unit_noise = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    d = model.cfg.d_model
    if relative_to is None:
        std = sigma
    elif relative_to == "vector":
        std = sigma * float(v0.norm()) / math.sqrt(d)
    else:
        norms = before[f"blocks.{layer}.mlp.W_out"].norm(dim=-1)
        std = sigma * float(norms.median()) / math.sqrt(d)
    torch.testing.assert_close(delta, unit_noise * std, rtol=1e-5, atol=1e-6)
    assert edit.record["std"] == pytest.approx(std)
    json.dumps(edit.record)  # storable with a variant
    edit.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_set_scale_zero_and_stacked_restores(model):
    before = _snapshot(model)
    v = edits.value_vector(model, 0, 3)
    e1 = edits.scale_value_vector(model, 0, 3, 2.5)
    torch.testing.assert_close(model.blocks[0].mlp.W_out[3].detach(), 2.5 * v)
    e2 = edits.zero_value_vector(model, 0, 3)
    assert torch.count_nonzero(model.blocks[0].mlp.W_out[3]) == 0
    new = torch.arange(model.cfg.d_model, dtype=torch.float32)
    e3 = edits.set_value_vector(model, 0, 7, new)
    assert torch.equal(model.blocks[0].mlp.W_out[7].detach(), new)
    _only_row_changed_two = [i for i in range(model.cfg.d_mlp) if i not in (3, 7)]
    assert torch.equal(model.blocks[0].mlp.W_out[_only_row_changed_two],
                       before["blocks.0.mlp.W_out"][_only_row_changed_two])
    for e in (e3, e2, e1):
        e.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert [e.record["kind"] for e in (e1, e2, e3)] == [
        "scale_value_vector", "zero_value_vector", "set_value_vector"]


def test_edit_as_context_manager_and_errors(model):
    before = _snapshot(model)
    with edits.add_noise(model, 0, 1, 1.0):
        assert not torch.equal(model.blocks[0].mlp.W_out, before["blocks.0.mlp.W_out"])
    assert torch.equal(model.blocks[0].mlp.W_out, before["blocks.0.mlp.W_out"])
    with pytest.raises(ValueError, match="layer 5 is out of range: the model has 2 layers"):
        edits.add_noise(model, 5, 0, 0.1)
    with pytest.raises(ValueError, match="d_mlp is 128"):
        edits.zero_value_vector(model, 0, 128)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        edits.set_value_vector(model, 0, 0, torch.zeros(3))


def test_orthogonalise_weights_edit_is_a_weight_edit(model):
    edit = vectors.orthogonalise_weights(model, torch.ones(model.cfg.d_model))
    assert isinstance(edit, edits.WeightEdit)
    assert edit.record["kind"] == "orthogonalise_weights"
    assert edit.direction.shape == (model.cfg.d_model,)
