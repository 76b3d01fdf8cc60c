"""Study files on the coordinator's side: the YAML draft or a signed study."""

from __future__ import annotations

from pathlib import Path

from protocols.release import parse_envelope
from protocols.spec import read_yaml
from protocols.study import Study, parse_study, study_from_canonical

__all__ = ["load_study"]


def load_study(path: Path) -> Study:
    """Read ``study.yaml`` (or a signed study JSON); SpecError lists every problem."""
    text, doc = read_yaml(path, missing="pass --study PATH/TO/study.yaml")  # JSON is YAML
    if isinstance(doc, dict) and doc.get("format") == "outcomebench.signed-study":
        return study_from_canonical(parse_envelope(text, "study").payload)
    return parse_study(doc, where=str(path))
