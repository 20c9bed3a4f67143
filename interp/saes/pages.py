"""Self-contained HTML pages for SAE latents: one page per latent and an index.

`write_feature_pages(out_dir, reports)` writes `feature_<i>.html` for every `FeatureReport`
(from `interp.saes.features.inspect_features`) and `index.html` linking them. Pages use inline
CSS and inline SVG only (no scripts, no external files), so they open from disk, in a notebook
`IFrame`, or attached to a report.

A latent's page shows its density, mean and maximum activation, the decoder logit lens (tokens
promoted and suppressed) and its top contexts: each token shaded by the latent's activation on
it (relative to the latent's maximum; hover for the value), the maximum outlined. The index
page lists all reported latents with their density, maximum and top logit-lens tokens, over a
histogram of log10 density of all latents when `stats` is given (dead ones counted apart).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from interp.saes.features import Context, FeatureReport, FeatureStats

__all__ = ["feature_page", "index_page", "write_feature_pages"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 70em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; }
th { border-bottom: 1px solid #999; } tr:nth-child(even) td { background: #f6f6f6; }
.ctx { font-family: ui-monospace, monospace; font-size: 0.9em; white-space: pre-wrap;
       line-height: 1.7; margin: 0.3em 0; padding: 0.3em; border-left: 3px solid #ddd; }
.tok { border-radius: 2px; }
.max { outline: 1.5px solid #b00; }
.num { font-family: ui-monospace, monospace; text-align: right; }
.lens { display: flex; gap: 3em; } .muted { color: #777; font-size: 0.9em; }
"""


def write_feature_pages(
    out_dir: str | Path,
    reports: Sequence[FeatureReport],
    *,
    title: str = "SAE latents",
    info: Mapping[str, Any] | None = None,
    stats: FeatureStats | None = None,
) -> Path:
    """Write one page per report and `index.html` into `out_dir`; return the index's path.

    Args:
        out_dir: created if needed.
        reports: from `inspect_features`.
        title: page title (e.g. the SAE and hook).
        info: key/value lines shown at the top of every page (model, hook, SAE path, ...).
        stats: all latents' statistics, for the density histogram on the index page.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for report in reports:
        (out / _page_name(report.index)).write_text(feature_page(report, title=title, info=info),
                                                    encoding="utf-8")
    index = out / "index.html"
    index.write_text(index_page(reports, title=title, info=info, stats=stats), encoding="utf-8")
    return index


def feature_page(report: FeatureReport, *, title: str = "SAE latents",
                 info: Mapping[str, Any] | None = None) -> str:
    """The HTML of one latent's page."""
    r = report
    parts = [f"<h1>Latent {r.index}</h1>", f'<p><a href="index.html">&larr; {_e(title)}</a></p>',
             _info_table(info),
             "<table>",
             f"<tr><td>density (fraction of tokens active)</td><td class=num>{_fmt_density(r.density)}</td></tr>",
             f"<tr><td>mean activation when active</td><td class=num>{r.mean_active:.4g}</td></tr>",
             f"<tr><td>max activation</td><td class=num>{r.max_act:.4g}</td></tr>",
             "</table>"]
    if r.logit_top or r.logit_bottom:
        parts.append("<h2>Decoder logit lens (W_dec &middot; W_U)</h2><div class=lens>")
        for name, pairs in (("promoted", r.logit_top), ("suppressed", r.logit_bottom)):
            rows = "".join(f"<tr><td>{_tok(t)}</td><td class=num>{v:+.3f}</td></tr>" for t, v in pairs)
            parts.append(f"<table><tr><th>{name}</th><th>logit</th></tr>{rows}</table>")
        parts.append("</div>")
    parts.append(f"<h2>Top contexts ({len(r.contexts)})</h2>")
    if not r.contexts:
        parts.append("<p class=muted>Never active on these tokens.</p>")
    scale = max([r.max_act] + [c.max_act for c in r.contexts] + [1e-12])
    for c in r.contexts:
        parts.append(_context_html(c, scale))
    return _document(f"Latent {r.index} - {title}", "".join(parts))


