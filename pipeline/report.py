"""Previews and the self-contained HTML report of a catalog version.

- :func:`edit_strip_png`: one PNG per direction, rows = preview seeds, columns = edit scales
  (the unedited image in the gamma = 0 column), upscaled with nearest neighbours so small models'
  images stay readable.
- :func:`render_report`: one HTML file with everything inline (CSS, base64 PNGs, the effect matrix
  as a table coloured by effect relative to the random baseline), so it can be opened from any
  storage without a server. No plotting library, no JavaScript.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["edit_strip_png", "effect_table_text", "render_report"]


def edit_strip_png(images: np.ndarray, *, min_cell: int = 64, gutter: int = 2) -> bytes:
    """PNG of a grid from uint8 images [P, S, 3, H, W] (rows: seeds, columns: scales).

    Each image is upscaled by the smallest integer factor that makes it at least ``min_cell``
    pixels tall (nearest neighbour, so pixels stay honest); cells are separated by white gutters.
    """
    from hspace.images import image_grid, png_bytes

    a = np.asarray(images)
    if a.ndim != 5 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [P, S, 3, H, W], got {a.dtype} {tuple(a.shape)}")
    return png_bytes(image_grid(a, min_cell=min_cell, pad=gutter))


def _fmt(x: float | None, digits: int = 3) -> str:
    """Signed, ``digits`` significant digits (effects of tiny and large edits both stay readable)."""
    return "–" if x is None or not math.isfinite(x) else f"{x:+.{digits}g}"


def effect_table_text(effects: Mapping[str, Any], *, max_rows: int | None = None) -> str:
    """The headline effect matrix as fixed-width text (for logs and the job's closing summary)."""
    m = effects["matrix"]
    rows, cols, eff = m["rows"], m["columns"], m["effect"]
    width = max(12, *(len(c) for c in cols)) if cols else 12
    name_w = max(10, *(len(r) for r in rows)) if rows else 10
    lines = [" " * name_w + "".join(f"{c[:width]:>{width + 1}}" for c in cols)]
    shown = rows if max_rows is None else rows[:max_rows]
    for r, name in enumerate(shown):
        lines.append(f"{name:<{name_w}}" + "".join(f"{_fmt(v):>{width + 1}}" for v in eff[r]))
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows in effects.json")
    return "\n".join(lines)


def _cell_style(z: float | None) -> str:
    """Background from the effect in units of the random baseline's RMS effect (|z| >= 3 saturates)."""
    if z is None or not math.isfinite(z):
        return ""
    t = min(abs(z) / 3.0, 1.0)
    r, g, b = (
        (int(255 - 120 * t), int(255 - 120 * t), 255)
        if z < 0
        else (255, int(255 - 120 * t), int(255 - 120 * t))
    )
    return f' style="background:rgb({r},{g},{b})"'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3} td.name,th.name{text-align:left;font-family:monospace}
.kind{color:#666;font-size:90%} figure{display:inline-block;margin:0 1.5em 1.5em 0;vertical-align:top}
figcaption{font-family:monospace;font-size:90%} img{image-rendering:pixelated}
.meta td{text-align:left}
"""


def render_report(
    *,
    title: str,
    meta: Mapping[str, Any],
    directions: Sequence[Mapping[str, Any]],
    effects: Mapping[str, Any] | None,
    previews: Mapping[str, bytes],
    preview_scales: Sequence[float] | None = None,
) -> str:
    """A self-contained HTML report.

    meta: key -> value rows of the header table (version, model, sampler, samples, ...).
    directions: one mapping per direction with ``name``, ``kind``, ``units``, ``norm``, ``sigma``.
    effects: effects.json content (or None when the build had no evaluate stage).
    previews: direction name -> edit strip PNG bytes; preview_scales label their columns.
    """
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        '<table class="meta">',
        *(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in meta.items()),
        "</table>",
    ]
    if effects is not None:
        m = effects["matrix"]
        units = effects.get("score_units", {})
        out += [
            "<h2>Effect matrix</h2>",
            f"<p>Mean change of each classifier score on {effects.get('n_seeds', '?')} held-out seeds, "
            f"(score(+&gamma;) &minus; score(&minus;&gamma;)) / 2 at &gamma; = {e(str(effects.get('gamma')))} "
            f"({e(str(effects.get('units', '')))} units); logits for binary attributes, values for continuous ones. "
            "Colour: effect divided by the RMS effect of the matched-norm random baselines "
            "(red raises, blue lowers; saturated at 3).</p>",
            "<table><tr><th class=name>direction</th><th>kind</th>"
            + "".join(
                f"<th>{e(c)}<br><span class=kind>{e(units.get(c, ''))}</span></th>" for c in m["columns"]
            )
            + "</tr>",
        ]
        z = m.get("z") or [[None] * len(m["columns"]) for _ in m["rows"]]
        for r, name in enumerate(m["rows"]):
            cells = "".join(f"<td{_cell_style(z[r][k])}>{_fmt(v)}</td>" for k, v in enumerate(m["effect"][r]))
            out.append(
                f"<tr><td class=name>{e(name)}</td><td class=kind>{e(effects['kinds'].get(name, ''))}</td>{cells}</tr>"
            )
        out.append("</table>")
        if effects.get("random_baseline"):
            out.append(
                "<p>Random baseline (|effect| over random rows): "
                + ", ".join(
                    f"{e(a)}: rms {b['rms']:.3f}, max {b['max_abs']:.3f}"
                    for a, b in effects["random_baseline"].items()
                )
                + "</p>"
            )
    out += [
        "<h2>Directions</h2>",
        "<table><tr><th class=name>name</th><th>kind</th><th>units</th><th>norm</th><th>mean sigma</th></tr>",
    ]
    for d in directions:
        sigma = d.get("sigma")
        out.append(
            f"<tr><td class=name>{e(d['name'])}</td><td class=kind>{e(d['kind'])}</td>"
            f"<td>{e(d.get('units', ''))}</td><td>{d.get('norm', float('nan')):.3g}</td>"
            f"<td>{'–' if sigma is None else f'{sigma:.3g}'}</td></tr>"
        )
    out.append("</table>")
    if previews:
        label = ", ".join(f"{s:+g}" for s in preview_scales) if preview_scales else ""
        out.append(f"<h2>Edit previews</h2><p>Rows: held-out seeds; columns: &gamma; = {e(label)}.</p>")
        for name, png in previews.items():
            out.append(f"<figure>{_img(png, name)}<figcaption>{e(name)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)
