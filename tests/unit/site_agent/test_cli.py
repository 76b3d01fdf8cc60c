from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from site_agent.cli import _write_atomically, main
from site_agent.errors import EXIT_HELP, ExitCode

from .helpers import HEADER, write_site

GOOD = HEADER + "a,1,2026-01-01,20\na,2,2026-01-08,13\nb,1,2026-01-01,12\nb,2,2026-01-08,11\n"


def test_every_exit_code_has_help() -> None:
    assert set(EXIT_HELP) == set(ExitCode)


def test_summary_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_site(tmp_path, GOOD)
    assert main(["summary", "--config", str(tmp_path / "site.yaml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "never leave the site" in doc["scope"]
    [phq] = doc["instruments"]
    assert phq["instrument"] == "PHQ-9"
    groups = {g["band"]: g for g in phq["groups"]}
    assert set(groups) == {"all", "0-4", "5-9", "10-14", "15-19", "20-27"}
    allg = groups["all"]
    for key in ("episodes", "mean_intake", "mean_change", "sd_change", "effect_size",
                "reliably_improved", "no_reliable_change", "reliably_deteriorated",
                "recovered", "reliably_recovered", "response", "remission"):
        assert key in allg
    assert allg["episodes"] == 2 and allg["mean_change"] == 4.0
    assert allg["reliably_improved"] == 1 and allg["no_reliable_change"] == 1
    assert allg["jacobson_truax"] == {"recovered": 0, "improved": 1, "unchanged": 1,
                                      "deteriorated": 0}
    assert groups["20-27"]["episodes"] == 1 and groups["10-14"]["episodes"] == 1
    # effect size: mean change / SD of intake among episodes at caseness at intake
    assert allg["effect_size"] == pytest.approx(4.0 / 5.656854, abs=1e-3)


def test_check_writes_quarantine_and_strict_refuses(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_site(tmp_path, GOOD + "c,1,2026-01-01,99\n")
    cfg = str(tmp_path / "site.yaml")
    assert main(["check", "--config", cfg, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows_quarantined"] == 1 and not doc["refused"]
    report = (tmp_path / "quarantine.csv").read_text()
    assert "score out of the PHQ-9 range 0-27" in report and ",6," in report
    assert main(["check", "--config", cfg, "--strict"]) == ExitCode.DATA
    assert "REFUSED" in capsys.readouterr().out
    assert main(["summary", "--config", cfg, "--strict"]) == ExitCode.DATA


def test_config_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "site.yaml").write_text("site: {id: a}\ndata: {path: x.csv}\n")
    assert main(["check", "--config", str(tmp_path / "site.yaml")]) == ExitCode.CONFIG
    assert "data.columns: missing" in capsys.readouterr().err


def test_data_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_site(tmp_path, GOOD)
    (tmp_path / "outcomes.csv").unlink()
    assert main(["summary", "--config", str(tmp_path / "site.yaml")]) == ExitCode.DATA
    assert "no such file" in capsys.readouterr().err


def test_no_valid_rows(tmp_path: Path) -> None:
    write_site(tmp_path, HEADER + ",1,2026-01-01,3\n")
    assert main(["check", "--config", str(tmp_path / "site.yaml")]) == ExitCode.DATA


@pytest.mark.parametrize("args", [["--help"], ["check", "--help"], ["summary", "--help"]])
def test_help_everywhere(args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "site_agent", *args], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_text_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_site(tmp_path, GOOD)
    assert main(["summary", "--config", str(tmp_path / "site.yaml")]) == 0
    out = capsys.readouterr().out
    assert "LOCAL ONLY" in out and "PHQ-9" in out and "10-14" in out


def test_summary_trajectory_follows_max_session(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    write_site(tmp_path, GOOD)
    cfg = str(tmp_path / "site.yaml")
    assert main(["summary", "--config", cfg, "--json", "--max-session", "3"]) == 0
    groups = {g["band"]: g for g in json.loads(capsys.readouterr().out)["instruments"][0]["groups"]}
    # a: 20 -> 13, b: 12 -> 11; change from intake is positive for improvement
    assert groups["all"]["trajectory"] == [
        {"session": 1, "clients": 2, "mean_change": 0.0},
        {"session": 2, "clients": 2, "mean_change": 4.0},
        {"session": 3, "clients": 0, "mean_change": None},
    ]
    assert groups["20-27"]["trajectory"][1] == {"session": 2, "clients": 1, "mean_change": 7.0}
    assert main(["summary", "--config", cfg, "--json", "--max-session", "1"]) == 0
    one = json.loads(capsys.readouterr().out)["instruments"][0]["groups"][0]["trajectory"]
    assert [s["session"] for s in one] == [1]
    assert main(["summary", "--config", cfg, "--max-session", "2"]) == 0
    assert "2: 4.0 (n 2)" in capsys.readouterr().out


def test_release_file_written_without_following_planted_links(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "release.json"
    # The name the old code used: a link planted there must not redirect the write.
    (tmp_path / f".release.json.tmp-{os.getpid()}").symlink_to(victim)
    _write_atomically(out, b'{"signed": true}')
    assert out.read_bytes() == b'{"signed": true}' and victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".release.json.tmp-{os.getpid()}", "release.json", "victim.txt"])
    with pytest.raises(OSError):
        _write_atomically(tmp_path / "missing-dir" / "r.json", b"x")


def test_history_lists_every_request_with_cost_and_what_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib  # noqa: PLC0415
    from fractions import Fraction  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from .privacy_helpers import POLICY, STUDY, make_site  # noqa: PLC0415

    config = str(make_site(tmp_path / "clinic", POLICY))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": STUDY}))
    gad = tmp_path / "gad.yaml"
    gad.write_text(yaml.safe_dump({"study": STUDY | {"id": "big", "privacy": {"rho": 0.2}}}))
    out = tmp_path / "r.json"
    assert main(["release", "--config", config, "--study", str(study), "--out", str(out)]) == 0
    assert main(["release", "--config", config, "--study", str(study), "--out", str(out)]) == 0
    assert main(["release", "--config", config, "--study", str(gad), "--out", str(out)]) != 0
    capsys.readouterr()
    assert main(["history", "--config", config, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["decision"] for r in rows] == ["released", "cached", "refused"]
    assert rows[0]["sha256"] == rows[1]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert rows[2]["code"] == "over_study_cap" and rows[2]["sha256"] is None
    assert Fraction(rows[0]["cost_rho"]) > 0 and rows[0]["cost_epsilon"] > 0
    assert Fraction(rows[1]["cost_rho"]) == Fraction(rows[2]["cost_rho"]) == 0
    assert main(["budget", "--config", config, "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)
    assert main(["history", "--config", config]) == 0
    text = capsys.readouterr().out
    assert "released" in text and "over_study_cap" in text and rows[0]["sha256"] in text
    assert budget["spent"]["rho"] is not None


def test_period_report_shows_the_guarantees_the_budget_and_every_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib  # noqa: PLC0415
    import html  # noqa: PLC0415
    import sqlite3  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from .privacy_helpers import POLICY, STUDY, make_site  # noqa: PLC0415

    config = str(make_site(tmp_path / "clinic", POLICY))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": STUDY | {"title": "Spring <b>audit</b>"}}))
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump({"study": STUDY | {"id": "big", "privacy": {"rho": 0.2}}}))
    out, report = tmp_path / "r.json", tmp_path / "report.html"
    for s in (study, study, big):
        main(["release", "--config", config, "--study", str(s), "--out", str(out)])
    capsys.readouterr()
    assert main(["period-report", "--config", config, "--out", str(report), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["period"], doc["requests"], doc["verified"]) == (0, 3, True)
    page = report.read_text()
    assert hashlib.sha256(out.read_bytes()).hexdigest() in page  # what left, twice
    assert page.count(hashlib.sha256(out.read_bytes()).hexdigest()) == 2
    assert "over_study_cap" in page and "Spring &lt;b&gt;audit&lt;/b&gt;" in page
    assert "<b>audit</b>" not in page  # a study's title is data, never markup
    for words in ("Who is protected", "adding or removing all", "starts afresh every 365",
                  "The audit chain verified", "<svg"):
        assert words in html.unescape(page), words
    assert f"&rho; {float(STUDY['privacy']['rho']):.4g}</b>" in page  # spent: one study
    assert "<script" not in page and "http" not in page  # self-contained, nothing fetched

    assert main(["period-report", "--config", config, "--out", str(report),
                 "--period", "1"]) == ExitCode.USAGE
    assert "periods 0 to 0" in capsys.readouterr().err

    # A tampered ledger is reported as such in the report, with the audit exit code.
    db = Path(config).parent / "state" / "ledger.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("UPDATE spends SET period = period - 1")
    assert main(["period-report", "--config", config, "--out", str(report)]) == ExitCode.AUDIT
    assert "did NOT verify" in capsys.readouterr().out
    assert "did NOT verify" in report.read_text()


# -- the local warning when much of the export is quarantined ----------------------------


def _add_bad_rows(config: Path, k: int) -> int:
    """Append ``k`` rows whose score is out of range; returns the export's rows before."""
    data = config.parent / "outcomes.csv"
    lines = data.read_text().splitlines()
    bad = [f"Q-{i:05d},1,2026-01-05,PHQ-9,99,T-001,Room 1" for i in range(k)]
    data.write_text("\n".join([*lines, *bad]) + "\n")
    return len(lines) - 1


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "quarantined" in line]


@pytest.mark.parametrize(
    ("share", "warned"),
    [("just-below", False), ("at-threshold", True), ("two-thirds", True)],
)
def test_preview_release_and_summary_warn_locally_when_many_rows_are_quarantined(
    share: str, warned: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml  # noqa: PLC0415

    from .privacy_helpers import STUDY, make_site  # noqa: PLC0415

    config = make_site(tmp_path / "clinic")
    n = len((config.parent / "outcomes.csv").read_text().splitlines()) - 1
    # QUARANTINE_WARNING_SHARE is 10%: k/(n+k) >= 1/10 exactly when 9k >= n.
    k = {"just-below": (n - 1) // 9, "at-threshold": -(-n // 9), "two-thirds": 2 * n}[share]
    assert _add_bad_rows(config, k) == n
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": STUDY}))
    cfg, out = str(config), tmp_path / "release.json"

    def expect_warning(err: str) -> None:
        notes = _warnings(err)
        if not warned:
            assert notes == []
            return
        [note] = notes
        assert note.startswith("warning: ") and f"{k:,} of {n + k:,} rows" in note
        assert f"({k / (n + k):.0%})" in note
        if share == "two-thirds":
            assert "(67%)" in note  # the case seen in the field
        assert f"`outcomebench-site check --config {cfg}` lists every problem" in note
        assert str(config.parent / "quarantine.csv") in note and "local only" in note

    assert main(["preview", "--config", cfg, "--study", str(study), "--json"]) == ExitCode.OK
    stdout, err = capsys.readouterr()
    assert json.loads(stdout)["outcome"] == "release" and "quarantin" not in stdout
    expect_warning(err)

    assert main(["release", "--config", cfg, "--study", str(study), "--out", str(out),
                 "--json"]) == ExitCode.OK
    stdout, err = capsys.readouterr()
    assert set(json.loads(stdout)) == {"written", "study_id", "study_hash", "sha256"}
    assert b"quarantin" not in out.read_bytes()  # nothing of it leaves the site
    expect_warning(err)

    # The cached release reads nothing, so it warns of nothing.
    assert main(["release", "--config", cfg, "--study", str(study), "--out", str(out)]) == 0
    assert _warnings(capsys.readouterr().err) == []

    assert main(["summary", "--config", cfg, "--json"]) == ExitCode.OK
    stdout, err = capsys.readouterr()
    assert json.loads(stdout)["rows_quarantined"] == k
    expect_warning(err)


# -- control characters in the export never reach the terminal ---------------------------

_ESCAPES = b"\x1b[2J\x1b]0;owned\x07\t\x08\xc2\x9b"  # ends with U+009B, the 8-bit CSI


@pytest.mark.parametrize("where", ["near-miss-header", "extra-header-and-values"])
def test_control_characters_in_the_export_never_reach_the_terminal(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml  # noqa: PLC0415

    from .privacy_helpers import STUDY, make_site  # noqa: PLC0415

    config = make_site(tmp_path / "clinic")
    data = config.parent / "outcomes.csv"
    header, rest = data.read_bytes().split(b"\n", 1)
    if where == "near-miss-header":  # the score column misspelt: the file is refused
        header = header.replace(b"total", b"tot\x1b[2Jal").replace(b"room", b"room" + _ESCAPES)
    else:  # an extra column named with escapes and bytes that are not UTF-8, bad values
        header += b"," + _ESCAPES + b"\xff\xfe"
        rows = [r + b",x" for r in rest.splitlines()]
        rows[0] = rows[0].replace(b",PHQ-9,", b",PHQ" + _ESCAPES + b"-9,")
        rows[1] = rows[1].replace(b",PHQ-9,", b",PHQ-9,1" + _ESCAPES)
        rest = b"\n".join(rows) + b"\n"
    data.write_bytes(header + b"\n" + rest)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": STUDY}))
    cfg = str(config)
    seen = ""
    for argv in (["check"], ["summary"], ["preview", "--study", str(study)],
                 ["release", "--study", str(study), "--out", str(tmp_path / "r.json")]):
        for as_json in ([], ["--json"]):
            main([*argv, "--config", cfg, *as_json])
            out, err = capsys.readouterr()
            raw = {c for c in out + err if not c.isprintable() and c != "\n"}
            assert not raw, (argv, as_json, raw, err)
            seen += out + err
    # ... and the operator still sees what is wrong, escaped.
    if where == "near-miss-header":
        assert "did you mean 'tot\\x1b[2Jal'" in seen and "room\\x1b[2J\\x1b]0;owned\\x07" in seen
    else:
        assert "unknown instrument 'PHQ\\x1b[2J" in seen