def index_page(reports: Sequence[FeatureReport], *, title: str = "SAE latents",
               info: Mapping[str, Any] | None = None, stats: FeatureStats | None = None) -> str:
    """The HTML of the index page."""
    parts = [f"<h1>{_e(title)}</h1>", _info_table(info)]
    if stats is not None:
        parts.append(_density_histogram(stats))
    parts.append("<h2>Latents</h2><table><tr><th>latent</th><th>density</th><th>max act</th>"
                 "<th>top activating token</th><th>promoted tokens</th></tr>")
    for r in reports:
        best = ""
        if r.contexts:
            c = r.contexts[0]
            best = _tok(c.tokens[c.max_pos])
        promoted = " ".join(_tok(t) for t, _ in r.logit_top[:5])
        parts.append(f'<tr><td><a href="{_page_name(r.index)}">{r.index}</a></td>'
                     f"<td class=num>{_fmt_density(r.density)}</td><td class=num>{r.max_act:.3g}</td>"
                     f"<td>{best}</td><td>{promoted}</td></tr>")
    parts.append("</table>")
    return _document(title, "".join(parts))


# --------------------------------------------------------------------------------------------


def _page_name(index: int) -> str:
    return f"feature_{index}.html"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _tok(token: str) -> str:
    shown = token.replace("\n", "\u21b5").replace("\t", "\u2192")
    return f"<code>{_e(shown) if shown.strip() else _e(repr(token))}</code>"


def _fmt_density(d: float) -> str:
    return f"{d:.2e}" if 0 < d < 1e-3 else f"{d:.4f}"


def _info_table(info: Mapping[str, Any] | None) -> str:
    if not info:
        return ""
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in info.items())
    return f"<table class=muted>{rows}</table>"


def _context_html(c: Context, scale: float) -> str:
    spans = []
    for pos, (tok, act) in enumerate(zip(c.tokens, c.acts)):
        alpha = max(0.0, min(1.0, act / scale)) if act > 0 else 0.0
        style = f"background: rgba(255, 120, 0, {alpha:.3f})" if alpha > 0 else ""
        cls = "tok max" if pos == c.max_pos else "tok"
        text = _e(tok.replace("\n", "\u21b5\n"))
        spans.append(f'<span class="{cls}" style="{style}" title="{act:.4g}">{text}</span>')
    head = (f'<span class=muted>max {c.max_act:.4g} &middot; sequence {c.seq}, '
            f'position {c.start + c.max_pos}</span><br>')
    return f"<div class=ctx>{head}{''.join(spans)}</div>"


def _density_histogram(stats: FeatureStats, bins: int = 30) -> str:
    """Inline SVG: histogram of log10 density over live latents; dead ones counted apart."""
    dens = stats.density.tolist()
    live = [math.log10(d) for d in dens if d > 0]
    dead = len(dens) - len(live)
    if not live:
        return f"<p>All {len(dens)} latents are dead on {stats.n_tokens} tokens.</p>"
    lo, hi = min(live), max(max(live), min(live) + 1e-6)
    counts = [0] * bins
    for v in live:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    w, h, pad = 600, 160, 30
    top = max(counts)
    bw = (w - 2 * pad) / bins
    bars = "".join(
        f'<rect x="{pad + i * bw:.1f}" y="{h - pad - (c / top) * (h - 2 * pad):.1f}" '
        f'width="{bw - 1:.1f}" height="{(c / top) * (h - 2 * pad):.1f}" fill="#e07000">'
        f"<title>{c} latents</title></rect>"
        for i, c in enumerate(counts))
    axis = (f'<text x="{pad}" y="{h - 8}" font-size="11">{lo:.1f}</text>'
            f'<text x="{w - pad - 20}" y="{h - 8}" font-size="11">{hi:.1f}</text>'
            f'<text x="{w / 2 - 60}" y="{h - 8}" font-size="11">log10 density</text>')
    return (f"<h2>Density of all {len(dens)} latents</h2>"
            f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{bars}{axis}</svg>'
            f"<p class=muted>{dead} dead (never active on {stats.n_tokens} tokens); "
            f"{sum(d > 0.1 for d in dens)} dense (&gt; 10% of tokens).</p>")


def _document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")
