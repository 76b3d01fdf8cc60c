"""Small helpers for validating YAML mappings: every problem is collected, none raised early."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from protocols.errors import SpecError

__all__ = ["as_number", "did_you_mean", "unknown_keys"]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_keys(mapping: Mapping[str, Any], allowed: Iterable[str], where: str) -> list[str]:
    """One problem per key of ``mapping`` that is not in ``allowed``, with a did-you-mean."""
    allowed = sorted(allowed)
    return [
        f"{where}: unknown key '{key}'{did_you_mean(str(key), allowed)}; "
        f"allowed keys: {', '.join(allowed)}"
        for key in mapping
        if key not in allowed
    ]


def as_number(value: Any, where: str, problems: list[str]) -> float | None:
    """``value`` as a float, or None after recording a problem (bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{where}: expected a number, got {value!r}")
        return None
    return float(value)


def read_yaml(
    path: Path, *, missing: str, error: type[SpecError] = SpecError
) -> tuple[str, Any]:
    """The text of a YAML (or JSON) file and its parsed document. ``error`` names the file
    and how to fix it: ``missing`` says what to do when there is no such file; a syntax
    error gives its line and column."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(where, [f"{where}: no such file; {missing}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(where, [f"{where}: cannot read the file ({exc.__class__.__name__})"]) from None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = f"{where}: not valid YAML{at}; check indentation and quoting"
        raise error(where, [problem]) from None
