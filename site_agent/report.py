"""The clinic's local comparison with a published benchmark. Nothing here leaves the site.

After verifying the bundle's signature and files, the clinic's own episodes (exact) are
compared with the benchmark: observed vs expected change per intake band, the clinic's
effect size and severity-adjusted effect size (ACORN) with intervals, and, for clients
still in treatment, whether they are on track against the expected trajectory.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protocols.bundle import BENCHMARK_FORMAT, BENCHMARK_VERSION, check_files, read_manifest
from protocols.effect import acorn_label, effect_size
from protocols.errors import SpecError
from site_agent import crypto
from site_agent.config import SiteConfig
from site_agent.data import read_intake
from site_agent.outcomes import derive_episodes, is_case
from site_agent.summary import LOCAL_ONLY

__all__ = ["Comparison", "compare", "load_benchmark", "write_comparison"]

Z95 = 1.959963984540054


def load_benchmark(bundle: Path, keys: Iterable[Path]) -> dict[str, Any]:
    """The verified ``benchmark.json``; SpecError when the bundle does not verify."""
    keys = list(keys)
    if not keys:
        raise SpecError(
            str(bundle),
            [
                "no network key to verify the bundle with: pass --key "
                "NETWORK_PUB or list it in trusted_coordinator_keys"
            ],
        )
    bad_keys = [p for p in (crypto.public_key_problem(k) for k in keys) if p]
    if bad_keys:
        raise SpecError(str(bundle), bad_keys)
    env = read_manifest(bundle)
    if not any(crypto.signed_by(env, k) for k in keys):
        raise SpecError(
            str(bundle), [f"{bundle}: MANIFEST.json is not signed by a trusted network key"]
        )
    problems = check_files(bundle, env)
    if problems:
        raise SpecError(str(bundle), [f"{bundle}: {p}" for p in problems])
    try:
        doc: dict[str, Any] = json.loads((bundle / "benchmark.json").read_text("utf-8"))
    except (OSError, ValueError):
        raise SpecError(str(bundle), [f"{bundle}: benchmark.json unreadable"]) from None
    if doc.get("format") != BENCHMARK_FORMAT:
        raise SpecError(str(bundle), [f"{bundle}: not an outcomebench benchmark"])
    if doc.get("version") != BENCHMARK_VERSION:
        raise SpecError(str(bundle), [
            f"{bundle}: benchmark version {str(doc.get('version'))[:20]}, this site reads "
            f"version {BENCHMARK_VERSION}: ask the network for a bundle made by the current "
            "outcomebench, or update outcomebench here"])
    return doc


@dataclass(frozen=True, slots=True)
class Comparison:
    site_id: str
    instrument: str
    bands: list[dict[str, Any]]
    effect_size: dict[str, Any]
    severity_adjusted: dict[str, Any]
    on_track: pd.DataFrame  # client_row indexes client_ids
    client_ids: tuple[str, ...]
    notes: list[str]


def _value(est: Mapping[str, Any] | None) -> float | None:
    return None if not est or est.get("value") is None else float(est["value"])


def _interval(mean: float, se: float) -> list[float]:
    # Plain floats: numpy scalars would print as np.float64(...) in the report.
    return [round(float(mean - Z95 * se), 4), round(float(mean + Z95 * se), 4)]


def _shown(value: Any) -> str:
    """A value as a reader sees it: numbers to 2 decimals, intervals as 'a to b'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float | np.integer | np.floating):
        x = float(value)
        return str(int(x)) if x.is_integer() and abs(x) >= 10 else f"{x:.2f}"
    if isinstance(value, list | tuple) and len(value) == 2:
        return f"{_shown(value[0])} to {_shown(value[1])}"
    return str(value)


