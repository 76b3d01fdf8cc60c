"""The benchmark report: one self-contained HTML file for research networks and clinicians.

:func:`render_report` turns a benchmark document (the content of ``benchmark.json``, see
:mod:`coordinator.publish`) into HTML with inline CSS and inline SVG plots drawn here. The
file loads nothing: no scripts, fonts, style sheets or images from anywhere, so it reads
the same offline, in an archive or attached to an e-mail. Every value taken from the
document is escaped with :func:`html.escape`; the document is data, never markup.

Contents: the study and its hash; the privacy statement in words; expected change and
rates of reliable improvement and deterioration by intake band; every estimate per band
(suppressed ones with their reason); trajectories over sessions with their intervals,
tolerance bands and the fitted a + b ln(session) curve; change quantiles; the
severity-adjusted regression; the methods note and the software version.

The plots cope with what a noisy, pooled benchmark gives: bands without data, suppressed
estimates (gaps, labelled), negative changes, a single band and a single session.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = ["render_report"]

MINUS = "\u2212"
DASH = "\u2013"
# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
INK, MUTED, GRID, AXIS = "#1f2328", "#57606a", "#e4e7eb", "#8c959f"


# ---------------------------------------------------------------------------- values


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(x: Any) -> float | None:
    """A finite float, or None for anything else (null, NaN, strings, booleans)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _map(x: Any) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {}


def _list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, Sequence) and not isinstance(x, str | bytes) else []


@dataclass(frozen=True, slots=True)
class _Est:
    value: float | None
    lo: float | None = None
    hi: float | None = None
    se_sampling: float | None = None
    se_noise: float | None = None
    reason: str | None = None  # why there is no value
    note: str | None = None  # known by definition, or clipped to its range

    @property
    def ok(self) -> bool:
        return self.value is not None

    @property
    def by_definition(self) -> bool:
        return self.note is not None and "by definition" in self.note


def _why(reason: str | None) -> str:
    """How a missing figure reads: not estimable at this budget, not defined (the band
    rules it out), or suppressed (too few episodes, too noisy a count)."""
    text = str(reason or "no estimate")
    if text.startswith("not estimable"):
        return text
    if "by definition" in text:
        return f"not defined: {text}"
    return f"suppressed: {text}"


def _est(raw: Any) -> _Est:
    if not isinstance(raw, Mapping):
        return _Est(None, reason="not reported")
    value, reason = _num(raw.get("value")), raw.get("suppressed")
    if reason is not None or value is None:
        return _Est(None, reason=str(reason) if reason is not None else "no estimate")
    ci = _list(raw.get("ci95"))
    lo, hi = (_num(ci[0]), _num(ci[1])) if len(ci) == 2 else (None, None)
    note = raw.get("note")
    return _Est(value, lo, hi, _num(raw.get("se_sampling")), _num(raw.get("se_noise")),
                note=str(note)[:300] if note is not None else None)


def _fmt(x: float, decimals: int, suffix: str = "") -> str:
    s = f"{x:,.{decimals}f}"
    if not s.lstrip("-").replace("0", "").replace(".", "").replace(",", ""):
        s = s.lstrip("-")  # never "-0.00"
    return s.replace("-", MINUS) + suffix


def _sig(x: float, digits: int = 2, suffix: str = "") -> str:
    if x == 0:
        return "0" + suffix
    return _fmt(x, max(0, min(6, digits - 1 - math.floor(math.log10(abs(x))))), suffix)


# kind -> (factor, decimals, suffix)
_KINDS: dict[str, tuple[float, int, str]] = {
    "count": (1.0, 0, ""),
    "score": (1.0, 2, ""),
    "slope": (1.0, 3, ""),
    "rate": (100.0, 1, "%"),
    "whole": (1.0, 0, ""),
}


def _show(x: float, kind: str) -> str:
    factor, decimals, suffix = _KINDS[kind]
    return _fmt(x * factor, decimals, suffix)


def _ci(est: _Est, kind: str) -> str:
    if est.lo is None or est.hi is None:
        return DASH
    return f"{_show(est.lo, kind)} to {_show(est.hi, kind)}"


def _value_ci(est: _Est, kind: str) -> str:
    """'value (lo to hi)' or 'suppressed: reason', escaped."""
    if est.value is None:
        return _e(_why(est.reason))
    if est.by_definition:
        return _e(f"{_show(est.value, kind)} (by definition)")
    ci = "" if est.lo is None or est.hi is None else f" ({_ci(est, kind)})"
    return _e(_show(est.value, kind) + ci)


def _sci(x: float) -> str:
    """A small positive number as 'm x 10<sup>e</sup>' (HTML), with a real times sign."""
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return _e(f"{x:.3g}")
    mantissa, exponent = f"{x:.2e}".split("e")
    m = mantissa.rstrip("0").rstrip(".")
    head = "" if m == "1" else f"{m} \u00d7 "
    return f"{_e(head)}10<sup>{_e(str(int(exponent)).replace('-', MINUS))}</sup>"


def _fraction(x: Any) -> float | None:
    if isinstance(x, str):
        try:
            return float(Fraction(x))
        except (ValueError, ZeroDivisionError):
            return None
    return _num(x)


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else (words or word + 's')}"


# ------------------------------------------------------------------------ estimates

# key -> (label, kind, definition)
ESTIMATES: dict[str, tuple[str, str, str]] = {
    "episodes": ("Episodes", "count", "noisy count of episodes whose intake score is in the band"),
    "mean_intake": ("Mean intake score", "score", ""),
    "mean_change": (
        "Expected change",
        "score",
        "mean change from intake to the last score; positive = improvement",
    ),
    "sd_change": ("SD of change", "score", "spread of the individual changes"),
    "effect_size": (
        "Effect size",
        "score",
        "expected change divided by the SD of intake over all bands",
    ),
    "reliable_improvement_rate": (
        "Reliable improvement",
        "rate",
        "improved by at least the reliable change",
    ),
    "reliable_deterioration_rate": (
        "Reliable deterioration",
        "rate",
        "worsened by at least the reliable change",
    ),
    "response_rate": (
        "Response",
        "rate",
        "improved by at least half the distance from intake to the best score",
    ),
    "remission_rate": ("Remission", "rate", "not at caseness (clinical cut-off) at the end"),
    "case_at_intake_rate": (
        "At caseness at intake",
        "rate",
        "score on the clinical side of the cut-off at intake",
    ),
    "recovery_rate": (
        "Recovery",
        "rate",
        "at caseness at intake and not at the end; per episode at caseness",
    ),
    "reliable_recovery_rate": (
        "Reliable recovery",
        "rate",
        "recovery with reliable improvement; per episode at caseness",
    ),
}


