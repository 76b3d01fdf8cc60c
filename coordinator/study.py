"""Study files on the coordinator's side: the YAML draft or a signed study."""

from __future__ import annotations

from pathlib import Path

import yaml

from protocols.errors import SpecError
from protocols.release import parse_envelope
from protocols.study import Study, parse_study, study_from_canonical

__all__ = ["load_study"]


def load_study(path: Path) -> Study:
    """Read ``study.yaml`` (or a signed study JSON); SpecError lists every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"{path}: cannot read ({exc.__class__.__name__})"]) from None
    try:
        doc = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError:
        raise SpecError(str(path), [f"{path}: not valid YAML"]) from None
    if isinstance(doc, dict) and doc.get("format") == "outcomebench.signed-study":
        return study_from_canonical(parse_envelope(text, "study").payload)
    return parse_study(doc, where=str(path))