def compare(cfg: SiteConfig, doc: Mapping[str, Any]) -> Comparison:
    ins_id = str(doc["instrument"]["id"])
    study = doc["study"]
    k_max = int(study["max_session"])
    ins = cfg.instruments.get(ins_id)
    if ins is None:
        raise SpecError(
            "benchmark",
            [
                f"the benchmark's instrument {ins_id} is not known at "
                "this site; define it under `instruments:` in site.yaml"
            ],
        )
    intake = read_intake(cfg.data, cfg.instruments)
    episodes = derive_episodes(intake.records, cfg.instruments, k_max).get(ins_id)
    if episodes is None:
        raise SpecError("data", [f"this site has no {ins_id} episodes with two scores"])
    t = episodes.table
    bounds = [(int(b["lo"]), int(b["hi"])) for b in doc["bands"]]
    lo_edges = np.array([b[0] for b in bounds])
    band = np.searchsorted(lo_edges, t["intake"].to_numpy(), side="right") - 1
    notes: list[str] = []

    rows = []
    for i, b in enumerate(doc["bands"]):
        mine = t["change"].to_numpy()[band == i].astype(float)
        n = mine.size
        bench = b["estimates"].get("mean_change", {})
        row: dict[str, Any] = {
            "band": b["band"],
            "episodes": n,
            "observed_mean_change": round(float(mine.mean()), 4) if n else None,
            "observed_ci95": None,
            "expected_mean_change": _value(bench),
            "expected_ci95": bench.get("ci95"),
            "difference": None,
            "benchmark_note": bench.get("suppressed"),
        }
        if n > 1:
            row["observed_ci95"] = _interval(
                float(mine.mean()), float(mine.std(ddof=1)) / math.sqrt(n)
            )
        if row["observed_mean_change"] is not None and row["expected_mean_change"] is not None:
            row["difference"] = round(row["observed_mean_change"] - row["expected_mean_change"], 4)
        rows.append(row)

    ref = doc.get("effect_size_reference_sd")
    ref_sd = _value(ref)
    change = t["change"].to_numpy().astype(float)
    es: dict[str, Any] = {"value": None, "ci95": None, "episodes": int(change.size)}
    if ref_sd and change.size > 1:
        # The clinic's mean change on the benchmark's scale (protocols/effect.py); the
        # interval adds the reference SD's own uncertainty to the clinic's sampling error.
        m, se_m = change.mean(), change.std(ddof=1) / math.sqrt(change.size)
        value = effect_size(float(m), ref_sd)
        se = math.hypot(se_m / ref_sd, value * _se(ref) / ref_sd)
        es = {
            "value": round(value, 4),
            "ci95": _interval(value, se),
            "episodes": int(change.size),
            "reference_sd": ref_sd,
        }
    saes = _severity_adjusted(doc, t, ins, ref if isinstance(ref, Mapping) else None, notes)
    on_track = _on_track(doc, t, band, cfg, k_max, notes)
    return Comparison(
        site_id=cfg.site_id,
        instrument=ins_id,
        bands=rows,
        effect_size=es,
        severity_adjusted=saes,
        on_track=on_track,
        client_ids=intake.records.client_ids,
        notes=notes,
    )


def _se(est: Mapping[str, Any] | None) -> float:
    """A published estimate's whole standard error (sampling and DP noise), 0 if none."""
    if not isinstance(est, Mapping):
        return 0.0
    se = est.get("se")
    return float(se) if isinstance(se, int | float) and math.isfinite(se) else 0.0


def _severity_adjusted(
    doc: Mapping[str, Any], t: pd.DataFrame, ins: Any, ref: Mapping[str, Any] | None,
    notes: list[str]
) -> dict[str, Any]:
    """ACORN: SAES = (reference mean change of clinical-range cases + the clinic's mean
    residual from the benchmark's change-on-intake regression) / reference intake SD,
    over the clinic's clients whose intake is in the clinical range. Its interval adds
    the clinic's sampling error and the benchmark's uncertainty (sampling and DP noise of
    the reference mean change, the regression and the reference SD; intercept and slope
    add without their covariance, which is not published: a bound, so the label errs
    towards "not shown"), and the label is decided with it (protocols/effect.py)."""
    reg = doc.get("regression") or {}
    a, b = _value(reg.get("intercept")), _value(reg.get("slope"))
    ref_sd = _value(ref)
    if a is None or b is None or not ref_sd:
        return {"value": None, "ci95": None, "reason": "the benchmark has no regression"}
    clinical_bands = [x for x in doc["bands"] if is_case(np.array([x["lo"]]), ins)[0]]
    weights = [_value(x["estimates"].get("episodes")) or 0.0 for x in clinical_bands]
    means = [x["estimates"].get("mean_change") for x in clinical_bands]
    pairs = [(w, m) for w, m in zip(weights, means, strict=True)
             if _value(m) is not None and w > 0]
    if not pairs:
        return {"value": None, "ci95": None, "reason": "no clinical-range benchmark bands"}
    total_w = sum(w for w, _ in pairs)
    ref_mean = sum(w * float(_value(m) or 0.0) for w, m in pairs) / total_w
    se_ref_mean = math.sqrt(sum((w * _se(m)) ** 2 for w, m in pairs)) / total_w
    mine = t[t["case_start"]]
    if len(mine) < 2:
        return {"value": None, "ci95": None, "reason": "fewer than 2 clinical-range episodes"}
    x = mine["intake"].to_numpy(float)
    residual = mine["change"].to_numpy(float) - (a + b * x)
    numerator = ref_mean + residual.mean()
    value = effect_size(numerator, ref_sd)
    se_clinic = residual.std(ddof=1) / math.sqrt(residual.size)
    se_line = _se(reg.get("intercept")) + abs(float(x.mean())) * _se(reg.get("slope"))
    se_numerator = math.hypot(se_clinic, se_ref_mean) + se_line
    se = math.hypot(se_numerator / ref_sd, value * _se(ref) / ref_sd)
    notes.append(
        "The severity-adjusted effect size's interval adds this clinic's sampling error "
        "and the benchmark's uncertainty (sampling and privacy noise); its label is "
        "decided with that interval, not the point value."
    )
    return {
        "value": round(float(value), 4),
        "ci95": _interval(float(value), float(se)),
        "episodes": int(residual.size),
        "acorn_label_90pct": acorn_label(float(value), float(se)),
        "reference_mean_change": round(ref_mean, 4),
    }