def _describe(key: str) -> tuple[str, str, str]:
    if key in ESTIMATES:
        return ESTIMATES[key]
    return key.replace("_", " ").capitalize(), "rate" if key.endswith("_rate") else "score", ""


@dataclass(frozen=True, slots=True)
class _Band:
    key: str  # the document's band label, e.g. "10-14"
    label: str  # for display, with an en dash
    estimates: Mapping[str, Any]


def _bands(doc: Mapping[str, Any]) -> list[_Band]:
    out = []
    for i, raw in enumerate(_list(doc.get("bands"))):
        b = _map(raw)
        key = str(b.get("band", f"band {i + 1}"))
        lo, hi = _num(b.get("lo")), _num(b.get("hi"))
        label = key if lo is None or hi is None else f"{_fmt(lo, 0)}{DASH}{_fmt(hi, 0)}"
        out.append(_Band(key, label, _map(b.get("estimates"))))
    return out


# ----------------------------------------------------------------------------- SVG


def _c(x: float) -> str:
    return f"{x:.1f}"


def _ticks(lo: float, hi: float, target: int = 5) -> tuple[list[float], float]:
    """Round tick values covering [lo, hi], and their step."""
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo < 1e-9:
        pad = max(abs(lo) * 0.1, 1.0)
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw * (1 - 1e-9))
    start = math.floor(lo / step + 1e-9)
    stop = math.ceil(hi / step - 1e-9)
    return [i * step for i in range(start, stop + 1)], step


def _tick_label(v: float, step: float, suffix: str = "") -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step / 10.0**-decimals - round(step / 10.0**-decimals)) > 1e-6:
        decimals += 1  # 2.5, 0.25, ...
    return _fmt(0.0 if abs(v) < step * 1e-6 else v, decimals, suffix)


def _lin(d0: float, d1: float, r0: float, r1: float) -> Callable[[float], float]:
    k = (r1 - r0) / (d1 - d0)
    return lambda v: r0 + (v - d0) * k


def _svg_open(svg_id: str, width: float, height: float, title: str, desc: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
        f'aria-labelledby="{svg_id}-title {svg_id}-desc" font-size="12" fill="{INK}">'
        f'<title id="{svg_id}-title">{_e(title)}</title>'
        f'<desc id="{svg_id}-desc">{_e(desc)}</desc>'
    )


def _text(
    x: float,
    y: float,
    s: str,
    anchor: str = "start",
    size: float = 12,
    fill: str = INK,
    extra: str = "",
    tip: str | None = None,
) -> str:
    """SVG text; ``s`` and ``tip`` are plain text and get escaped."""
    title = "" if tip is None else f"<title>{_e(tip)}</title>"
    return (
        f'<text x="{_c(x)}" y="{_c(y)}" text-anchor="{anchor}" font-size="{size:g}" '
        f'fill="{fill}"{extra}>{title}{_e(s)}</text>'
    )


def _line(
    x1: float, y1: float, x2: float, y2: float, stroke: str, width: float = 1, extra: str = ""
) -> str:
    return (
        f'<line x1="{_c(x1)}" y1="{_c(y1)}" x2="{_c(x2)}" y2="{_c(y2)}" '
        f'stroke="{stroke}" stroke-width="{width:g}"{extra}/>'
    )


def _y_axis(
    parts: list[str],
    ticks: list[float],
    step: float,
    y: Callable[[float], float],
    x0: float,
    x1: float,
    suffix: str = "",
    zero: bool = True,
) -> None:
    for t in ticks:
        parts.append(_line(x0, y(t), x1, y(t), GRID))
        parts.append(_text(x0 - 6, y(t) + 4, _tick_label(t, step, suffix), "end", 11.5, MUTED))
    if zero and ticks[0] < 0 < ticks[-1]:
        parts.append(_line(x0, y(0.0), x1, y(0.0), AXIS, 1.2))


def _y_title(parts: list[str], x: float, y: float, s: str) -> None:
    parts.append(_text(x, y, s, "middle", 12.5, INK, f' transform="rotate(-90 {_c(x)} {_c(y)})"'))


@dataclass(frozen=True, slots=True)
class _Series:
    name: str
    colour: str
    estimates: list[_Est]


