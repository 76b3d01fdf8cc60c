from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

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


def test_malformed_release_is_audited_without_its_text(
    site: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = site
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: {id: x, title: SECRET-CLIENT-NAME, families: 7}\n")
    code = main(["release", "--config", config, "--study", str(bad), "--out",
                 str(tmp_path / "r.json")])
    assert code == ExitCode.MALFORMED_STUDY
    capsys.readouterr()
    assert main(["audit", "--config", config, "--verify", "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    [entry] = [e for e in audit["entries"] if e["kind"] == "refused"]
    assert entry["body"]["code"] == "malformed_study" and entry["body"]["channel"] == "cli"
    assert entry["body"]["bytes"] == len(bad.read_bytes())
    assert "SECRET" not in json.dumps(audit)


def test_pubkey_initialises_a_fresh_site_and_never_replaces_a_key(
    site: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = site
    state = Path(config).parent / "state"
    assert main(["pubkey", "--config", config]) == 0
    first = capsys.readouterr().out
    assert (state / "ledger.sqlite").exists() and (state.parent / "state.anchor.json").exists()
    (state / crypto.KEY_FILE).unlink()
    assert main(["pubkey", "--config", config]) == ExitCode.AUDIT
    err = capsys.readouterr().err
    assert "signing key is missing. Restore it from backup" in err
    assert not (state / crypto.KEY_FILE).exists() and first


def test_anchor_policy_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_site(tmp_path / "clinic", POLICY | {"anchor": "officer/anchor.json"})
    assert main(["budget", "--config", str(config)]) == 0
    assert (config.parent / "officer" / "anchor.json").exists()
    assert not (config.parent / "state.anchor.json").exists()
    (config.parent / "privacy.yaml").write_text(yaml.safe_dump(POLICY | {"anchor": 3}))
    assert main(["budget", "--config", str(config)]) == ExitCode.CONFIG
    assert "privacy.anchor: expected a file path" in capsys.readouterr().err


_RELEASE_WHEN_GO = """
import sys, time
from pathlib import Path
from site_agent.cli import main
cfg, study, out, go = sys.argv[1:5]
Path(out + ".ready").touch()
while not Path(go).exists():
    time.sleep(0.001)
sys.exit(main(["release", "--config", cfg, "--study", study, "--out", out]))
"""


@pytest.mark.slow
def test_8_processes_releasing_the_same_study_are_charged_once(tmp_path: Path) -> None:
    config = make_site(tmp_path / "clinic")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": STUDY}))
    go = tmp_path / "go"
    outs = [tmp_path / f"r{i}.json" for i in range(8)]
    procs = [subprocess.Popen([sys.executable, "-c", _RELEASE_WHEN_GO, str(config), str(study),
                               str(out), str(go)]) for out in outs]
    try:
        deadline = time.monotonic() + 180
        while not all(Path(f"{o}.ready").exists() for o in outs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        go.touch()
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert codes == [0] * 8
    assert len({o.read_bytes() for o in outs}) == 1
    audit = _audit_kinds(config)
    assert (audit.count("reserved"), audit.count("released"), audit.count("cached")) == (1, 1, 7)


def _audit_kinds(config: Path) -> list[str]:
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["audit", "--config", str(config), "--verify", "--json"]) == 0
    return [e["kind"] for e in json.loads(buf.getvalue())["entries"]]


# -- an unusable state dir is the ledger's own error, with the path and the fix ----------


def _with_history(tmp: Path) -> tuple[Path, Path, Path]:
    """A site that released one study: (site.yaml, state dir, study.yaml)."""
    config = make_site(tmp / "clinic")
    study = tmp / "study.yaml"
    study.write_text(yaml.safe_dump({"study": STUDY}))
    assert main(["release", "--config", str(config), "--study", str(study), "--out",
                 str(tmp / "first.json")]) == 0
    return config, config.parent / "state", study


def _state_dir_is_a_file(state: Path) -> None:
    shutil.rmtree(state)
    state.write_text("not a directory")


def _garbage_ledger(state: Path) -> None:
    (state / "ledger.sqlite").write_bytes(random.Random(7).randbytes(20_000))


def _ledger_is_a_directory(state: Path) -> None:
    (state / "ledger.sqlite").unlink()
    (state / "ledger.sqlite").mkdir()


def _damage_table(state: Path, table: str) -> None:
    """Overwrite ``table``'s root page with garbage, as a bad disk block would."""
    db = state / "ledger.sqlite"
    with closing(sqlite3.connect(db)) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = c.execute("PRAGMA page_size").fetchone()[0]
        [root] = c.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    with db.open("r+b") as fh:
        fh.seek((root - 1) * page)
        fh.write(b"\xff" * page)


_EVERY_LEDGER_COMMAND = ("preview", "release", "budget", "requests", "history", "approve",
                         "deny", "audit", "audit --verify", "pubkey")
# What each breakage does, the words that say so, and the commands it breaks.
BREAKAGES: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    "state-dir-is-a-file": (_state_dir_is_a_file, "state_dir is not a directory",
                            _EVERY_LEDGER_COMMAND),
    "ledger-is-garbage": (_garbage_ledger, "not a SQLite database", _EVERY_LEDGER_COMMAND),
    "ledger-is-a-directory": (_ledger_is_a_directory, "is a directory, not the ledger",
                              _EVERY_LEDGER_COMMAND),
    "audit-table-damaged": (lambda s: _damage_table(s, "audit"), "damaged",
                            _EVERY_LEDGER_COMMAND),
    # Opening reads no request; only what lists them meets the damage.
    "requests-table-damaged": (lambda s: _damage_table(s, "requests"), "damaged",
                               ("requests", "history", "audit --verify")),
}


def _run(command: str, config: Path, tmp: Path, study: Path) -> list[str]:
    words = command.split()
    extra = {
        "preview": ["--study", str(study)],
        "release": ["--study", str(study), "--out", str(tmp / "again.json")],
        "approve": ["some-request"],
        "deny": ["some-request"],
    }.get(words[0], [])
    return [words[0], "--config", str(config), *words[1:], *extra]


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_an_unusable_state_dir_is_a_ledger_error_naming_the_path_and_the_fix(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, state, study = _with_history(tmp_path)
    breakage, words, broken = BREAKAGES[name]
    breakage(state)
    capsys.readouterr()
    for command in _EVERY_LEDGER_COMMAND:
        code = main(_run(command, config, tmp_path, study))
        out, err = capsys.readouterr()
        assert "internal error" not in err and "this is a bug" not in err, (command, err)
        if command not in broken:
            continue
        assert code == ExitCode.AUDIT, (command, code, out, err)
        if command == "audit --verify" and "ledger unusable" not in err:
            assert "audit chain: BROKEN" in out and words in out, (command, out)
            continue
        assert "ledger unusable: " in err and words in err, (command, err)
        assert str(state) in err, (command, err)  # names the path
        assert command != "release" or not (tmp_path / "again.json").exists()
    # serve does not start on it, and says why (same error, same exit code)
    if "budget" in broken:
        sock = tmp_path / "run" / "agent.sock"
        proc = subprocess.run([sys.executable, "-m", "site_agent", "serve", "--config",
                               str(config), "--socket", str(sock)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == ExitCode.AUDIT, proc.stderr
        assert "ledger unusable: " in proc.stderr and words in proc.stderr
        assert not sock.exists()


def test_a_state_dir_the_agent_may_not_write_is_permission_denied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the kernel answers for a state dir owned by another user, or on a read-only
    mount (EACCES), simulated so that the test also runs as root."""
    config, state, study = _with_history(tmp_path)
    real_open = os.open

    def denied(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if state in Path(path).parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    capsys.readouterr()
    for command in ("budget", "release", "preview", "history"):
        assert main(_run(command, config, tmp_path, study)) == ExitCode.AUDIT, command
        err = capsys.readouterr().err
        assert f"ledger unusable: {state / 'ledger.lock'}: permission denied" in err, err
        assert "not writable by the agent's user" in err and "chown -R" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the simulated "
                    "EACCES test above covers the message")
def test_a_read_only_state_dir_is_permission_denied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, state, study = _with_history(tmp_path)
    modes = {p: p.stat().st_mode for p in [state, *state.iterdir()]}
    for p in modes:
        p.chmod(0o500 if p.is_dir() else 0o400)
    try:
        capsys.readouterr()
        for command in ("budget", "release", "pubkey"):
            assert main(_run(command, config, tmp_path, study)) == ExitCode.AUDIT, command
            err = capsys.readouterr().err
            assert "ledger unusable: " in err and "permission denied" in err, err
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_preview_shows_the_noise_beside_the_clinics_own_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Local only: the exact episode count per band next to the +/- the release would add
    to its count, mean change and a rate; 'noise larger than the data' where it is."""
    from site_agent.config import load_site_config  # noqa: PLC0415
    from site_agent.data import read_intake  # noqa: PLC0415
    from site_agent.outcomes import derive_episodes  # noqa: PLC0415
    from site_agent.privacy.statistics import select_episodes  # noqa: PLC0415

    from .privacy_helpers import request  # noqa: PLC0415

    config = make_site(tmp_path / "clinic", POLICY)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": STUDY}))
    assert main(["preview", "--config", str(config), "--study", str(study), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["local_only"]["bands"]
    cfg = load_site_config(config)
    ep = derive_episodes(read_intake(cfg.data, cfg.instruments).records, cfg.instruments,
                         20)["PHQ-9"]
    sel = select_episodes(ep, request().study, 1)
    assert [r["episodes_here"] for r in rows] == [int((sel.band == i).sum()) for i in range(4)]
    # A clinic of 60-90 clients at rho 0.05: the noise swamps its own figures.
    assert all(r["noise_larger_than_the_data"] for r in rows)
    assert all(r["count_plus_minus"] > 0 for r in rows)
    assert main(["preview", "--config", str(config), "--study", str(study)]) == 0
    assert "LOCAL ONLY" in capsys.readouterr().out
    # Negative control: the same clinic at a very large rho is not flagged.
    big = POLICY | {"per_study": {"rho": 50}, "budget": {"rho": 100, "period_days": 365}}
    config = make_site(tmp_path / "big", big)
    study.write_text(yaml.safe_dump({"study": STUDY | {"privacy": {"rho": 50}}}))
    assert main(["preview", "--config", str(config), "--study", str(study), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["local_only"]["bands"]
    assert not any(r["noise_larger_than_the_data"] for r in rows if r["episodes_here"] >= 5)
