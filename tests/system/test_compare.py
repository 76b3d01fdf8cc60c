"""The clinic's comparison against a bundle whose estimates are partly suppressed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
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
from site_agent.outcomes import MISSING
from site_agent.privacy.statistics import Selection, exact_blocks

from .offline import study_doc


def test_compare_with_suppressed_bands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = parse_study(study_doc())
    # Band 0-9: 5 episodes (too few); 10-14: 400 improving by 3; 15-19: 300 by 7; 20-27: none.
    rows_, traj, band = [], [], []
    for b, (n, intake, change) in enumerate([(5, 5, 0), (400, 12, 3), (300, 17, 7)]):
        for c in range(n):
            final = intake - change
            rows_.append({"intake": intake, "final": final, "change": change,
                          "reliable": int(change >= 6), "case_start": intake >= 10,
                          "recovered": intake >= 10 and final < 10,
                          "reliably_recovered": intake >= 10 and final < 10 and change >= 6,
                          "response": 2 * change >= intake, "remission": final < 10})
            scores = np.full(study.max_session, MISSING, dtype=np.int32)
            if b and c < 200:
                scores[:5] = intake - np.rint(np.linspace(0, change, 5))
            traj.append(scores)
            band.append(b)
    sel = Selection(table=pd.DataFrame(rows_), trajectory=np.array(traj), band=np.array(band),
                    window_applied=True, counts={})
    exact = exact_blocks(sel, study)
    blocks = {
        spec.name: PooledBlock(spec=spec, values=exact[spec.name].reshape(
            spec.n_bands, spec.width).astype(float), noise_var=np.full(
            (spec.n_bands, spec.width), 4.0))
        for spec in block_layout(study)
    }
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
