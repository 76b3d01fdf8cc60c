"""The benchmark bundle: benchmark.json, one CSV per table, report.html and a signed
manifest of every file.

``benchmark.json`` (format ``outcomebench.benchmark``, version 1) holds: the study (its
canonical form and hash), the contributing sites (id, release SHA-256, privacy loss) and
the missing ones with their reasons, the privacy statement, and the tables ``bands``,
``quantiles``, ``trajectory``, ``trajectory_fit``, ``regression``. Every estimate is
``{value, ci95: [lo, hi], se, se_sampling, se_noise, suppressed}``; a suppressed estimate
has ``value: null`` and the reason.

``MANIFEST.json`` is a signed envelope (Ed25519, the network's publication key) whose
payload lists every other file with its SHA-256; :func:`verify_bundle` fails on any
changed, added or missing file.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator import crypto
from coordinator.estimates import (
    MAX_DENOMINATOR_NOISE,
    MIN_EPISODES,
    NOT_ESTIMABLE_FACTOR,
    Tables,
)
from coordinator.pooling import Pooled, Rejection
from coordinator.report import render_report
from protocols.bundle import (
    BENCHMARK_FORMAT,
    BENCHMARK_VERSION,
    MANIFEST,
    check_files,
    read_manifest,
)
from protocols.errors import SpecError
from protocols.layout import LAYOUT_VERSION
from protocols.release import canonical_json

__all__ = ["BENCHMARK_FORMAT", "MANIFEST", "benchmark_document", "verify_bundle", "write_bundle"]


METHODS = (
    "Each site released, under differential privacy, integer sums per intake band with "
    "discrete Gaussian noise from OpenDP (layout version 2): the count, sums of the intake "
    "within its band and of the final score, centred on the middle of their ranges, with "
    "their squares and product; outcome categories, each centred within its own "
    "denominator; the change from intake at review points (sessions 2 to 6, then groups "
    "7-8, 9-12, 13-16, ...); and a histogram of change. Values the band fixes by "
    "definition were not released and are shown as such. The coordinator summed the "
    "releases (post-processing, no further privacy cost) and derived the estimates; "
    "moments over several bands follow exactly by the parallel-axis rule. Every 95% "
    "interval adds two variances: sampling error (first-order formulas that use the "
    "kurtosis of change and of intake where the releases give it, and a "
    "heteroscedasticity-consistent one for the regression) and the DP noise, whose scale "
    "is known exactly from the releases, carried through each estimate by the delta "
    "method. Ratios are suppressed when they rest on fewer "
    f"than {MIN_EPISODES} episodes or when the noise exceeds {MAX_DENOMINATOR_NOISE:.0%} "
    "of the denominator; a figure whose DP noise alone is over "
    f"{NOT_ESTIMABLE_FACTOR:g} times its clinical tolerance is published as not "
    "estimable at this budget; a noisy value outside its range is shown at the nearest "
    "end, with a note. Change is positive for improvement. Effect sizes divide mean "
    "change by the SD of intake over all bands. Rates of reliable improvement, "
    "deterioration, response and remission are per episode; recovery and reliable "
    "recovery are per episode at caseness at intake. Trajectories give the mean change "
    "from intake at each review point (each client at the latest session of the group "
    "it was scored at) with the interval of the mean and a 95% tolerance band for "
    "individual clients. The a + b ln(session) fit is weighted least squares on those "
    "means, each group at the mean ln of its sessions; because the same clients are seen "
    "at many sessions, its intervals bound the sampling error for any nonnegative "
    "correlation between the means (they may be a little wide) and add the independent "
    "DP noise exactly. Intervals are conditional on the participating services. "
    "Coverage was measured in simulation (5 clinics, 3,000 pooled studies, bands of about "
    "300 to 5,100 episodes): 93.7-96.3% for means, SDs, effect sizes, rates, trajectory "
    "means and the regression, 96.6-100% for the quantiles and the trajectory fit. "
    "Whether to publish is decided on the same noisy count, so in bands near "
    "the suppression threshold the published intervals may cover less often."
)


def _estimates(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.as_json() if hasattr(v, "as_json") else v) for k, v in d.items()}


def benchmark_document(
    pooled: Pooled, tables: Tables, missing: Sequence[Rejection], created: dt.datetime | None = None
) -> dict[str, Any]:
    study = pooled.study
    contributions = pooled.contributions
    eps = [c.release.epsilon for c in contributions]
    ins = study.instrument
    return {
        "format": BENCHMARK_FORMAT,
        "version": BENCHMARK_VERSION,
        "layout_version": LAYOUT_VERSION,
        "created": (created or dt.datetime.now(dt.UTC)).replace(microsecond=0).isoformat(),
        "study": study.canonical(),
        "study_hash": study.hash,
        "instrument": {
            "id": ins.id,
            "name": ins.name,
            "range": [ins.lo, ins.hi],
            "better": str(ins.better),
            "cutoff": ins.cutoff,
            "reliable_change": ins.reliable_change,
        },
        "sites": {
            "contributed": [
                {
                    "site_id": c.site_id,
                    "release_sha256": c.sha256,
                    "rho": str(c.release.rho),
                    "epsilon": c.release.epsilon if math.isfinite(c.release.epsilon) else None,
                    "delta": c.release.delta,
                    "max_episodes_per_client": c.release.max_episodes_per_client,
                }
                for c in contributions
            ],
            "missing": [{"site": r.source, "reason": r.reason} for r in missing],
        },
        "privacy": {
            "sites": len(contributions),
            "unit": "client",
            "mechanism": contributions[0].release.mechanism if contributions else None,
            "epsilon_per_site_max": max(eps) if eps and all(map(math.isfinite, eps)) else None,
            "delta_per_site_max": max((c.release.delta for c in contributions), default=None),
            "rho_per_site_max": max((float(c.release.rho) for c in contributions), default=None),
        },
        "effect_size_reference_sd": tables.reference_sd.as_json(),
        "bands": [
            {
                "band": b["band"],
                "lo": b["lo"],
                "hi": b["hi"],
                "estimates": _estimates(b["estimates"]),
            }
            for b in tables.bands
        ],
        "quantiles": tables.quantiles,
        "trajectory": tables.trajectory,
        "trajectory_fit": tables.trajectory_fit,
        "regression": tables.regression,
        "methods": METHODS,
        "software": {"outcomebench": version("outcomebench")},
    }


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(not isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            out[f"{prefix}.{('lo', 'hi')[i] if len(value) == 2 else i}"] = v
    else:
        out[prefix] = value


def _csv(rows: Iterable[Mapping[str, Any]]) -> str:
    flat = []
    for row in rows:
        f: dict[str, Any] = {}
        _flatten("", row, f)
        flat.append(f)
    columns: list[str] = []
    for f in flat:
        columns += [c for c in f if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def tables_csv(doc: Mapping[str, Any]) -> dict[str, str]:
    """One CSV per table of the benchmark document."""
    bands = [{"band": b["band"], **b["estimates"]} for b in doc["bands"]]
    out = {
        "bands.csv": _csv(bands),
        "sites.csv": _csv(
            [{"status": "contributed", **s} for s in doc["sites"]["contributed"]]
            + [{"status": "missing", **s} for s in doc["sites"]["missing"]]
        ),
    }
    for name in ("quantiles", "trajectory", "trajectory_fit"):
        if doc[name]:
            out[f"{name}.csv"] = _csv(doc[name])
    if doc["regression"]:
        out["regression.csv"] = _csv([doc["regression"]])
    return out


def write_bundle(out: Path, doc: Mapping[str, Any], key: Ed25519PrivateKey) -> list[Path]:
    """Write benchmark.json, the CSVs, report.html and the signed manifest into ``out``
    (which must be empty or not exist)."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; publish into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "benchmark.json": json.dumps(doc, indent=1, sort_keys=True) + "\n",
        **tables_csv(doc),
        "report.html": render_report(doc),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    manifest = {
        "format": "outcomebench.manifest",
        "version": 1,
        "study_hash": doc["study_hash"],
        "created": doc["created"],
        "files": {
            name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in sorted(files)
        },
    }
    env = crypto.sign(key, "manifest", canonical_json(manifest))
    (out / MANIFEST).write_text(env.dumps(), encoding="utf-8")
    return [out / n for n in sorted(files)] + [out / MANIFEST]


def verify_bundle(bundle: Path, key: Ed25519PublicKey) -> list[str]:
    """Every problem with the bundle; empty when it is exactly what was signed."""
    try:
        env = read_manifest(bundle)
    except SpecError as exc:
        return list(exc.problems)
    if not crypto.verify_with(env, key):
        return [f"{MANIFEST}: not signed by the given network key (or altered)"]
    return check_files(bundle, env)
