"""The same study on Flower's simulation engine (Ray), with a handful of virtual nodes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from coordinator.demo import run_simulation

pytestmark = pytest.mark.slow


def test_simulation_engine_round(tmp_path: Path) -> None:
    pytest.importorskip(
        "ray", reason="install the simulation extra: pip install -e '.[simulation]'"
    )
    log = io.StringIO()
    result = run_simulation(tmp_path, n_sites=4, seed=3, timeout=300, log=log)
    assert result.outcome.status == "finished:completed"
    # What the demo prints for its user: each path it names exists.
    assert result.network_key.is_file() and result.study.is_file()
    assert any(result.sites.glob("*/site.yaml")) and result.logs.is_dir()
    doc = json.loads((result.bundle / "benchmark.json").read_text())
    assert doc["privacy"]["sites"] == 4
    assert "stopped every process" in log.getvalue()
