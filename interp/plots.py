"""Plotly figures shared by studies, and writing them to disk.

Every figure is written as self-contained HTML; PNG export goes through kaleido, which needs a
Chromium (Debian's `chromium` package works, `scripts/setup.sh` installs it where it can). Where
none is found the PNG is skipped with a warning and the HTML is still written.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go

from interp.attribution.sites import Scores

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable kaleido can drive, or None."""
    explicit = os.environ.get("BROWSER_PATH")
    if explicit and Path(explicit).exists():
        return explicit
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    return None


def save_figure(fig: go.Figure, stem: str | Path, png: bool = True) -> list[Path]:
    """Write `fig` to `<stem>.html` and, when a Chromium is available, `<stem>.png`.

    Returns the paths written. PNG failures (no browser, kaleido error) are warnings, never
    errors: the HTML holds the same figure.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".html")]
    fig.write_html(written[0], include_plotlyjs=True)
    if not png:
        return written
    browser = find_chromium()
    if browser is None:
        warnings.warn(f"No Chromium found: wrote {written[0].name} but no PNG (install chromium).")
        return written
    os.environ.setdefault("BROWSER_PATH", browser)
    try:
        fig.write_image(stem.with_suffix(".png"), width=900, height=500, scale=1)
        written.append(stem.with_suffix(".png"))
    except Exception as exc:  # kaleido raises several unrelated types
        warnings.warn(f"PNG export of {stem.name} failed ({type(exc).__name__}: {exc}); HTML written.")
    return written


def bar(labels: Sequence[str], values: Sequence[float], title: str, value_label: str) -> go.Figure:
    """Horizontal bar chart, first label on top."""
    fig = go.Figure(go.Bar(x=list(values)[::-1], y=[repr(s) for s in labels][::-1], orientation="h"))
    fig.update_layout(title=title, xaxis_title=value_label, template="plotly_white",
                      margin=dict(l=140))
    return fig


def lines(x: Sequence, series: dict[str, Sequence[float]], title: str, x_label: str,
          y_label: str) -> go.Figure:
    """One line per named series over a shared x axis (e.g. a quantity per layer)."""
    fig = go.Figure([go.Scatter(x=list(x), y=list(y), mode="lines+markers", name=name)
                     for name, y in series.items()])
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label,
                      template="plotly_white")
    return fig


def scatter_vs(reference: Sequence[float], series: dict[str, Sequence[float]], title: str,
               x_label: str, y_label: str) -> go.Figure:
    """One scatter trace per named series against a shared reference (method vs exact), with
    the y = x line."""
    ref = list(reference)
    fig = go.Figure([go.Scatter(x=ref, y=list(y), mode="markers", name=name, opacity=0.7)
                     for name, y in series.items()])
    if ref:
        lo, hi = min(ref), max(ref)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                                 line=dict(dash="dash", color="gray")))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white")
    return fig


def heatmap(values, x_labels: Sequence[str], y_labels: Sequence[str], title: str, x_label: str,
            y_label: str) -> go.Figure:
    """A diverging heatmap centred on zero (e.g. a patching effect per layer and position)."""
    z = [list(map(float, row)) for row in values]
    bound = max((abs(v) for row in z for v in row), default=1.0) or 1.0
    fig = go.Figure(go.Heatmap(z=z, x=list(x_labels), y=list(y_labels), colorscale="RdBu",
                               zmid=0, zmin=-bound, zmax=bound))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white")
    return fig


def scores_heatmap(scores: Scores, title: str | None = None) -> go.Figure:
    """A heatmap of one family's `Scores`, labelled by its axes' labels.

    The last axis runs along x (positions with their tokens, heads, slots, ...), the others
    down y (layers; for three axes, e.g. `heads_by_pos`, one row per layer and head, labelled
    `L3 H2`). Both axes are categorical, in the scores' order. Diverging colours centred on
    zero; `z[i][j]` is the value at row i, column j. Select first for large families
    (`scores.sel(layer=range(10, 20))`).
    """
    values = scores.values.detach().float().cpu()
    if values.ndim == 1:
        values = values[None]
    columns = scores.axis_labels(scores.dims[-1])
    if len(scores.dims) == 1:
        rows, y_label = [""], ""
    elif len(scores.dims) == 2:
        rows, y_label = scores.axis_labels(scores.dims[0]), scores.dims[0]
    else:
        head = scores.sel(**{scores.dims[-1]: scores.axis_labels(scores.dims[-1])[:1]})
        rows = [label.rsplit(" ", 1)[0] for label in head.site_labels()]
        y_label = " x ".join(scores.dims[:-1])
    z = values.reshape(-1, values.shape[-1]).tolist()
    fig = heatmap(z, columns, rows, title or f"{scores.method}: {scores.family}", scores.dims[-1], y_label)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def edge_circuit(graph, keep, scores, title: str, roles: dict[str, str] | None = None) -> go.Figure:
    """An edge circuit drawn as a graph: nodes of `graph` touched by the edges in `keep`
    (`[senders, receivers]` bool) placed by layer (y, input at the bottom, logits on top) and
    head (x; each layer's MLP right of its heads), edges as lines coloured by the sign of
    `scores` (`[senders, receivers]`, e.g. `EdgeScores.dense()`; blue helps, red hurts) and
    as wide as their |score| (three widths). `roles` adds a label per head (e.g. its IOI role).
    q/k/v receivers of one head are drawn as that head."""
    keep, scores = keep.cpu(), scores.detach().float().cpu()
    s_idx, r_idx = keep.nonzero(as_tuple=True)

    def place(node) -> tuple[float, float]:
        if node.kind == "input":
            return (graph.n_heads / 2, -1.0)
        if node.kind == "logits":
            return (graph.n_heads / 2, float(graph.n_layers))
        if node.kind == "mlp":
            return (float(graph.n_heads), node.layer + 0.5)
        return (float(node.head), float(node.layer))

    used: dict[str, object] = {}
    lines_by: dict[tuple[bool, int], tuple[list, list]] = {}
    values = scores[s_idx, r_idx]
    top = float(values.abs().max()) if len(values) else 1.0
    for s, r, v in zip(s_idx.tolist(), r_idx.tolist(), values.tolist()):
        sender, receiver = graph.senders[s], graph.receivers[r].node
        used[sender.name], used[receiver.name] = sender, receiver
        (x0, y0), (x1, y1) = place(sender), place(receiver)
        width = 0 if abs(v) < top / 4 else 1 if abs(v) < top / 2 else 2
        xs, ys = lines_by.setdefault((v >= 0, width), ([], []))
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    fig = go.Figure()
    for (positive, width), (xs, ys) in sorted(lines_by.items()):
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(width=1 + 2.5 * width,
                                           color="rgba(31,119,180,0.55)" if positive else "rgba(214,39,40,0.55)")))
    names = sorted(used, key=lambda n: (place(used[n])[1], place(used[n])[0]))
    labels = [n + (f" ({roles[n]})" if roles and n in roles else "") for n in names]
    kinds = {"input": "#444", "logits": "#444", "mlp": "#2ca02c", "head": "#ff7f0e"}
    fig.add_trace(go.Scatter(
        x=[place(used[n])[0] for n in names], y=[place(used[n])[1] for n in names],
        mode="markers+text", text=labels, textposition="top center", hovertext=labels,
        marker=dict(size=11, color=[kinds[used[n].kind] for n in names], line=dict(width=1, color="white")),
        showlegend=False))
    fig.update_layout(title=title, template="plotly_white", height=700,
                      xaxis=dict(title="head (MLP at the right)", tickmode="linear", dtick=1),
                      yaxis=dict(title="layer (input below, logits on top)"))
    return fig
