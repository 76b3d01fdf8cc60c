"""The offline path end to end: sites release files, the coordinator pools them into a
signed bundle, anyone verifies it, a clinic compares itself with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from coordinator.cli import ExitCode as CExit
from coordinator.cli import main as coordinator
from protocols.study import parse_study
from site_agent.cli import main as site
from site_agent.config import load_site_config
from site_agent.data import read_intake
from site_agent.outcomes import derive_episodes
from site_agent.privacy.statistics import select_episodes

from .offline import make_network, study_doc

pytestmark = pytest.mark.slow


def _release_all(net, out: Path) -> list[Path]:  # type: ignore[no-untyped-def]
    files = []
    for i, config in enumerate(net.sites):
        f = out / f"release-{i}.json"
        assert (
            site(["release", "--config", str(config), "--study", str(net.study), "--out", str(f)])
            == 0
        )
        files.append(f)
    return files


def test_offline_round_publish_verify_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = make_network(tmp_path, 3)
    files = _release_all(net, tmp_path)
    capsys.readouterr()
    bundle = tmp_path / "bundle"
    args = [
        "pool",
        "--study",
        str(net.study),
        "--releases",
        *map(str, files),
        "--keys",
        str(net.keys),
        "--out",
        str(bundle),
        "--json",
    ]
    assert coordinator(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["sites"]) == 3 and summary["missing"] == []
    names = {p.name for p in bundle.iterdir()}
    assert {"benchmark.json", "bands.csv", "report.html", "MANIFEST.json"} <= names
    doc = json.loads((bundle / "benchmark.json").read_text())
    assert doc["privacy"]["sites"] == 3 and doc["study_hash"]
    assert coordinator(["verify", str(bundle), "--key", str(net.network_pub)]) == 0

    # The clinic's local comparison verifies the bundle first.
    out = tmp_path / "compare"
    assert (
        site(
            [
                "compare",
                "--config",
                str(net.sites[0]),
                "--benchmark",
                str(bundle),
                "--out",
                str(out),
                "--key",
                str(net.network_pub),
            ]
        )
        == 0
    )
    html = (out / "comparison.html").read_text()
    assert "LOCAL ONLY" in html and "Severity-adjusted" in html
    assert (out / "on_track.csv").read_text().startswith("client_id,")

    # Any change, addition or removal breaks verification, for both readers.
    tampered = tmp_path / "tampered"
    for change in ("edit", "add", "remove"):
        shutil.rmtree(tampered, ignore_errors=True)
        shutil.copytree(bundle, tampered)
        if change == "edit":
            (tampered / "bands.csv").write_text((bundle / "bands.csv").read_text() + "x\n")
        elif change == "add":
            (tampered / "extra.txt").write_text("hello")
        else:
            (tampered / "report.html").unlink()
        assert (
            coordinator(["verify", str(tampered), "--key", str(net.network_pub)])
            == CExit.VERIFY_FAILED
        )
        assert (
            site(
                [
                    "compare",
                    "--config",
                    str(net.sites[0]),
                    "--benchmark",
                    str(tampered),
                    "--out",
                    str(tmp_path / "c2"),
                    "--key",
                    str(net.network_pub),
                ]
            )
            != 0
        )


def test_pool_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = make_network(tmp_path, 3)
    files = _release_all(net, tmp_path)
    base = ["--study", str(net.study), "--keys", str(net.keys)]
    # a site counted twice
    assert (
        coordinator(
            [
                "pool",
                *base,
                "--releases",
                str(files[0]),
                str(files[0]),
                str(files[1]),
                "--out",
                str(tmp_path / "b1"),
            ]
        )
        == CExit.INPUT_ERROR
    )
    assert "already counted" in capsys.readouterr().err
    # a malformed file
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert (
        coordinator(
            ["pool", *base, "--releases", *map(str, files), str(bad), "--out", str(tmp_path / "b2")]
        )
        == CExit.INPUT_ERROR
    )
    # a release for another study
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({"study": study_doc(id="another")}))
    assert (
        coordinator(
            [
                "pool",
                "--study",
                str(other),
                "--keys",
                str(net.keys),
                "--releases",
                *map(str, files),
                "--out",
                str(tmp_path / "b3"),
            ]
        )
        == CExit.INPUT_ERROR
    )
    assert "not 'another'" in capsys.readouterr().err
    # an unregistered site
    (net.keys / "clinic-03.pub.pem").unlink()
    assert (
        coordinator(["pool", *base, "--releases", *map(str, files), "--out", str(tmp_path / "b4")])
        == CExit.INPUT_ERROR
    )
    assert "not registered" in capsys.readouterr().err
    # below quorum, even when skipping invalid files: nothing published
    assert (
        coordinator(
            [
                "pool",
                *base,
                "--releases",
                *map(str, files),
                "--skip-invalid",
                "--out",
                str(tmp_path / "b5"),
            ]
        )
        == CExit.QUORUM
    )
    assert not (tmp_path / "b5").exists()
    for b in ("b1", "b2", "b3", "b4"):
        assert not (tmp_path / b).exists()


def test_pool_skip_invalid_survives_a_bracket_bomb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # M3: one release of '[' * 100000 + ']' * 100000 made `pool --skip-invalid` exit 1.
    net = make_network(tmp_path, 3)
    files = _release_all(net, tmp_path)
    bomb = tmp_path / "bomb.json"
    bomb.write_text("[" * 100_000 + "]" * 100_000)
    capsys.readouterr()
    bundle = tmp_path / "bundle"
    args = ["pool", "--study", str(net.study), "--keys", str(net.keys), "--releases",
            str(files[0]), str(bomb), *map(str, files[1:]), "--out", str(bundle)]
    assert coordinator([*args, "--skip-invalid", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["sites"]) == 3
    assert summary["missing"] == [
        {"site": str(bomb), "reason": "malformed release: signed release: nested deeper "
                                      "than 16 levels"}
    ]
    doc = json.loads((bundle / "benchmark.json").read_text())
    assert doc["sites"]["missing"] == [{"site": s["site"], "reason": s["reason"]}
                                       for s in summary["missing"]]
    # Without --skip-invalid it is refused as invalid input, with the reason; no traceback.
    assert coordinator([*args[:-1], str(tmp_path / "b2")]) == CExit.INPUT_ERROR
    err = capsys.readouterr().err
    assert "malformed release" in err and "Traceback" not in err


def test_huge_budget_pooled_equals_exact_union(tmp_path: Path) -> None:
    # Allowed only by this test's explicit policy: noise becomes negligible, and the pooled
    # estimates must equal the exact computation on the union of the clinics' data.
    net = make_network(tmp_path, 3, rho=10_000.0)
    files = _release_all(net, tmp_path)
    bundle = tmp_path / "bundle"
    assert (
        coordinator(
            [
                "pool",
                "--study",
                str(net.study),
                "--releases",
                *map(str, files),
                "--keys",
                str(net.keys),
                "--out",
                str(bundle),
            ]
        )
        == 0
    )
    doc = json.loads((bundle / "benchmark.json").read_text())
    study = parse_study(study_doc(privacy={"rho": 10_000.0}))
    changes: dict[int, list[np.ndarray]] = {i: [] for i in range(4)}
    improved: dict[int, list[np.ndarray]] = {i: [] for i in range(4)}
    for config in net.sites:
        cfg = load_site_config(config)
        ep = derive_episodes(read_intake(cfg.data, cfg.instruments).records, cfg.instruments, 20)[
            "PHQ-9"
        ]
        sel = select_episodes(ep, study, 1)
        for i in range(4):
            changes[i].append(sel.table["change"].to_numpy()[sel.band == i])
            improved[i].append(sel.table["reliable"].to_numpy()[sel.band == i] == 1)
    for i, band in enumerate(doc["bands"]):
        exact = np.concatenate(changes[i])
        est = band["estimates"]
        assert est["episodes"]["value"] == pytest.approx(exact.size, abs=1)
        # The residual noise is tiny but not zero: within 5 of its own standard errors.
        tol = max(0.01, 5 * est["mean_change"]["se_noise"])
        assert est["mean_change"]["value"] == pytest.approx(exact.mean(), abs=tol)
        sd_tol = max(0.01 * exact.std(ddof=1), 5 * est["sd_change"]["se_noise"])
        assert est["sd_change"]["value"] == pytest.approx(exact.std(ddof=1), abs=sd_tol)
        rate = np.concatenate(improved[i]).mean()
        rate_tol = max(0.002, 5 * est["reliable_improvement_rate"]["se_noise"])
        assert est["reliable_improvement_rate"]["value"] == pytest.approx(rate, abs=rate_tol)
        # With negligible noise the interval is the sampling interval alone.
        assert est["mean_change"]["se_noise"] < 0.05 * est["mean_change"]["se_sampling"]