def _band_plot(
    svg_id: str,
    title: str,
    desc: str,
    categories: list[str],
    series: list[_Series],
    y_title: str,
    x_title: str,
    kind: str,
) -> str:
    """Points with 95% error bars per category (intake band), one or more series."""
    factor, _, suffix = _KINDS[kind]
    width, left, right, top = 430.0, 64.0, 12.0, 40.0 if len(series) > 1 else 18.0
    n = max(len(categories), 1)
    slot = (width - left - right) / n
    longest = max(map(len, categories), default=0)
    tilt = slot < 7.0 * longest + 8  # crowded: tilt the band labels
    bottom = 56.0 + (max(0.0, 3.8 * longest - 10) if tilt else 0.0)
    height = 264.0 + bottom
    vals = [
        v * factor
        for s in series
        for e in s.estimates
        for v in (e.value, e.lo, e.hi)
        if v is not None
    ]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero (no change, or a 0% rate) is always shown
    ticks, step = _ticks(lo, hi)
    y = _lin(ticks[0], ticks[-1], height - bottom, top)
    x_of = [left + slot * (i + 0.5) for i in range(n)]
    parts = [_svg_open(svg_id, width, height, title, desc)]
    _y_axis(parts, ticks, step, y, left, width - right, suffix)
    _y_title(parts, 16, (top + height - bottom) / 2, y_title)
    parts.append(_line(left, height - bottom, width - right, height - bottom, AXIS))
    for i, cat in enumerate(categories):
        if tilt:
            ty = height - bottom + 14
            parts.append(
                _text(
                    x_of[i] + 3,
                    ty,
                    cat,
                    "end",
                    11,
                    INK,
                    f' transform="rotate(-35 {_c(x_of[i] + 3)} {_c(ty)})"',
                )
            )
        else:
            parts.append(_text(x_of[i], height - bottom + 18, cat, "middle", 12))
    parts.append(_text((left + width - right) / 2, height - 12, x_title, "middle", 12.5))
    if len(series) > 1:  # legend
        x = left
        for s in series:
            parts.append(
                f'<circle cx="{_c(x + 5)}" cy="{_c(top - 22)}" r="4.5" fill="{s.colour}"/>'
            )
            parts.append(_text(x + 14, top - 18, s.name, "start", 12))
            x += 26 + 7.0 * len(s.name)
    offsets = [
        (j - (len(series) - 1) / 2) * min(22.0, slot / (len(series) + 1))
        for j in range(len(series))
    ]
    for j, s in enumerate(series):
        for i, est in enumerate(s.estimates[:n]):
            cx = x_of[i] + offsets[j]
            if est.value is None:
                label = est.reason or "no estimate"
                short = "suppressed" if label not in ("not reported", "no estimate") else label
                text = short if len(series) == 1 else f"{s.name.split()[-1]}: {short}"
                parts.append(
                    _text(
                        x_of[i],
                        (top + height - bottom) / 2 + 16 * j,
                        text,
                        "middle",
                        11,
                        MUTED,
                        ' font-style="italic"',
                        tip=f"{s.name}, intake {_cat(categories, i)}: {label}",
                    )
                )
                continue
            v = est.value * factor
            if est.lo is not None and est.hi is not None:
                y0, y1 = y(est.lo * factor), y(est.hi * factor)
                parts.append(_line(cx, y0, cx, y1, s.colour, 1.8))
                parts.append(_line(cx - 5, y0, cx + 5, y0, s.colour, 1.8))
                parts.append(_line(cx - 5, y1, cx + 5, y1, s.colour, 1.8))
            tip = f"{s.name}, intake {_cat(categories, i)}: {_show(est.value, kind)}"
            if est.lo is not None and est.hi is not None:
                tip += f" (95% CI {_ci(est, kind)})"
            parts.append(
                f'<circle cx="{_c(cx)}" cy="{_c(y(v))}" r="5" fill="{s.colour}" '
                f'stroke="#fff" stroke-width="1.5"><title>{_e(tip)}</title></circle>'
            )
            if slot / len(series) < 40:
                continue  # too crowded for value labels: the tooltip and the table have them
            label = _show(est.value, kind)
            right_side = j >= (len(series) - 1) / 2
            room = (
                cx + 8 + 6.5 * len(label) <= width
                if right_side
                else cx - 8 - 6.5 * len(label) >= left
            )
            if room:
                parts.append(
                    _text(
                        cx + (8 if right_side else -8),
                        y(v) + 4,
                        label,
                        "start" if right_side else "end",
                        11,
                        INK,
                        ' font-weight="600"',
                    )
                )
            else:  # no room beside the point: above its interval
                cap = y(est.hi * factor) if est.hi is not None else y(v) - 4
                parts.append(_text(cx, cap - 5, label, "middle", 11, INK, ' font-weight="600"'))
    parts.append("</svg>")
    return "".join(parts)


def _cat(categories: list[str], i: int) -> str:
    return categories[i] if i < len(categories) else "?"


# ----------------------------------------------------------------------- trajectory


@dataclass(frozen=True, slots=True)
class _Session:
    mean: _Est
    tolerance: tuple[float, float] | None


def _runs(sessions: list[int], points: list[int] | None = None) -> list[list[int]]:
    """Runs of sorted session numbers that are consecutive among the trajectory's
    ``points`` (its review groups' sessions; default every session): gaps split them."""
    order = {s: i for i, s in enumerate(sorted(points))} if points else None
    runs: list[list[int]] = []
    for s in sessions:
        prev = runs[-1][-1] if runs else None
        if prev is not None and (
            order[s] == order[prev] + 1 if order is not None and s in order and prev in order
            else s == prev + 1
        ):
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def _area(
    run: list[int],
    lo: Mapping[int, float],
    hi: Mapping[int, float],
    x: Callable[[float], float],
    y: Callable[[float], float],
    colour: str,
    opacity: float,
) -> str:
    if len(run) == 1:  # an isolated session: a short vertical bar
        s = run[0]
        return (
            f'<rect x="{_c(x(s) - 4)}" y="{_c(y(hi[s]))}" width="8" '
            f'height="{_c(max(y(lo[s]) - y(hi[s]), 0.5))}" fill="{colour}" '
            f'fill-opacity="{opacity}"/>'
        )
    pts = [f"{_c(x(s))},{_c(y(hi[s]))}" for s in run]
    pts += [f"{_c(x(s))},{_c(y(lo[s]))}" for s in reversed(run)]
    return f'<polygon points="{" ".join(pts)}" fill="{colour}" fill-opacity="{opacity}"/>'


def _session_ticks(k: int) -> list[int]:
    if k <= 12:
        return list(range(1, k + 1))
    step = next(s for s in (2, 5, 10, 20, 25, 50, 100, 200, 500) if k / s <= 10)
    return [1] + [s for s in range(step, k + 1, step) if s - 1 >= step / 2]


def _fit_of(row: Mapping[str, Any]) -> tuple[float, float] | None:
    a, b = _est(row.get("a")), _est(row.get("b"))
    return (a.value, b.value) if a.value is not None and b.value is not None else None


