"""The clinic's comparison against a bundle whose estimates are partly suppressed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from coordinator import crypto as ccrypto
from coordinator.estimates import estimate_all
from coordinator.pooling import Pooled, PooledBlock
from coordinator.publish import benchmark_document, write_bundle
from coordinator.synth import synthesize
from protocols.layout import block_layout
from protocols.study import parse_study
from site_agent.cli import main as site

from .offline import study_doc


def test_compare_with_suppressed_bands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = parse_study(study_doc())
    blocks = {}
    for spec in block_layout(study):
        values = np.zeros((spec.n_bands, spec.width))
        if spec.name in ("episodes", "case_at_intake"):
            values[:, 0] = [5, 400, 300, 0]  # band 0-9 too small, 20-27 empty
        elif spec.name == "sum_change":
            values[:, 0] = [0, 1200, 2100, 0]
        elif spec.name == "sum_change_sq":
            values[:, 0] = [0, 1200 * 3 + 400 * 25, 2100 * 7 + 300 * 25, 0]
        elif spec.name in ("sum_intake", "sum_intake_sq", "sum_intake_change"):
            values[:, 0] = {
                "sum_intake": [20, 4800, 5100, 0],
                "sum_intake_sq": [100, 60000, 90000, 0],
                "sum_intake_change": [0, 14400, 35700, 0],
            }[spec.name]
        elif spec.name == "traj_n":
            values[1:3, :5] = 200
        elif spec.name == "traj_sum":
            values[1, :5] = -200 * np.array([0, 1, 2, 3, 3.5])
            values[2, :5] = -200 * np.array([0, 2, 4, 5, 6])
        elif spec.name == "traj_sum_sq":
            values[1:3, :5] = 200 * 40
        blocks[spec.name] = PooledBlock(
            spec=spec, values=values, noise_var=np.full(values.shape, 4.0)
        )
    doc = benchmark_document(
        Pooled(study=study, contributions=(), blocks=blocks),
        estimate_all(Pooled(study=study, contributions=(), blocks=blocks)),
        [],
    )
    key_private, key_public = ccrypto.generate_keypair(tmp_path / "keys", "network")
    write_bundle(tmp_path / "bundle", doc, ccrypto.load_private(key_private))

    [clinic] = synthesize(1, tmp_path / "sites", seed=5, clients_range=(150, 200))
    policy = {
        "unit": "client_id",
        "per_study": {"rho": 0.1},
        "budget": {"rho": 0.5},
        "allow": {"instruments": ["PHQ-9"], "families": ["counts"]},
        "trusted_coordinator_keys": [str(key_public)],
        "state_dir": "state",
    }
    (clinic.directory / "privacy.yaml").write_text(yaml.safe_dump(policy))
    cfg = yaml.safe_load(clinic.config_path.read_text())
    clinic.config_path.write_text(yaml.safe_dump(cfg | {"privacy_policy": "privacy.yaml"}))

    # The key comes from the policy's trusted_coordinator_keys.
    out = tmp_path / "out"
    assert (
        site(
            [
                "compare",
                "--config",
                str(clinic.config_path),
                "--benchmark",
                str(tmp_path / "bundle"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "comparison_bands.csv").read_text().splitlines()))
    assert [r["band"] for r in rows] == ["0-9", "10-14", "15-19", "20-27"]
    assert rows[0]["expected_mean_change"] == "" and "fewer than" in rows[0]["benchmark_note"]
    assert float(rows[1]["expected_mean_change"]) == 3.0
    assert rows[1]["difference"] != ""
    statuses = {
        r["status"] for r in csv.DictReader((out / "on_track.csv").read_text().splitlines())
    }
    assert statuses <= {"on track", "not on track", "no benchmark for this session"}
    page = (out / "comparison.html").read_text()
    assert "LOCAL ONLY" in page and "np.float64" not in page and 'class="wide"' in page
    assert " to " in page  # intervals read "a to b"

    # A mistyped key is named as such, not as an untrusted signature.
    args = ["compare", "--config", str(clinic.config_path), "--benchmark",
            str(tmp_path / "bundle"), "--out", str(tmp_path / "out2")]
    assert site([*args, "--key", str(tmp_path / "missing.pem")]) == 4
    err = capsys.readouterr().err
    assert "missing.pem: no such key file" in err and "not signed" not in err
    (tmp_path / "garbage.pem").write_text("not a key")
    assert site([*args, "--key", str(tmp_path / "garbage.pem")]) == 4
    assert "not a PEM public key" in capsys.readouterr().err
