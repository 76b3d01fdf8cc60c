"""Study files on the coordinator's side: the YAML draft or a signed study."""

from __future__ import annotations

from pathlib import Path

from protocols.study import Study, read_study_file

__all__ = ["load_study"]


def load_study(path: Path) -> Study:
    """Read ``study.yaml`` (or a signed study JSON) within the document bounds of
    ``protocols.spec.read_yaml``; SpecError lists every problem."""
    study, _ = read_study_file(path)
    return study
