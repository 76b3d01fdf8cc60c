from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from protocols.codes import ErrorCode, exit_code
from protocols.release import parse_envelope
from site_agent import crypto
from site_agent.cli import main
from site_agent.errors import ExitCode

from .privacy_helpers import POLICY, STUDY, make_site


@pytest.fixture
def site(tmp_path: Path) -> tuple[str, str]:
    config = make_site(tmp_path / "clinic", POLICY | {"approval": "manual"})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": STUDY}))
    return str(config), str(study)


def test_manual_flow_through_the_cli(site: tuple[str, str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    config, study = site
    out = tmp_path / "release.json"
    assert main(["preview", "--config", config, "--study", study, "--json"]) == 0
    preview = json.loads(capsys.readouterr().out)
    assert preview["outcome"] == "await approval"

    code = main(["release", "--config", config, "--study", study, "--out", str(out)])
    assert code == exit_code(ErrorCode.PENDING_APPROVAL) == ExitCode.PENDING_APPROVAL
    assert "REFUSED (pending_approval)" in capsys.readouterr().err
    assert not out.exists()

    assert main(["requests", "--config", config, "--json"]) == 0
    [req] = json.loads(capsys.readouterr().out)
    assert main(["approve", req["request_id"], "--config", config]) == 0
    assert "approved" in capsys.readouterr().out
    assert main(["release", "--config", config, "--study", study, "--out", str(out)]) == 0
    assert "signed release of phq9-2026" in capsys.readouterr().out
    env = parse_envelope(out.read_bytes(), "release")
    assert crypto.verify(env)

    assert main(["budget", "--config", config, "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)
    assert float(budget["spent"]["epsilon"]) > 0 and "policy choice" in budget["note"]

    assert main(["audit", "--config", config, "--verify", "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["verified"] is True
    assert [e["kind"] for e in audit["entries"]] == [
        "genesis", "pending", "approved", "reserved", "released"]


def test_deny_unknown_request(site: tuple[str, str]) -> None:
    config, _ = site
    assert main(["deny", "nope", "--config", config]) == ExitCode.USAGE


def test_malformed_study_exit_code(site: tuple[str, str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = site
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: {id: x}\n")
    code = main(["release", "--config", config, "--study", str(bad), "--out",
                 str(tmp_path / "r.json"), "--json"])
    assert code == ExitCode.MALFORMED_STUDY
    doc = json.loads(capsys.readouterr().out)
    assert doc["refused"] == "malformed_study"


def test_site_without_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_site(tmp_path)
    doc = yaml.safe_load(config.read_text())
    del doc["privacy_policy"]
    config.write_text(yaml.safe_dump(doc))
    assert main(["budget", "--config", str(config)]) == ExitCode.CONFIG
    assert "privacy_policy: missing" in capsys.readouterr().err


def test_pubkey(site: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = site
    assert main(["pubkey", "--config", config]) == 0
    assert capsys.readouterr().out.startswith("-----BEGIN PUBLIC KEY-----")
    key_file = Path(config).parent / "state" / crypto.KEY_FILE
    assert key_file.stat().st_mode & 0o077 == 0  # owner-only