def _trajectory_plot(
    labels: list[tuple[str, str]],
    colours: Mapping[str, str],
    data: Mapping[str, Mapping[int, _Session]],
    fits: Mapping[str, tuple[float, float]],
    k: int,
    instrument: str,
) -> str:
    n = len(labels)
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    width, legend_h, panel_h = 880.0, 34.0, 270.0
    panel_w = width / cols
    left, right, top, bottom = 58.0, 14.0, 40.0, 44.0
    height = legend_h + rows * panel_h

    curve: dict[str, list[tuple[float, float]]] = {}
    vals = [0.0]
    for key, _ in labels:
        sessions = data.get(key, {})
        for sess in sessions.values():
            vals += [v for v in (sess.mean.value, sess.mean.lo, sess.mean.hi) if v is not None]
            if sess.tolerance is not None:
                vals += list(sess.tolerance)
        shown = [s for s, sess in sessions.items() if sess.mean.ok]
        if key in fits and shown and max(shown) >= 2:
            a, b = fits[key]
            last = max(shown)
            pts = [1 + (last - 1) * i / 48 for i in range(49)]
            curve[key] = [(s, a + b * math.log(s)) for s in pts]
            vals += [v for _, v in curve[key]]
    ticks, step = _ticks(min(vals), max(vals), 6)

    desc = (
        f"Mean change in {instrument} score from intake at sessions 1 to {k}, one panel "
        "per intake band, with the 95% interval of the mean (darker shading), the 95% "
        "tolerance band for individual clients (lighter shading) and the fitted "
        "a + b ln(session) curve (dashed). Suppressed sessions are gaps."
    )
    parts = [_svg_open("fig-trajectory", width, height, "Change from intake by session", desc)]
    legend = [
        ("tol", "95% tolerance band (clients)"),
        ("ci", "95% CI of the mean"),
        ("mean", "Mean change"),
        ("fit", "Fitted a + b ln(session)"),
    ]
    x = left
    for kind, text in legend:
        ly = 16.0
        if kind in ("tol", "ci"):
            parts.append(
                f'<rect x="{_c(x)}" y="{_c(ly - 7)}" width="22" height="14" '
                f'fill="{MUTED}" fill-opacity="{0.15 if kind == "tol" else 0.45}"/>'
            )
        elif kind == "mean":
            parts.append(_line(x, ly, x + 22, ly, MUTED, 2.2))
            parts.append(f'<circle cx="{_c(x + 11)}" cy="{_c(ly)}" r="3" fill="{MUTED}"/>')
        else:
            parts.append(_line(x, ly, x + 22, ly, INK, 1.6, ' stroke-dasharray="6 4"'))
        parts.append(_text(x + 28, ly + 4, text, "start", 12))
        x += 48 + 6.8 * len(text)

    for p, (key, label) in enumerate(labels):
        ox = (p % cols) * panel_w
        oy = legend_h + (p // cols) * panel_h
        x0, x1 = ox + left, ox + panel_w - right
        y0, y1 = oy + panel_h - bottom, oy + top
        xs = _lin(0.5, k + 0.5, x0, x1)
        ys = _lin(ticks[0], ticks[-1], y0, y1)
        colour = colours[key]
        sessions = data.get(key, {})
        shown = sorted(s for s, sess in sessions.items() if sess.mean.ok)
        parts.append(
            f'<rect x="{_c(ox + 6)}" y="{_c(oy + 9)}" width="12" height="12" '
            f'rx="2" fill="{colour}"/>'
        )
        parts.append(
            _text(ox + 24, oy + 19.5, f"Intake {label}", "start", 13.5, INK, ' font-weight="600"')
        )
        parts.append(
            _text(x1, oy + 19.5, f"{len(shown)} of {len(sessions)} review points estimated",
                  "end", 11.5, MUTED)
        )
        _y_axis(parts, ticks, step, ys, x0, x1)
        parts.append(_line(x0, y0, x1, y0, AXIS))
        for s in _session_ticks(k):
            parts.append(_line(xs(s), y0, xs(s), y0 + 4, AXIS))
            parts.append(_text(xs(s), y0 + 17, str(s), "middle", 11.5, MUTED))
        parts.append(_text((x0 + x1) / 2, y0 + 36, "Session", "middle", 12.5))
        _y_title(parts, ox + 16, (y0 + y1) / 2, "Change from intake")
        if not shown:
            why = "no data for this band" if not sessions else "all sessions suppressed"
            parts.append(
                _text(
                    (x0 + x1) / 2,
                    (y0 + y1) / 2,
                    f"No estimates: {why}",
                    "middle",
                    12.5,
                    MUTED,
                    ' font-style="italic"',
                )
            )
            continue
        tol_lo: dict[int, float] = {}
        tol_hi: dict[int, float] = {}
        for s, sess in sessions.items():
            if sess.tolerance is not None:
                tol_lo[s], tol_hi[s] = sess.tolerance
        for run in _runs(sorted(tol_lo), list(sessions)):
            parts.append(_area(run, tol_lo, tol_hi, xs, ys, colour, 0.12))
        with_ci = [
            s for s in shown if sessions[s].mean.lo is not None and sessions[s].mean.hi is not None
        ]
        ci_lo = {s: sessions[s].mean.lo or 0.0 for s in with_ci}
        ci_hi = {s: sessions[s].mean.hi or 0.0 for s in with_ci}
        for run in _runs(with_ci, list(sessions)):
            parts.append(_area(run, ci_lo, ci_hi, xs, ys, colour, 0.32))
        for run in _runs(shown, list(sessions)):
            if len(run) > 1:
                line = " ".join(f"{_c(xs(s))},{_c(ys(sessions[s].mean.value or 0.0))}" for s in run)
                parts.append(
                    f'<polyline points="{line}" fill="none" stroke="{colour}" '
                    'stroke-width="2.2" stroke-linejoin="round"/>'
                )
        for s in shown:
            m = sessions[s].mean
            tip = f"Intake {label}, session {s}: {_show(m.value or 0.0, 'score')}"
            if m.lo is not None and m.hi is not None:
                tip += f" (95% CI {_ci(m, 'score')})"
            parts.append(
                f'<circle cx="{_c(xs(s))}" cy="{_c(ys(m.value or 0.0))}" r="3.2" '
                f'fill="{colour}" stroke="#fff" stroke-width="1">'
                f"<title>{_e(tip)}</title></circle>"
            )
        if key in curve:
            d = " ".join(
                f"{'M' if i == 0 else 'L'}{_c(xs(s))},{_c(ys(v))}"
                for i, (s, v) in enumerate(curve[key])
            )
            parts.append(
                f'<path d="{d}" fill="none" stroke="{INK}" stroke-width="1.6" '
                'stroke-dasharray="6 4"/>'
            )
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- HTML

CSS = """
:root{--ink:#1f2328;--muted:#57606a;--line:#d8dee4;--soft:#f6f8fa;--accent:#0b5cad}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:#fff;color:var(--ink);
 font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:920px;margin:0 auto;padding:28px 20px 40px}
header .kicker{color:var(--muted);font-size:13px;letter-spacing:.04em;text-transform:uppercase;
 margin:0}
h1{font-size:27px;line-height:1.25;margin:4px 0 14px}
h1 .study-id{font-weight:400;color:var(--muted)}
h2{font-size:20px;margin:38px 0 10px;padding-bottom:5px;border-bottom:2px solid var(--line)}
h3{font-size:15.5px;margin:22px 0 6px}
p{margin:8px 0}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:5px 18px;margin:0;
 padding:14px 18px;background:var(--soft);border:1px solid var(--line);border-radius:8px}
dl.meta dt{color:var(--muted)}
dl.meta dd{margin:0}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.hash{word-break:break-all}
.privacy{border-left:4px solid var(--accent);background:#f2f7fc;padding:8px 18px;
 border-radius:0 8px 8px 0}
.privacy ul{margin:6px 0;padding-left:22px}
table{border-collapse:collapse;width:100%;font-size:13.5px;margin:6px 0 16px;
 font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;font-size:15px;padding:4px 0 6px}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:var(--soft);font-weight:600;border-bottom:2px solid var(--line)}
td.num,th.num{text-align:right;white-space:nowrap}
td.supp{color:var(--muted);font-style:italic}
tbody tr:hover{background:#fafbfc}
tbody th{font-weight:500;white-space:nowrap}
dl.gloss{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:13px;
 margin:8px 0 4px;color:var(--muted)}
dl.gloss dt{font-weight:600;color:var(--ink)}
dl.gloss dd{margin:0}
.figs{display:flex;flex-wrap:wrap;gap:16px;justify-content:space-between}
figure{margin:10px 0 12px;flex:1 1 420px}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
svg.plot{display:block;width:100%;max-width:100%;height:auto}
.note{color:var(--muted);font-size:13.5px}
.formula{font-size:16px;background:var(--soft);border:1px solid var(--line);border-radius:8px;
 padding:10px 14px;display:inline-block}
details{margin:6px 0 14px}
summary{cursor:pointer;color:var(--accent)}
footer{margin-top:40px;padding-top:12px;border-top:1px solid var(--line);color:var(--muted);
 font-size:13px}
@media print{main{max-width:none;padding:0}h2{break-after:avoid}figure,table{break-inside:avoid}}
"""


def _table(head: list[tuple[str, bool]], rows: list[str], caption: str = "", cls: str = "") -> str:
    """``head`` is (escaped html, numeric?) per column; ``rows`` are ready <tr> strings."""
    ths = "".join(f'<th scope="col"{" class=num" if num else ""}>{h}</th>' for h, num in head)
    cap = f"<caption>{caption}</caption>" if caption else ""
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}>{cap}<thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _est_cells(est: _Est, kind: str) -> str:
    """Value, 95% CI, SE (sampling), SE (DP noise) cells, or one 'suppressed' cell."""
    if est.value is None:
        return f'<td class="supp" colspan="4">{_e(_why(est.reason))}</td>'
    if est.by_definition:  # exact: no interval to show
        return (
            f'<td class="num"><strong>{_e(_show(est.value, kind))}</strong></td>'
            f'<td class="supp" colspan="3">{_e(str(est.note))}</td>'
        )
    factor, _, suffix = _KINDS[kind]
    clipped = f"<br><small>{_e(est.note)}</small>" if est.note else ""
    ses = [
        DASH if se is None else _sig(se * factor, 2, suffix)
        for se in (est.se_sampling, est.se_noise)
    ]
    return (
        f'<td class="num"><strong>{_e(_show(est.value, kind))}</strong></td>'
        f'<td class="num">{_e(_ci(est, kind))}{clipped}</td>'
        f'<td class="num">{_e(ses[0])}</td><td class="num">{_e(ses[1])}</td>'
    )