def _on_track(
    doc: Mapping[str, Any],
    t: pd.DataFrame,
    band: np.ndarray,
    cfg: SiteConfig,
    k_max: int,
    notes: list[str],
) -> pd.DataFrame:
    """Clients still in treatment (last score within the episode gap of the export's
    latest date): not on track when their change is below the benchmark's 95% tolerance
    band at their current session (the failure side)."""
    # Each benchmark row is a review group of sessions first..last (protocols/layout.py).
    expected: dict[tuple[str, int], Mapping[str, Any]] = {
        (str(r["band"]), s): r
        for r in doc.get("trajectory", [])
        for s in range(int(r.get("first", r["session"])), int(r.get("last", r["session"])) + 1)
    }
    names = [str(b["band"]) for b in doc["bands"]]
    last_date = t["last_date"].to_numpy()
    columns = [
        "client_row",
        "band",
        "session",
        "change_so_far",
        "expected_change",
        "tolerance95_low",
        "status",
    ]
    if not len(t) or (last_date == np.iinfo(np.int32).min).any():
        notes.append(
            "The export has no dates: which clients are still in treatment is "
            "unknown, so no on-track flags are given."
        )
        return pd.DataFrame([], columns=columns)
    open_ = (last_date.max() - last_date) <= cfg.data.episode_gap_days
    client, session, change = (t[c].to_numpy() for c in ("client", "last_session", "change"))
    out = []
    for i in np.flatnonzero(open_):
        name = names[band[i]] if 0 <= band[i] < len(names) else None
        k = int(session[i])
        ref = expected.get((name, k)) if name is not None and k <= k_max else None
        tol = ref.get("tolerance95") if ref else None
        status = (
            "no benchmark for this session"
            if tol is None
            else "not on track"
            if change[i] < tol[0]
            else "on track"
        )
        out.append(
            [
                int(client[i]),
                name,
                k,
                int(change[i]),
                _value(ref.get("mean_change")) if ref else None,
                None if tol is None else tol[0],
                status,
            ]
        )
    return pd.DataFrame(out, columns=columns)


def _table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p>None.</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c).replace('_', ' '))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_shown(r[c]))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return (
        f'<div class="wide"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def write_comparison(out: Path, comp: Comparison, doc: Mapping[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    on_track = comp.on_track.copy()
    on_track.insert(0, "client_id", [comp.client_ids[c] for c in on_track["client_row"]])
    on_track = on_track.drop(columns=["client_row"])
    files = {
        "comparison_bands.csv": _csv(comp.bands),
        "on_track.csv": on_track.to_csv(index=False),
        "comparison.html": _html(comp, doc, on_track),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / n for n in files]


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _html(comp: Comparison, doc: Mapping[str, Any], on_track: pd.DataFrame) -> str:
    counts = on_track["status"].value_counts().to_dict() if len(on_track) else {}
    es, saes = comp.effect_size, comp.severity_adjusted
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in comp.notes)
    status_counts = (
        ", ".join(f"{html.escape(str(k))}: {v}" for k, v in counts.items()) + "."
        if counts
        else "None."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Local comparison: {html.escape(comp.site_id)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;
color:#222}}
.local{{background:#fff3cd;border:2px solid #d39e00;padding:.8em;font-weight:bold}}
.wide{{overflow-x:auto;max-width:100%}}
table{{border-collapse:collapse;margin:1em 0;font-size:.92em}}
td,th{{border:1px solid #ccc;padding:.3em .5em;text-align:right}}td{{white-space:nowrap}}
th{{background:#f2f2f2;max-width:9em}}</style></head><body>
<p class="local">{html.escape(LOCAL_ONLY)} This comparison is for the clinic only.</p>
<h1>{html.escape(comp.site_id)}: {html.escape(comp.instrument)} compared with
{html.escape(str(doc["study"]["title"]))}</h1>
<p>Benchmark study {html.escape(str(doc["study"]["id"]))}
({html.escape(str(doc["study_hash"])[:16])}),
{doc["privacy"]["sites"]} services. Change is positive for improvement.</p>
<h2>Observed vs expected change by intake band</h2>{_table_html(comp.bands)}
<h2>Effect sizes</h2>
<p>Effect size (mean change / benchmark intake SD): {_shown(es.get("value"))}
(95% CI {_shown(es.get("ci95"))}), {es.get("episodes")} episodes.</p>
<p>Severity-adjusted effect size (ACORN): {_shown(saes.get("value"))}
(95% CI {_shown(saes.get("ci95"))})
{html.escape(str(saes.get("acorn_label_90pct") or saes.get("reason") or ""))}.</p>
<h2>Clients still in treatment</h2>
<p>{status_counts}
The list with client ids is in on_track.csv.</p>
<ul>{notes}</ul></body></html>
"""
