"""Errors raised while reading values that cross a boundary (YAML specs, files).

    ValueError
    └── SpecError          a specification (instrument, site config, study) is invalid;
                           carries every problem found, each naming the field and the fix.

Error *codes* that may cross the wire live beside the study types (later issues); an
exception's text never leaves a site.
"""

from __future__ import annotations

__all__ = ["SpecError"]


class SpecError(ValueError):
    """A specification is invalid. ``problems`` lists every problem, not just the first."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{where}: {len(self.problems)} problem(s):\n{lines}")
