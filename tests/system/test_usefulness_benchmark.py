"""benchmarks/usefulness.py end to end, small: its JSON is what the redesign is compared by,
so its structure and its scoring must hold.

At a huge epsilon the noise is negligible, so every figure that has an exact value must be
published in every repetition within its tolerance: 100% useful in both arms. Anything
that mis-keys figures between the exact tables and the noisy ones, mis-scores them or loses
a kind of the issue's tolerance table fails it. At epsilon 1 the same small network must be
far from 100% (the noise is scored at all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "usefulness.py"
# The tolerance table, by the kinds the benchmark names them (rates: every *_rate).
KINDS = {
    "bands.episodes",
    "bands.mean_intake",
    "bands.mean_change",
    "bands.sd_change",
    "bands.effect_size",
    "quantiles",
    "trajectory.mean_change",
    "trajectory_fit.a",
    "trajectory_fit.b",
    "regression.intercept",
    "regression.slope",
    "regression.residual_sd",
    "reference_sd",
}


def run(tmp_path: Path, epsilon: str) -> dict[str, Any]:
    out = tmp_path / f"usefulness-{epsilon}.json"
    # This checkout's packages, not whichever the interpreter has installed.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = os.environ | {"PYTHONPATH": path}
    argv = [sys.executable, str(SCRIPT), "--quick", "--reps", "10", "--clinics", "3"]
    done = subprocess.run(
        [*argv, "--epsilon", epsilon, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "targets (issue 9):" in done.stdout
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def check_structure(doc: dict[str, Any]) -> None:
    assert doc["format"] == 1 and doc["benchmark"] == "usefulness"
    assert doc["settings"]["reps"] == 10 and doc["settings"]["clinics"] == [3]
    assert [(r["clinics"], r["arm"]) for r in doc["runs"]] == [(3, "site"), (3, "central")]
    # Targets are at 10, 30 and 100 clinics: not run here, and said so.
    assert len(doc["targets"]) == 4
    assert all(t["met"] is None and t["share"] is None for t in doc["targets"])
    for r in doc["runs"]:
        kinds = set(r["kinds"])
        assert kinds >= KINDS
        assert {k for k in kinds if k.endswith("_rate")} >= {
            "bands.reliable_improvement_rate",
            "bands.recovery_rate",
        }
        figs = r["figures"]
        assert "bands.mean_change [band 10-14]" in figs
        assert "trajectory.mean_change [band 0-9, session 20]" in figs
        assert "quantiles [band 15-19, quantile 0.5]" in figs
        assert r["no_exact_value"] == [k for k, f in figs.items() if f["exact"] is None]
        assert all(f["tolerance"] is not None for f in figs.values() if f["exact"] is not None)
        assert r["counted"] == len(figs) - len(r["no_exact_value"]) > 100
        assert r["useful"] == sum(f["useful"] for f in figs.values())
        assert r["share_useful"] == r["useful"] / r["counted"]
        assert sum(k["figures"] for k in r["kinds"].values()) == r["counted"]


def test_negligible_noise_makes_every_figure_with_an_exact_value_useful(tmp_path: Path) -> None:
    doc = run(tmp_path, "1000000")
    check_structure(doc)
    for r in doc["runs"]:
        missed = {
            k: f for k, f in r["figures"].items() if f["exact"] is not None and not f["useful"]
        }
        assert not missed, (r["arm"], list(missed.items())[:3])
        assert r["share_useful"] == 1.0
        assert all(
            f["published"] == 1.0 and f["rmse"] <= f["tolerance"]
            for f in r["figures"].values()
            if f["exact"] is not None
        )


def test_at_epsilon_1_three_clinics_are_mostly_not_useful(tmp_path: Path) -> None:
    doc = run(tmp_path, "1")
    check_structure(doc)
    site, central = doc["runs"]
    # 1,186 episodes at epsilon 1 per site: the issue measured 1% at 10 clinics.
    assert site["share_useful"] < 0.2 and central["share_useful"] < 0.5
