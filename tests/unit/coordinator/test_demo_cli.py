"""The demo command's edges: it never silently deletes an earlier demo, and Ctrl-C ends it
with a message and exit 130, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import demo
from coordinator.cli import _DEMO_MARKER, ExitCode, main


def test_an_earlier_demo_is_kept_unless_replace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / _DEMO_MARKER).write_text("x")
    (out / "bundle").mkdir()
    assert main(["demo", "--out", str(out)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "holds an earlier demo" in err and "--replace" in err
    assert (out / "bundle").is_dir()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert main(["demo", "--out", str(out), "--replace"]) == ExitCode.INTERRUPTED == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "bundle").exists() and (out / _DEMO_MARKER).is_file()


def test_a_foreign_directory_is_never_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["demo", "--out", str(tmp_path), "--replace"]) == ExitCode.USAGE
    assert "not a demo directory" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"