def _header(doc: Mapping[str, Any]) -> str:
    study, ins = _map(doc.get("study")), _map(doc.get("instrument"))
    title = str(study.get("title") or "Untitled study")
    sid = str(study.get("id", "?"))
    window = _map(study.get("window"))
    rng = [_num(v) for v in _list(ins.get("range"))]
    ins_bits = [str(ins.get("name") or ins.get("id") or "?")]
    if ins.get("name") and ins.get("id"):
        ins_bits[0] += f" ({ins['id']})"
    if len(rng) == 2 and rng[0] is not None and rng[1] is not None:
        ins_bits.append(f"range {_fmt(rng[0], 0)}{DASH}{_fmt(rng[1], 0)}")
    if ins.get("better") in ("lower", "higher"):
        ins_bits.append(f"{ins['better']} scores are better")
    cutoff, rc = _num(ins.get("cutoff")), _num(ins.get("reliable_change"))
    if cutoff is not None:
        ins_bits.append(f"clinical cut-off {cutoff:g}")
    if rc is not None:
        ins_bits.append(f"reliable change {rc:g} points")
    rows = [
        ("Study", f"{_e(title)} <span class='mono'>({_e(sid)})</span>"),
        ("Instrument", _e("; ".join(ins_bits))),
        (
            "Data window",
            _e(f"{window.get('start', '?')} to {window.get('end', '?')}")
            + " (episodes ending in the window)",
        ),
        ("Created", _e(str(doc.get("created", "?")).replace("T", " "))),
        ("Study hash", f"<span class='mono hash'>{_e(doc.get('study_hash', '?'))}</span>"),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return (
        f'<header><p class="kicker">Pooled outcome benchmark</p>'
        f'<h1>{_e(title)} <span class="study-id">'
        f'({_e(sid)})</span></h1><dl class="meta">{dl}</dl></header>'
    )


def _privacy(doc: Mapping[str, Any]) -> str:
    p, sites = _map(doc.get("privacy")), _map(doc.get("sites"))
    contributed = [_map(s) for s in _list(sites.get("contributed"))]
    missing = [_map(s) for s in _list(sites.get("missing"))]
    n = p.get("sites")
    n_sites = int(n) if isinstance(n, int) and not isinstance(n, bool) else len(contributed)
    eps, delta, rho = (
        _num(p.get(k)) for k in ("epsilon_per_site_max", "delta_per_site_max", "rho_per_site_max")
    )
    mechanism = p.get("mechanism")
    unit = str(p.get("unit") or "client")
    out = ['<h2 id="privacy">Privacy</h2><div class="privacy">']
    if n_sites == 0:
        out.append(
            "<p><strong>No site contributed a release</strong>, so this document holds "
            "no estimates.</p>"
        )
    else:
        out.append(
            f"<p><strong>{_e(_plural(n_sites, 'site'))} contributed.</strong> Each site "
            "computed its statistics locally and added calibrated random noise (differential "
            "privacy) before anything left the site; no client-level record was shared.</p>"
        )
        loss = []
        if rho is not None:
            loss.append(f"&rho; = {_e(f'{rho:.4g}')} (zero-concentrated differential privacy)")
        if eps is not None and delta is not None:
            loss.append(f"&epsilon; = {_e(f'{eps:.3g}')} at &delta; = {_sci(delta)}")
        elif delta is not None:
            loss.append(
                f"&epsilon; not finite at &delta; = {_sci(delta)}; the guarantee is the &rho; above"
            )
        if loss:
            out.append(
                "<p>Largest privacy loss of any one site's release: "
                f"<strong>{', which implies '.join(loss)}</strong>.</p>"
            )
        asked = _map(_map(doc.get("study")).get("privacy"))
        if asked:
            names = {"rho": "&rho;", "epsilon": "&epsilon;", "delta": "&delta;"}
            req = ", ".join(f"{names.get(str(k), _e(k))} = {_e(v)}" for k, v in asked.items())
            out.append(f"<p>The study asked each site for {req}.</p>")
        out.append(f"<p>Mechanism: {_e(mechanism or 'not stated')}.</p>")
        m = sorted(
            {
                int(v)
                for s in contributed
                if (v := _num(s.get("max_episodes_per_client"))) is not None
            }
        )
        bound = ""
        if len(m) == 1:
            bound = f" (at most {_plural(m[0], 'episode')} per client)"
        elif m:
            bound = f" (at most {m[0]} to {m[-1]} episodes per client, depending on the site)"
        out.append(
            f"<p>The unit of privacy is the <strong>{_e(unit)}</strong>: a site's guarantee "
            f"covers everything one {_e(unit)} contributed to its release{_e(bound)}, not just "
            f"one score or one episode. A {_e(unit)} seen at several sites is protected by each "
            "site's guarantee; their combined loss is at most the sum over those sites.</p>"
        )
        out.append(
            "<p>Pooling is post-processing: the coordinator only summed the sites' noisy "
            "releases and derived every number in this report from those sums, which costs "
            "<strong>no additional privacy</strong>.</p>"
        )
    if missing:
        items = "".join(
            f"<li><span class='mono'>{_e(s.get('site', '?'))}</span>: "
            f"{_e(s.get('reason', 'no reason given'))}</li>"
            for s in missing
        )
        out.append(
            f"<p>{_e(_plural(len(missing), 'site'))} did not contribute and "
            f"{'is' if len(missing) == 1 else 'are'} in no estimate:</p><ul>{items}</ul>"
        )
    else:
        out.append("<p>No site release was missing or rejected.</p>")
    out.append("</div>")
    if contributed:
        rows = []
        for s in contributed:
            e_, d_ = _num(s.get("epsilon")), _num(s.get("delta"))
            r_ = _fraction(s.get("rho"))
            m_ = _num(s.get("max_episodes_per_client"))
            rows.append(
                f"<tr><td class='mono'>{_e(s.get('site_id', '?'))}</td>"
                f"<td class='num'>{DASH if r_ is None else _e(f'{r_:.4g}')}</td>"
                f"<td class='num'>{DASH if e_ is None else _e(f'{e_:.3g}')}</td>"
                f"<td class='num'>{DASH if d_ is None else _sci(d_)}</td>"
                f"<td class='num'>{DASH if m_ is None else _e(f'{m_:g}')}</td>"
                f"<td class='mono hash'>{_e(s.get('release_sha256', ''))}</td></tr>"
            )
        out.append(
            "<details><summary>Contributing sites and their releases</summary>"
            + _table(
                [
                    ("Site", False),
                    ("&rho;", True),
                    ("&epsilon;", True),
                    ("&delta;", True),
                    ("Episodes / client", True),
                    ("Release SHA-256", False),
                ],
                rows,
            )
            + "</details>"
        )
    return "".join(out)


def _band_plots(doc: Mapping[str, Any], bands: list[_Band], better: str, ins_id: str) -> str:
    out = ['<h2 id="change">Expected change by intake band</h2>']
    if not bands:
        return out[0] + '<p class="note">The document has no intake bands.</p>'
    cats = [b.label for b in bands]
    x_title = f"Intake band ({ins_id} score)"
    figs = []
    if any("mean_change" in b.estimates for b in bands):
        change = _Series(
            "Expected change", PALETTE[0], [_est(b.estimates.get("mean_change")) for b in bands]
        )
        desc = "Mean change from intake by intake band with 95% intervals. " + "; ".join(
            f"{b.label}: {_value_ci(e, 'score')}"
            for b, e in zip(bands, change.estimates, strict=True)
        )
        figs.append(
            "<figure>"
            + _band_plot(
                "fig-change",
                "Expected change by intake band",
                desc,
                cats,
                [change],
                f"Change in {ins_id} score",
                x_title,
                "score",
            )
            + "<figcaption>Mean change from intake to the last score (positive = "
            f"improvement{'' if not better else f'; {better} scores are better'}), with "
            "95% intervals that include sampling error and the privacy noise.</figcaption>"
            "</figure>"
        )
    rate_series = [
        _Series(name, colour, [_est(b.estimates.get(key)) for b in bands])
        for key, name, colour in (
            ("reliable_improvement_rate", "Reliable improvement", PALETTE[2]),
            ("reliable_deterioration_rate", "Reliable deterioration", PALETTE[1]),
        )
        if any(key in b.estimates for b in bands)
    ]
    if rate_series:
        desc = "Rates by intake band with 95% intervals. " + " ".join(
            f"{s.name}: "
            + "; ".join(
                f"{b.label}: {_value_ci(e, 'rate')}"
                for b, e in zip(bands, s.estimates, strict=True)
            )
            + "."
            for s in rate_series
        )
        names = " and ".join(s.name.split()[-1] for s in rate_series)
        figs.append(
            "<figure>"
            + _band_plot(
                "fig-rates",
                f"Reliable {names} by intake band",
                desc,
                cats,
                rate_series,
                "Episodes (%)",
                x_title,
                "rate",
            )
            + "<figcaption>Share of episodes whose change reached the reliable change index, "
            "with 95% intervals.</figcaption></figure>"
        )
    if not figs:
        return out[0] + '<p class="note">The study did not ask for change statistics.</p>'
    return out[0] + '<div class="figs">' + "".join(figs) + "</div>"


def _band_tables(bands: list[_Band]) -> str:
    keys_seen = {k for b in bands for k in b.estimates}
    gloss = "".join(
        f"<dt>{_e(label)}</dt><dd>{_e(help_)}</dd>"
        for key, (label, _, help_) in ESTIMATES.items()
        if help_ and key in keys_seen
    )
    out = [
        '<h2 id="estimates">All estimates by intake band</h2>',
        '<p class="note">Value and 95% interval. The two standard errors show how much of '
        "the uncertainty comes from sampling and how much from the privacy noise. Rates "
        "are percentages of episodes unless stated.</p>",
    ]
    if gloss:
        out.append(f'<dl class="gloss">{gloss}</dl>')
    head = [
        ("Estimate", False),
        ("Value", True),
        ("95% CI", True),
        ("SE sampling", True),
        ("SE privacy noise", True),
    ]
    for b in bands:
        keys = [k for k in ESTIMATES if k in b.estimates]
        keys += sorted(k for k in b.estimates if k not in ESTIMATES)
        rows = [
            f"<tr><th scope='row'>{_e(_describe(key)[0])}</th>"
            f"{_est_cells(_est(b.estimates[key]), _describe(key)[1])}</tr>"
            for key in keys
        ]
        if not rows:
            rows.append("<tr><td colspan='5' class='supp'>no estimates</td></tr>")
        out.append(_table(head, rows, caption=f"Intake {_e(b.label)}"))
    return "".join(out)


def _trajectory(doc: Mapping[str, Any], bands: list[_Band], ins_id: str) -> str:
    out = ['<h2 id="trajectory">Change over sessions</h2>']
    rows = [_map(r) for r in _list(doc.get("trajectory"))]
    fit_rows = [_map(r) for r in _list(doc.get("trajectory_fit"))]
    if not rows:
        return out[0] + '<p class="note">The study did not ask for trajectories.</p>'
    labels = [(b.key, b.label) for b in bands]
    for r in rows + fit_rows:
        key = str(r.get("band", "?"))
        if key not in {k for k, _ in labels}:
            labels.append((key, key))
    colours = {key: PALETTE[i % len(PALETTE)] for i, (key, _) in enumerate(labels)}
    data: dict[str, dict[int, _Session]] = {}
    for r in rows:
        s = _num(r.get("session"))
        if s is None or s < 1 or s != int(s):
            continue
        tol = [v for v in map(_num, _list(r.get("tolerance95"))) if v is not None]
        tolerance = (tol[0], tol[1]) if len(tol) == 2 else None
        data.setdefault(str(r.get("band", "?")), {})[int(s)] = _Session(
            _est(r.get("mean_change")), tolerance
        )
    study_k = _num(_map(doc.get("study")).get("max_session"))
    k = max([s for d in data.values() for s in d] + [int(study_k or 1)])
    fits = {str(r.get("band")): f for r in fit_rows if (f := _fit_of(r)) is not None}
    out.append(
        "<figure>"
        + _trajectory_plot(labels, colours, data, fits, k, ins_id)
        + "<figcaption>Mean change from intake at each review point (positive = "
        "improvement) for the episodes scored there: sessions 2 to 6 each, then groups "
        "(7-8, 9-12, 13-16, ...) at their last session, each client at the latest session "
        "of the group it was scored at. Darker shading: 95% interval of the mean; "
        "lighter shading: 95% tolerance band, where most individual clients fall. Gaps "
        "are sessions whose estimates were suppressed (too few clients or too much "
        "noise). Dashed: the fitted a + b ln(session) curve over the sessions with "
        "data.</figcaption></figure>"
    )
    if fit_rows:
        trs = []
        for r in fit_rows:
            key = str(r.get("band", "?"))
            label = dict(labels).get(key, key)
            a, b = _est(r.get("a")), _est(r.get("b"))
            used = _num(r.get("sessions_used"))
            if a.value is None or b.value is None:
                reason = a.reason if a.value is None else b.reason
                cells = f"<td class='supp' colspan='2'>{_e(_why(reason))}</td>"
            else:
                cells = (
                    f"<td class='num'>{_value_ci(a, 'score')}</td>"
                    f"<td class='num'>{_value_ci(b, 'score')}</td>"
                )
            trs.append(
                f"<tr><th scope='row'>Intake {_e(label)}</th>"
                f"{cells}<td class='num'>{DASH if used is None else _e(f'{used:g}')}"
                "</td></tr>"
            )
        out.append(
            "<h3>Fitted curves: change = a + b ln(session)</h3>"
            + _table(
                [
                    ("Band", False),
                    ("a (95% CI)", True),
                    ("b (95% CI)", True),
                    ("Review points used", True),
                ],
                trs,
            )
            + '<p class="note">The session means share clients, so their errors are '
            "correlated; the intervals allow for any nonnegative correlation and may be a "
            "little wide.</p>"
        )
    trs = []
    for s in range(1, k + 1):
        tds = []
        for key, _ in labels:
            sess = data.get(key, {}).get(s)
            if sess is None:
                tds.append(f"<td class='supp num'>{DASH}</td>")
            elif sess.mean.value is None:
                tds.append(f"<td class='supp num' title='{_e(sess.mean.reason)}'>suppressed</td>")
            else:
                tds.append(f"<td class='num'>{_value_ci(sess.mean, 'score')}</td>")
        trs.append(f"<tr><th scope='row' class='num'>{s}</th>{''.join(tds)}</tr>")
    head = [("Session", True)] + [(f"Intake {_e(lbl)}", True) for _, lbl in labels]
    out.append(
        "<details><summary>Session means and 95% intervals as a table</summary>"
        '<p class="note">Point at "suppressed" to see why.</p>' + _table(head, trs) + "</details>"
    )
    return "".join(out)


def _quantiles(doc: Mapping[str, Any], bands: list[_Band]) -> str:
    rows = [_map(r) for r in _list(doc.get("quantiles"))]
    out = ['<h2 id="quantiles">Distribution of change</h2>']
    if not rows:
        return out[0] + '<p class="note">The study did not ask for the change histogram.</p>'
    qs = sorted({q for r in rows if (q := _num(r.get("quantile"))) is not None})
    by_band: dict[str, dict[float, _Est]] = {}
    for r in rows:
        q = _num(r.get("quantile"))
        if q is not None:
            by_band.setdefault(str(r.get("band", "?")), {})[q] = _est(r)
    labels = {b.key: b.label for b in bands}
    numbers = [
        v
        for ests in by_band.values()
        for e in ests.values()
        for v in (e.value, e.lo, e.hi)
        if v is not None
    ]
    kind = "whole" if all(v == round(v) for v in numbers) else "score"
    trs = []
    for key, ests in by_band.items():
        cells = [ests.get(q, _Est(None, reason="not reported")) for q in qs]
        reasons = {e.reason for e in cells if e.value is None}
        if len(reasons) == 1 and all(e.value is None for e in cells):
            tds = f"<td class='supp' colspan='{len(qs)}'>{_e(_why(reasons.pop()))}</td>"
        else:
            tds = "".join(
                f"<td class='{'num' if e.ok else 'supp'}'>{_value_ci(e, kind)}</td>" for e in cells
            )
        trs.append(f"<tr><th scope='row'>Intake {_e(labels.get(key, key))}</th>{tds}</tr>")

    def name(q: float) -> str:
        if abs(q - 0.5) < 1e-9:
            return "Median"
        pct = f"{q * 100:g}"
        suffix = (
            "th"
            if pct[-2:] in ("11", "12", "13")
            else {"1": "st", "2": "nd", "3": "rd"}.get(pct[-1], "th")
        )
        return _e(f"{pct}{suffix} percentile")

    out.append(
        '<p class="note">Change from intake at the given percentiles of episodes '
        "(positive = improvement), with 95% intervals.</p>"
    )
    out.append(_table([("Band", False)] + [(name(q), True) for q in qs], trs))
    return "".join(out)


def _regression(doc: Mapping[str, Any], ins_id: str) -> str:
    reg = _map(doc.get("regression"))
    out = ['<h2 id="regression">Severity-adjusted expected change</h2>']
    if not reg:
        return out[0] + '<p class="note">The study did not ask for the regression.</p>'
    parts = [
        ("intercept", "Intercept", "score"),
        ("slope", "Slope (per intake point)", "slope"),
        ("residual_sd", "Residual SD", "score"),
    ]
    ests = {k: _est(reg.get(k)) for k, _, _ in parts}
    a, b = ests["intercept"], ests["slope"]
    formula = "severity-adjusted expected change = intercept + slope \u00d7 intake"
    out.append(f'<p class="formula">{_e(formula)}')
    if a.value is not None and b.value is not None:
        sign = "+" if b.value >= 0 else MINUS
        out.append(
            "<br>"
            + _e(
                f"= {_show(a.value, 'score')} {sign} "
                f"{_show(abs(b.value), 'slope')} \u00d7 {ins_id} intake score"
            )
        )
    out.append("</p>")
    n, mx = _num(reg.get("episodes")), _num(reg.get("mean_intake"))
    notes = []
    if n is not None:
        notes.append(f"Fitted over all bands on {_fmt(n, 0)} episodes (noisy count)")
    if mx is not None:
        notes.append(f"mean intake {_fmt(mx, 2)}")
        if a.value is not None and b.value is not None:
            notes.append(f"where the expected change is {_show(a.value + b.value * mx, 'score')}")
    if notes:
        out.append(
            f'<p class="note">{_e(", ".join(notes))}. Compare a service\'s observed '
            "change with the value this line gives for its clients' intake scores.</p>"
        )
    head = [
        ("Term", False),
        ("Value", True),
        ("95% CI", True),
        ("SE sampling", True),
        ("SE privacy noise", True),
    ]
    trs = [
        f"<tr><th scope='row'>{_e(label)}</th>{_est_cells(ests[key], kind)}</tr>"
        for key, label, kind in parts
    ]
    out.append(_table(head, trs))
    return "".join(out)


def _methods(doc: Mapping[str, Any]) -> str:
    out = ['<h2 id="methods">Methods</h2>']
    if doc.get("methods"):
        out.append(f"<p>{_e(doc['methods'])}</p>")
    ref = _est(doc.get("effect_size_reference_sd"))
    if "effect_size_reference_sd" in doc:
        out.append(
            f"<p>Reference SD of intake for effect sizes (all bands): "
            f"{_value_ci(ref, 'score')}.</p>"
        )
    return "".join(out)


def render_report(doc: Mapping[str, Any]) -> str:
    """The benchmark document as one self-contained HTML page (no external resources)."""
    study, ins = _map(doc.get("study")), _map(doc.get("instrument"))
    ins_id = str(ins.get("id") or _map(study.get("instrument")).get("id") or "instrument")
    better = str(ins.get("better")) if ins.get("better") in ("lower", "higher") else ""
    bands = _bands(doc)
    title = f"{study.get('title') or 'Untitled study'} ({study.get('id', '?')})"
    software = _map(doc.get("software"))
    sw = ", ".join(f"{k} {v}" for k, v in software.items()) or "unknown version"
    body = "".join(
        [
            _header(doc),
            _privacy(doc),
            _band_plots(doc, bands, better, ins_id),
            _band_tables(bands) if bands else "",
            _trajectory(doc, bands, ins_id),
            _quantiles(doc, bands),
            _regression(doc, ins_id),
            _methods(doc),
        ]
    )
    footer = (
        f"<footer>Generated by {_e(sw)} from a benchmark document "
        f"({_e(doc.get('format', '?'))} version {_e(doc.get('version', '?'))}). "
        "This page is self-contained: it runs no scripts and loads nothing. Check the "
        "bundle's signed MANIFEST.json before relying on it.</footer>"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e('Benchmark: ' + title)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}{footer}</main></body></html>\n"
    )
