"""Small helpers for validating YAML mappings: every problem is collected, none raised early."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

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
