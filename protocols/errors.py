"""Errors raised while reading values that cross a boundary (YAML specs, files).

    ValueError
    └── SpecError          a specification (instrument, site config, study) is invalid;
                           carries every problem found, each naming the field and the fix.

Error *codes* that may cross the wire live beside the study types (later issues); an
exception's text never leaves a site. It does reach the site's terminals and logs, and it
quotes what it was given (a header, a key, a value), so :func:`printable` escapes every
control character when the message is built: an export or a study can never send escape
sequences to an operator's terminal.
"""

from __future__ import annotations

__all__ = ["SpecError", "printable"]


def printable(text: str) -> str:
    """``text`` with every non-printable character (controls such as ESC, BEL, CR, TAB,
    and line or paragraph separators) written as its Python escape, e.g. ``\\x1b``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class SpecError(ValueError):
    """A specification is invalid. ``problems`` lists every problem, not just the first."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = printable(where)
        self.problems = tuple(printable(p) for p in problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.where}: {len(self.problems)} problem(s):\n{lines}")
