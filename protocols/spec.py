"""Small helpers for validating YAML mappings: every problem is collected, none raised early.

Every YAML or JSON document read here may be hostile (a study comes from the network), so
it is bounded before any work that grows with it: at most ``MAX_DOCUMENT_BYTES`` are
read, no alias (``*name``, the billion-laughs bomb) and no nesting deeper than
``MAX_DEPTH`` is accepted, a key given twice is an error rather than "the last wins",
and a value is quoted in a problem message only through :func:`short`.
"""

from __future__ import annotations

import difflib
import math
import reprlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from protocols.errors import SpecError
from protocols.limits import MAX_DEPTH, MAX_DOCUMENT_BYTES

__all__ = [
    "as_number",
    "did_you_mean",
    "load_yaml",
    "nested_deeper_than",
    "read_yaml",
    "short",
    "unknown_keys",
]

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, truncated to ``limit`` characters: a problem message never quotes
    more of what it was given, however large or deeply nested (reprlib looks at only the
    first few items of the first few levels)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(word[:100], list(choices), n=1, cutoff=0.6)
    return f" (did you mean {short(str(close[0]))}?)" if close else ""


def unknown_keys(mapping: Mapping[str, Any], allowed: Iterable[str], where: str) -> list[str]:
    """One problem per key of ``mapping`` that is not in ``allowed``, with a did-you-mean."""
    allowed = sorted(allowed)
    return [
        f"{where}: unknown key {short(str(key))}{did_you_mean(str(key), allowed)}; "
        f"allowed keys: {', '.join(allowed)}"
        for key in mapping
        if key not in allowed
    ]


def as_number(value: Any, where: str, problems: list[str]) -> float | None:
    """``value`` as a finite float, or None after recording a problem (bool is not a
    number; neither are .nan, .inf or an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{where}: expected a number, got {short(value)}")
        return None
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        problems.append(f"{where}: expected a finite number, got {short(value)}")
        return None
    return number


def nested_deeper_than(doc: Any, limit: int) -> bool:
    """True when lists or mappings in ``doc`` nest more than ``limit`` levels (iterative,
    so a hostile document cannot exhaust the stack here)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class _Bounded(yaml.YAMLError):
    """A document refused by a bound of ours; ``problem`` is safe to show, ``problem_mark``
    is where (a PyYAML or libyaml mark, or None)."""

    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


_MERGE = "tag:yaml.org,2002:merge"
_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[misc, valid-type]
    """The safe loader (libyaml's when available) refusing a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # unhashable: the base class says so
                    continue
                if first is not key_node.start_mark:
                    raise _Bounded(
                        f"key {short(key)} is given twice (first at line {first.line + 1}); "
                        "keep one",
                        key_node.start_mark,
                    )
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _check_events(text: str) -> None:
    """Refuse aliases and deep nesting from the event stream, before anything is built
    (the parser is not recursive; composing and constructing are)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            raise _Bounded(
                "aliases (*name) are not accepted; write the value out in full", event.start_mark
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Bounded(
                    f"lists and mappings nest more than {MAX_DEPTH} levels deep", event.start_mark
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_yaml(text: str) -> Any:
    """Parse one YAML (or JSON) document within the bounds above; ``yaml.YAMLError``
    (with a line) when it is invalid or exceeds one."""
    _check_events(text)
    try:
        return yaml.load(text, Loader=_Loader)
    except (ValueError, OverflowError, RecursionError) as exc:
        # e.g. an integer of more digits than Python converts: not a YAML error to PyYAML
        raise _Bounded(f"a value cannot be read ({exc.__class__.__name__})") from None


def read_yaml(
    path: Path,
    *,
    missing: str,
    error: type[SpecError] = SpecError,
    max_bytes: int = MAX_DOCUMENT_BYTES,
) -> tuple[str, Any]:
    """The text of a YAML (or JSON) file and its parsed document. ``error`` names the file
    and how to fix it: ``missing`` says what to do when there is no such file; a syntax
    error gives its line and column; a file over ``max_bytes``, an alias, deep nesting or
    a duplicate key is refused (see the module docstring)."""
    where = str(path)
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise error(
                where, [f"{where}: larger than {max_bytes} bytes; this cannot be a valid file"]
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise error(where, [f"{where}: no such file; {missing}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(where, [f"{where}: cannot read the file ({exc.__class__.__name__})"]) from None
    try:
        return text, load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if isinstance(exc, _Bounded):
            problem = f"{where}{at}: {exc.problem}"
        else:
            problem = f"{where}: not valid YAML{at}; check indentation and quoting"
        raise error(where, [problem]) from None
