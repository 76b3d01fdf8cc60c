"""The coordinator reads study files as the research network writes them, and says what
is wrong with one that it cannot read."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coordinator.study import load_study
from protocols import SpecError

STUDY = {
    "id": "phq9-2026",
    "title": "PHQ-9 expected change",
    "instrument": "PHQ-9",
    "window": {"start": "2026-01-01", "end": "2026-12-31"},
    "bands": [[0, 9], [10, 27]],
    "families": ["counts", "change"],
    "max_session": 10,
    "privacy": {"rho": 0.05},
    "min_sites": 3,
}


def test_a_yaml_study_loads(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": STUDY}))
    assert load_study(path).id == "phq9-2026"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file; pass --study PATH/TO/study.yaml"),
        (
            b"study:\n  id: [x\n",
            "not valid YAML at line 3, column 1; check indentation and quoting",
        ),
        (b"\xff\xfe", "cannot read the file (UnicodeDecodeError)"),
    ],
)
def test_an_unreadable_study_names_the_file_and_the_fix(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "study.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        load_study(path)
    (problem,) = info.value.problems
    assert problem == f"{path}: {expected}"
