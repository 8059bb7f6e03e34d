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

from hspace.grade import LEAKAGE_THRESHOLD, RESAMPLES, confidence_text, leakage_text

__all__ = [
    "edit_strip_png",
    "effect_table_text",
    "grade_table_text",
    "render_report",
    "sorted_by_grade",
]


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


def sorted_by_grade(grades: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Direction names best first: by letter, then by score (descending), then by name."""
    from hspace.grade import LETTERS

    def key(name: str) -> tuple[int, float, str]:
        g = grades[name]
        letter = g.get("letter")
        return (LETTERS.index(letter) if letter in LETTERS else len(LETTERS), -float(g.get("score", 0)), name)

    return sorted(grades, key=key)


def _multiple(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:+.2f}x"


def grade_table_text(grades: Mapping[str, Mapping[str, Any]], *, max_rows: int | None = None) -> str:
    """Grades as fixed-width text, best first: letter, its confidence, own attribute, effect and its
    multiple of the random band, share of seeds moved the intended way, largest cross-effect,
    leakage, flags."""
    names = sorted_by_grade(grades)
    shown = names if max_rows is None else names[:max_rows]
    name_w = max(10, *(len(n) for n in names)) if names else 10
    lines = [
        f"{'direction':<{name_w}}  grade  conf  {'own attribute':<15} {'effect':>8} {'x band':>8}  seeds  "
        f"{'largest cross-effect':<24}  {'leakage':<16}  flags"
    ]
    for n in shown:
        g, own, cross = grades[n], grades[n]["own"], grades[n].get("cross") or {}
        cross_text = f"{cross['attribute'][:15]} {_fmt(cross.get('effect'))}" if cross else "-"
        lines.append(
            f"{n:<{name_w}}  {g['letter']:<5}  {confidence_text(g):>4}  {own['attribute'][:15]:<15} "
            f"{_fmt(own['effect']):>8} {_multiple(own.get('multiple')):>8}  {own['share']:>5.0%}  {cross_text:<24}  "
            f"{leakage_text(g, short=True):<16}  " + (",".join(g["flags"]) or "-")
        )
    if len(shown) < len(names):
        lines.append(f"... {len(names) - len(shown)} more in the manifest")
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


_GRADE_NOTE = (
    "<p>Grades (best first). <em>Own</em> is the attribute a supervised direction was built from "
    "(intended sign +); other directions are graded by the attribute they move most. "
    "&times; band: own effect divided by the random band, the 95th percentile of |effect| over the "
    "matched-norm random directions. Seeds: share of held-out seeds moved the intended way. "
    "A: &times;3 and 90% of seeds; B: &times;2 and 75%; C: outside the band and 60%; D: outside the band, "
    "weaker; F: wrong sign or within the random band. Leakage: the largest effect on another attribute as a "
    "share of what that attribute's best supervised direction does to it (that direction's effect in "
    "parentheses). <em>entangled</em> (a cross-effect larger than the own one, relative to its band, or a "
    f"leakage share above {LEAKAGE_THRESHOLD:.0%}) lowers the letter by one. A, B and C pass. "
    f"Confidence: the share of {RESAMPLES} bootstrap resamples of the held-out seeds that give the same "
    "letter; a letter under 90% may well come out one letter off on other seeds.</p>"
)


def _grade_rows(grades: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str]) -> list[str]:
    """The grade table, best first."""
    e = html.escape
    out = [
        _GRADE_NOTE,
        "<table class=grades><tr><th class=name>direction</th><th>kind</th><th>grade</th><th>confidence</th>"
        "<th>score</th>"
        "<th>own attribute</th><th>effect</th><th>&times; band</th><th>seeds</th>"
        "<th>largest cross-effect</th><th>leakage</th><th>flags</th></tr>",
    ]
    for name in sorted_by_grade(grades):
        g, own, cross = grades[name], grades[name]["own"], grades[name].get("cross")
        cross_cell = f"{e(cross['attribute'])} {_fmt(cross.get('effect'))}" if cross else "–"
        out.append(
            f"<tr class=grade-{e(str(g['letter']))}><td class=name>{e(name)}</td>"
            f"<td class=kind>{e(kinds.get(name, ''))}</td><td><b>{e(str(g['letter']))}</b></td>"
            f"<td>{e(confidence_text(g))}</td>"
            f"<td>{float(g.get('score', 0)):.2f}</td><td class=name>{e(own['attribute'])}</td>"
            f"<td>{_fmt(own['effect'])}</td><td>{_multiple(own.get('multiple'))}</td>"
            f"<td>{own['share']:.0%}</td><td class=name>{cross_cell}</td>"
            f"<td class=name>{e(leakage_text(g))}</td><td class=name>{e(', '.join(g['flags']) or '–')}</td></tr>"
        )
    out.append("</table>")
    return out


def _methods_side_by_side(
    grades: Mapping[str, Mapping[str, Any]], directions: Sequence[Mapping[str, Any]]
) -> list[str]:
    """One row per attribute, one column per supervised method: grade and own effect of each."""
    e = html.escape
    by_attr: dict[str, dict[str, str]] = {}
    methods: list[str] = []
    for d in directions:
        attribute, method = d.get("attribute"), d.get("method")
        if not attribute or not method or d["name"] not in grades:
            continue
        by_attr.setdefault(str(attribute), {})[str(method)] = d["name"]
        methods += [str(method)] if method not in methods else []
    if not by_attr:
        return []
    out = [
        "<h3>Methods side by side</h3><p>Each attribute's supervised directions: grade, own effect and "
        "its multiple of the random band.</p>",
        "<table><tr><th class=name>attribute</th>" + "".join(f"<th>{e(m)}</th>" for m in methods) + "</tr>",
    ]
    for attribute in sorted(by_attr):
        cells = []
        for method in methods:
            name = by_attr[attribute].get(method)
            if name is None:
                cells.append("<td>–</td>")
                continue
            g = grades[name]
            cells.append(
                f"<td title='{e(name)}'><b>{e(str(g['letter']))}</b> {_fmt(g['own']['effect'])} "
                f"({_multiple(g['own'].get('multiple'))})</td>"
            )
        out.append(f"<tr><td class=name>{e(attribute)}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return out


def _effect_matrix_rows(effects: Mapping[str, Any]) -> list[str]:
    """The effect matrix (rows best grade first when graded) and the random baseline's spread."""
    e = html.escape
    m = effects["matrix"]
    units = effects.get("score_units", {})
    out = [
        "<h2>Effect matrix</h2>",
        f"<p>Mean change of each classifier score on {effects.get('n_seeds', '?')} held-out seeds, "
        f"(score(+&gamma;) &minus; score(&minus;&gamma;)) / 2 at &gamma; = {e(str(effects.get('gamma')))} "
        f"({e(str(effects.get('units', '')))} units); logits for binary attributes, values for continuous ones. "
        "Colour: effect divided by the RMS effect of the matched-norm random baselines "
        "(red raises, blue lowers; saturated at 3).</p>",
        "<table><tr><th class=name>direction</th><th>kind</th>"
        + "".join(f"<th>{e(c)}<br><span class=kind>{e(units.get(c, ''))}</span></th>" for c in m["columns"])
        + "</tr>",
    ]
    z = m.get("z") or [[None] * len(m["columns"]) for _ in m["rows"]]
    grades = effects.get("grades") or {}
    index = {name: r for r, name in enumerate(m["rows"])}
    order = [*sorted_by_grade(grades), *(n for n in m["rows"] if n not in grades)]
    for name in order:
        r = index[name]
        cells = "".join(f"<td{_cell_style(z[r][k])}>{_fmt(v)}</td>" for k, v in enumerate(m["effect"][r]))
        out.append(
            f"<tr><td class=name>{e(name)}</td><td class=kind>{e(effects['kinds'].get(name, ''))}</td>{cells}</tr>"
        )
    out.append("</table>")
    if effects.get("random_baseline"):
        out.append(
            "<p>Random baseline (|effect| over random rows): "
            + ", ".join(
                f"{e(a)}: rms {b['rms']:.3f}, p95 {b.get('p95_abs', float('nan')):.3f}, "
                f"max {b['max_abs']:.3f}"
                for a, b in effects["random_baseline"].items()
            )
            + "</p>"
        )
    return out


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
        if effects.get("grades"):
            out += ["<h2>Grades</h2>", *_grade_rows(effects["grades"], effects.get("kinds", {}))]
            out += _methods_side_by_side(effects["grades"], directions)
        out += _effect_matrix_rows(effects)
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
