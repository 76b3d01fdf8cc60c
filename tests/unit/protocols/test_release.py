"""The release codec is bounded and raises one error type, whatever it is given."""

from __future__ import annotations

import contextlib
import json
import time
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.errors import SpecError
from protocols.release import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MalformedDocument,
    NoisyBlock,
    SiteRelease,
    canonical_json,
    load_json,
    parse_envelope,
)

RELEASE = SiteRelease(
    study_id="s",
    study_hash="ab" * 32,
    site_id="clinic-a",
    created="2026-05-01T12:00:00+00:00",
    blocks=(
        NoisyBlock(
            name="episodes",
            family="counts",
            n_bands=2,
            width=1,
            values=(3, -2),
            lo=0,
            hi=1,
            sensitivity=1.0,
            scale=2.5,
            rho=Fraction(2, 25),
        ),
    ),
    rho=Fraction(2, 25),
    epsilon=1.0,
    delta=1e-6,
    unit="client",
    max_episodes_per_client=1,
    mechanism="discrete Gaussian",
    window_applied=False,
    versions={"outcomebench": "0.1.0"},
)


def test_round_trip() -> None:
    assert SiteRelease.from_json(load_json(RELEASE.canonical_bytes(), "r")) == RELEASE
    assert MalformedDocument.__mro__[1] is SpecError  # callers that catch SpecError still do


def test_a_release_of_the_old_layout_is_refused_with_the_fix() -> None:
    doc = json.loads(RELEASE.canonical_bytes()) | {"version": 1}
    with pytest.raises(MalformedDocument, match=r"format version 1, .*update outcomebench"):
        SiteRelease.from_json(doc)
    assert json.loads(RELEASE.canonical_bytes())["version"] == 2


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # M3: the bracket bomb
        "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
        '{"a":' * 5000 + "1" + "}" * 5000,
        "1" * 25,  # an integer literal beyond int64's digits
        "[NaN]",
        "[Infinity]",
        "\ud800",  # a lone surrogate
        "",
    ],
)
def test_load_json_refuses_with_one_error_type(text: str) -> None:
    with pytest.raises(MalformedDocument) as info:
        load_json(text, "release")
    assert len(info.value.problems) == 1 and len(info.value.problems[0]) <= 160


def test_size_is_checked_before_parsing() -> None:
    huge = b"[" + b"1," * (MAX_DOCUMENT_BYTES // 2) + b"1]"
    start = time.monotonic()
    with pytest.raises(MalformedDocument, match="larger than"):
        load_json(huge, "release")
    assert time.monotonic() - start < 0.5


def test_depth_limit_is_exact() -> None:
    assert load_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x") is not None


def _doc() -> dict[str, Any]:
    return json.loads(RELEASE.canonical_bytes())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("blocks", 0, "values", 0), 2**63),
        (("blocks", 0, "values", 0), -(2**63)),
        (("blocks", 0, "values", 1), 0.5),
        (("blocks", 0, "values", 1), None),
        (("blocks", 0, "values"), [1]),
        (("blocks", 0, "n_bands"), True),
        (("blocks", 0, "lo"), 2),  # lo > hi
        (("blocks", 0, "scale"), -1.0),
        (("blocks", 0, "sensitivity"), "1"),
        (("blocks", 0, "rho"), "1e-1000000"),  # would take minutes as a Fraction
        (("blocks", 0, "rho"), "0"),
        (("blocks", 0, "rho"), "1/0"),
        (("blocks", 0, "rho"), 0.08),
        (("blocks", 0, "name"), "x" * 257),
        (("blocks",), []),
        (("blocks",), [{}] * 65),
        (("privacy", "max_episodes_per_client"), 0),
        (("privacy", "max_episodes_per_client"), 11),
        (("privacy", "epsilon"), "inf"),
        (("window_applied",), 1),
        (("versions",), {"x" * 300: "1"}),
        (("versions",), {"a": 1}),
        (("site_id",), ""),
        (("format",), "outcomebench.study"),
        (("version",), 3),
    ],
)
def test_fields_are_type_and_range_checked(path: tuple[str | int, ...], value: Any) -> None:
    doc = _doc()
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(MalformedDocument):
        SiteRelease.from_json(doc)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), JSON), min_size=1, max_size=3))
def test_mutated_releases_parse_or_raise_malformed(edits: list[tuple[int, Any]]) -> None:
    doc = _doc()
    for pick, value in edits:
        # Replace one node anywhere in the document (chosen by index in a walk).
        nodes: list[tuple[Any, Any]] = []
        stack: list[Any] = [doc]
        while stack:
            node = stack.pop()
            keys = range(len(node)) if isinstance(node, list) else list(node)
            for k in keys:
                nodes.append((node, k))
                if isinstance(node[k], dict | list):
                    stack.append(node[k])
        parent, key = nodes[pick % len(nodes)]
        parent[key] = value
    with contextlib.suppress(MalformedDocument):
        SiteRelease.from_json(doc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_envelope_of_anything_raises_only_malformed(data: bytes) -> None:
    for text in (
        data,
        b'{"format":"outcomebench.signed-release","version":1,"payload":'
        + data
        + b',"signature":{"alg":"ed25519","public_key":"","value":""}}',
    ):
        with contextlib.suppress(MalformedDocument):
            parse_envelope(text, "release")


def test_envelope_keys_have_their_sizes() -> None:
    doc = {
        "format": "outcomebench.signed-release",
        "version": 1,
        "payload": {},
        "signature": {"alg": "ed25519", "public_key": "AAAA", "value": "AAAA"},
    }
    with pytest.raises(MalformedDocument, match="32 bytes"):
        parse_envelope(canonical_json(doc), "release")
