"""Scores queries (`top`, `to_frame`, `sel`) and the heatmap, against hand indexing of `.values`."""

from __future__ import annotations

import pytest
import torch

from interp import plots
from interp.attribution.sites import Scores


def pos_scores() -> Scores:
    """3 layers x 5 positions with token labels, distinct values of both signs."""
    values = torch.tensor([[0.1, -2.0, 0.3, 0.0, 1.5],
                           [-0.7, 0.2, 3.0, -0.4, 0.05],
                           [0.6, -1.1, 0.9, 2.2, -3.5]])
    labels = {"layer": ["0", "1", "2"], "pos": [f"{i}: t{i}" for i in range(5)]}
    return Scores("resid", "exact", values, ("layer", "pos"), labels)


def head_scores(layers=("0", "2")) -> Scores:
    """A family on layers 0 and 2 only (so layer numbers are not indices), 4 heads."""
    values = torch.arange(8, dtype=torch.float32).reshape(2, 4) - 3.5
    return Scores("heads", "atp", values, ("layer", "head"),
                  {"layer": list(layers), "head": ["0", "1", "2", "3"]})


def test_top_by_abs_max_min_against_a_hand_sort():
    s = pos_scores()
    v = s.values
    rows = s.top(3)
    assert [r["value"] for r in rows] == pytest.approx([-3.5, 3.0, 2.2])
    assert rows[0] == {"layer": 2, "pos": 4, "pos_label": "4: t4", "value": pytest.approx(-3.5)}
    for r in rows:  # each row's value is the value at its indices
        assert r["value"] == pytest.approx(float(v[r["layer"], r["pos"]]))
    assert [(r["layer"], r["pos"]) for r in s.top(2, by="max")] == [(1, 2), (2, 3)]
    assert [(r["layer"], r["pos"]) for r in s.top(2, by="min")] == [(2, 4), (0, 1)]
    assert len(s.top(100)) == v.numel()
    by_hand = sorted(v.flatten().tolist(), key=lambda x: -abs(x))
    assert [r["value"] for r in s.top(15)] == pytest.approx(by_hand)


def test_top_uses_layer_numbers_of_families_on_some_layers():
    s = head_scores()
    best = s.top(1, by="max")[0]
    assert best == {"layer": 2, "head": 3, "value": pytest.approx(3.5)}  # index (1, 3)
    # |-3.5| = |3.5|: a tie keeps flat() order
    assert [(r["layer"], r["head"]) for r in s.top(2)] == [(0, 0), (2, 3)]
    assert s.top(1, by="min")[0] == {"layer": 0, "head": 0, "value": pytest.approx(-3.5)}


def test_top_bad_arguments():
    with pytest.raises(ValueError, match="by must be one of"):
        pos_scores().top(2, by="largest")
    with pytest.raises(ValueError, match="k must be"):
        pos_scores().top(-1)


def test_to_frame_one_row_per_site_in_flat_order():
    s = pos_scores()
    frame = s.to_frame()
    assert list(frame.columns) == ["layer", "pos", "pos_label", "value"]
    assert len(frame) == s.values.numel()
    for _, row in frame.iterrows():
        assert row["value"] == pytest.approx(float(s.values[row["layer"], row["pos"]]))
        assert row["pos_label"] == f"{row['pos']}: t{row['pos']}"
    assert frame["value"].tolist() == pytest.approx(s.flat().tolist())
    heads = head_scores().to_frame()
    assert list(heads.columns) == ["layer", "head", "value"]
    assert heads["layer"].tolist() == [0] * 4 + [2] * 4
    assert heads["value"].tolist() == pytest.approx(head_scores().values.flatten().tolist())


def test_sel_by_numbers_labels_lists_and_slices():
    s = pos_scores()
    one = s.sel(layer=1, pos=[4, 2])
    assert one.values.shape == (1, 2)
    torch.testing.assert_close(one.values, s.values[[1]][:, [4, 2]])
    assert one.labels == {"layer": ["1"], "pos": ["4: t4", "2: t2"]}
    assert one.family == "resid" and one.method == "exact" and one.dims == ("layer", "pos")
    # numbers survive a selection: a second sel means the same sites
    again = one.sel(pos=2)
    assert again.values.item() == pytest.approx(s.values[1, 2].item())
    assert again.site_labels() == ["L1 pos2"]
    assert one.top(1)[0]["pos"] in (4, 2)
    by_label = s.sel(pos="3: t3")
    torch.testing.assert_close(by_label.values, s.values[:, 3:4])
    sliced = s.sel(layer=slice(1, None), pos=range(1, 4))
    torch.testing.assert_close(sliced.values, s.values[1:, 1:4])
    stepped = s.sel(pos=slice(0, 5, 2))
    torch.testing.assert_close(stepped.values, s.values[:, 0:5:2])
    # layer numbers, not indices, on a family with some layers only
    h = head_scores().sel(layer=2, head=[1, 3])
    torch.testing.assert_close(h.values, head_scores().values[1:2][:, [1, 3]])
    assert h.to_frame()["layer"].tolist() == [2, 2]


def test_sel_errors_name_the_problem():
    s = pos_scores()
    with pytest.raises(ValueError, match="no axis 'head'"):
        s.sel(head=1)
    with pytest.raises(ValueError, match="layer 7 selects nothing"):
        s.sel(layer=7)
    with pytest.raises(ValueError, match="selects nothing"):
        s.sel(pos="5: t5")
    with pytest.raises(ValueError, match="layer 1 selects nothing"):
        head_scores().sel(layer=1)  # index 1 exists, layer 1 does not


def test_named_slot_axis_selects_and_lists_by_label():
    values = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]])
    s = Scores("resid", "atp", values, ("layer", "slot"),
               {"layer": ["0", "1"], "slot": ["IO", "S2", "other"]})
    assert s.top(1)[0] == {"layer": 1, "slot": "S2", "value": pytest.approx(4.0)}
    assert list(s.to_frame().columns) == ["layer", "slot", "value"]
    torch.testing.assert_close(s.sel(slot=["other", "IO"]).values, values[:, [2, 0]])
    assert s.site_labels()[:2] == ["L0 IO", "L0 S2"]


def test_heatmap_z_and_axis_labels_are_the_scores():
    s = pos_scores()
    fig = plots.scores_heatmap(s)
    trace = fig.data[0]
    torch.testing.assert_close(torch.tensor(trace.z, dtype=torch.float32), s.values)
    assert list(trace.x) == s.labels["pos"] and list(trace.y) == s.labels["layer"]
    assert fig.layout.xaxis.title.text == "pos" and fig.layout.yaxis.title.text == "layer"
    assert fig.layout.xaxis.type == "category"
    assert "exact" in fig.layout.title.text and "resid" in fig.layout.title.text
    # three axes: one row per (layer, head), positions along x
    values = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    hp = Scores("heads_by_pos", "atp", values.permute(0, 2, 1), ("layer", "head", "pos"),
                {"layer": ["0", "1"], "head": ["0", "1"], "pos": ["0:a", "1:b", "2:c"]})
    trace = plots.scores_heatmap(hp).data[0]
    assert list(trace.y) == ["L0 H0", "L0 H1", "L1 H0", "L1 H1"]
    assert list(trace.x) == ["0:a", "1:b", "2:c"]
    torch.testing.assert_close(torch.tensor(trace.z, dtype=torch.float32),
                               values.permute(0, 2, 1).reshape(4, 3))
