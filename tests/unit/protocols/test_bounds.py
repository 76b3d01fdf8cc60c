"""Untrusted documents are bounded before any work that grows with them (issue 8): the
size of a file and of a wire study, YAML aliases, nesting, duplicate keys, number lengths
and exponents, field lengths, inline ranges and the number of values a release holds.
Every one is a SpecError naming the field, never another exception."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import SpecError
from protocols import site_agent_pb2 as pb
from protocols.instruments import builtin_instruments
from protocols.layout import CATEGORY_NAMES, block_layout, release_values
from protocols.limits import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_RELEASE_VALUES,
    MAX_STUDY_WIRE_BYTES,
)
from protocols.release import NoisyBlock, SiteRelease
from protocols.spec import load_yaml, read_yaml, short
from protocols.study import (
    MAX_BANDS,
    MAX_ID_CHARS,
    MAX_SCORE,
    MAX_TITLE_CHARS,
    Family,
    parse_loss,
    parse_study,
    read_study_file,
    study_from_canonical,
)

STUDY: dict[str, Any] = {
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

INLINE = {"range": [0, 27], "better": "lower", "reliable_change": 6, "cutoff": 10}


def _problems(doc: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        parse_study(doc)
    return "\n".join(info.value.problems)


def _inline(**definition: Any) -> dict[str, Any]:
    lo, hi = definition.get("range", INLINE["range"])
    return STUDY | {
        "instrument": {"id": "X", "definition": INLINE | definition},
        "bands": [[lo, hi]],
    }


# -- H1: privacy losses are bounded decimals, checked on the text ------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1e-1000000", "out of range"),  # an exact Fraction of it took 50 s of CPU
        ("1e1000000", "out of range"),
        (1e200, "out of range"),
        (float("inf"), "finite"),
        (float("nan"), "finite"),
        ("Infinity", "finite"),
        ("NaN", "finite"),
        ("0." + "1" * 60, "at most 40 characters"),
        (10**400, "at most 40 characters"),
        ("12abc", "expected a number"),
    ],
)
def test_a_privacy_loss_is_a_bounded_finite_decimal(value: Any, expected: str) -> None:
    tracemalloc.start()
    try:
        for spec, field in (
            ({"rho": value}, "privacy.rho"),
            ({"epsilon": value, "delta": 1e-6}, "privacy.epsilon"),
            ({"epsilon": 1, "delta": value}, "privacy.delta"),
        ):
            problems: list[str] = []
            assert parse_loss(spec, "privacy", problems) is None
            assert len(problems) == 1 and problems[0].startswith(f"{field}: ")
            assert expected in problems[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_the_bounds_keep_every_meaningful_loss() -> None:
    for text, exact in (("0.05", Fraction(1, 20)), ("1e-30", Fraction(1, 10**30)),
                        ("1e30", Fraction(10**30)), ("1000000000000", Fraction(10**12))):
        problems: list[str] = []
        req = parse_loss({"rho": text}, "privacy", problems)
        assert problems == [] and req is not None and req.rho == exact


def test_study_losses_out_of_range_name_the_field() -> None:
    assert "study.privacy.rho: expected a finite number, got inf" in _problems(
        STUDY | {"privacy": {"rho": float("inf")}}
    )
    assert "study.privacy.epsilon: 1e+200 is out of range" in _problems(
        STUDY | {"privacy": {"epsilon": 1e200, "delta": 1e-6}}
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10**400])
@pytest.mark.parametrize("field", ["cutoff", "reliable_change"])
def test_an_inline_definition_refuses_odd_numbers(field: str, value: Any) -> None:
    assert f"study.instrument.X.{field}: expected a finite number" in _problems(
        _inline(**{field: value})
    )


# -- M2: inline ranges and the size of a release ----------------------------------------


def test_an_inline_range_is_bounded() -> None:
    problems = _problems(_inline(range=[0, 10**9]))
    assert "study.instrument.definition.range: [0, 1000000000] must lie within" in problems
    parse_study(_inline(range=[-MAX_SCORE, MAX_SCORE]) | {"families": ["counts"]})


def test_a_release_too_large_for_one_message_is_refused_before_anything_is_built() -> None:
    width = 10_000
    bands = [[i * 200, i * 200 + 199] for i in range(49)] + [[9800, width]]
    doc = _inline(range=[0, width]) | {"bands": bands, "families": ["counts", "histogram"]}
    tracemalloc.start()
    try:
        problems = _problems(doc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"asks each site for 1000100 values (50 bands, range width {width}" in problems
    assert f"at most {MAX_RELEASE_VALUES} fit into one release message" in problems
    assert peak < 5_000_000
    # One band of the same range fits.
    parse_study(doc | {"bands": [[0, width]]})


def test_block_layout_refuses_an_oversized_study_without_allocating() -> None:
    ok = parse_study(_inline(range=[0, MAX_SCORE]) | {"families": ["histogram"]})
    assert block_layout(ok)
    # Built around the parser, as a caller might: 50 bands of a 20,001-bin histogram.
    wide = dataclasses.replace(ok, bands=tuple((i, i) for i in range(MAX_BANDS)))
    tracemalloc.start()
    try:
        with pytest.raises(SpecError, match="values exceed"):
            block_layout(wide)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


@settings(max_examples=150, deadline=None)
@given(
    families=st.sets(st.sampled_from(list(Family)), min_size=1),
    width=st.integers(1, 300),
    k=st.integers(1, 100),
    n_bands=st.integers(1, 8),
)
def test_release_values_is_the_layouts_size(
    families: set[Family], width: int, k: int, n_bands: int
) -> None:
    """The arithmetic count bounds the layout's size (so the size check before charging
    is safe) and is exact when no block is fixed by definition (cut-off 0: nothing is at
    caseness, so only the caseness blocks drop out) and the histogram spans 2 W + 1."""
    step = -(-(width + 1) // n_bands)
    bands = [[lo, min(lo + step - 1, width)] for lo in range(0, width + 1, step)]
    doc = _inline(range=[0, width], cutoff=0, reliable_change=1) | {
        "bands": bands,
        "families": [str(f) for f in families],
        "max_session": k,
    }
    study = parse_study(doc)
    layout = block_layout(study)
    size = sum(b.size for b in layout)
    bound = release_values(study.families, len(study.bands), width, k)
    assert size <= bound
    missing = 0
    if Family.CHANGE in study.families:  # the intake's sums vanish when bands are points
        missing += len(study.bands) * (5 - sum(b.family is Family.CHANGE for b in layout))
    if Family.CATEGORIES in study.families:
        missing += len(study.bands) * (len(CATEGORY_NAMES) - sum(
            b.family is Family.CATEGORIES for b in layout))
    if Family.HISTOGRAM in study.families:
        hist = next(b for b in layout if b.name == "change_hist")
        missing += len(study.bands) * (2 * width + 1 - hist.width)
    assert size + missing == bound


def test_the_largest_release_fits_into_one_message() -> None:
    """MAX_RELEASE_VALUES values, each the longest int64, with every block a study can
    have: the signed envelope and the gRPC reply stay within MAX_MESSAGE_BYTES."""
    n_blocks = 20  # more than a study can ask (counts 1, change 6, categories 7, traj 3, hist 1)
    per_block = MAX_RELEASE_VALUES // n_blocks
    blocks = tuple(
        NoisyBlock(
            name=f"block_name_of_some_length_{i}",
            family="trajectory",
            n_bands=MAX_BANDS,
            width=per_block // MAX_BANDS,
            values=(-(2**63),) * (per_block // MAX_BANDS * MAX_BANDS),
            lo=-(2**40),
            hi=2**40,
            sensitivity=1.2345678901234567e300,
            scale=1.2345678901234567e300,
            rho=Fraction(1, 3) ** 20,
        )
        for i in range(n_blocks)
    )
    release = SiteRelease(
        study_id="x" * MAX_ID_CHARS,
        study_hash="0" * 64,
        site_id="s" * 200,
        created="2026-12-31T23:59:59+00:00",
        blocks=blocks,
        rho=Fraction(1, 3) ** 20,
        epsilon=1.2345678901234567e300,
        delta=1e-6,
        unit="client",
        max_episodes_per_client=10,
        mechanism="m" * 200,
        window_applied=True,
        versions={"outcomebench": "9" * 40, "opendp": "9" * 40},
    )
    assert sum(len(b.values) for b in blocks) > 0.99 * MAX_RELEASE_VALUES
    from site_agent import crypto  # noqa: PLC0415 - the site's signer, as the engine uses it

    body = crypto.sign(Ed25519PrivateKey.generate(), "release", release.canonical_bytes())
    data = body.dumps().encode()
    reply = pb.ReleaseReply(release=data).SerializeToString()
    assert len(data) <= len(reply) <= MAX_MESSAGE_BYTES


# -- M5: YAML and JSON documents ---------------------------------------------------------


def _bomb() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\nstudy: {id: *a9}\n"


def _read(tmp: Path, text: str | bytes) -> str:
    path = tmp / "study.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(SpecError) as info:
        read_study_file(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}")
    return problem


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        problem = _read(tmp_path, _bomb())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "at line 2, column 10: aliases (*name) are not accepted" in problem
    assert peak < 5_000_000


def test_aliases_are_refused_in_site_files_too(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("a: &x 1\nb: *x\n")
    with pytest.raises(SpecError, match="aliases"):
        read_yaml(path, missing="")


@pytest.mark.parametrize(
    "text",
    [
        "study: " + "[" * 100_000 + "]" * 100_000 + "\n",  # flow style (libyaml stops it)
        "".join(" " * i + "- \n" for i in range(MAX_DEPTH + 5)) + " " * (MAX_DEPTH + 5) + "x\n",
        "".join(" " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)) + " " * 30 + "v\n",
    ],
)
def test_deep_nesting_is_refused(tmp_path: Path, text: str) -> None:
    problem = _read(tmp_path, text)
    assert "nest more than 20 levels" in problem or "not valid YAML" in problem


def test_block_nesting_names_the_limit(tmp_path: Path) -> None:
    text = "".join(" " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 1)) + " " * 30 + "v\n"
    assert f"at line {MAX_DEPTH + 1}, column {MAX_DEPTH + 1}: lists and mappings nest more " \
        f"than {MAX_DEPTH} levels deep" in _read(tmp_path, text)
    ok = "".join(" " * i + f"k{i}:\n" for i in range(MAX_DEPTH - 1)) + " " * 30 + "v\n"
    assert load_yaml(ok) is not None


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    text = yaml.safe_dump({"study": STUDY}, sort_keys=False).replace(
        "  title:", "  id: again\n  title:", 1
    )
    assert "at line 3, column 3: key 'id' is given twice (first at line 2); keep one" in _read(
        tmp_path, text
    )
    with pytest.raises(yaml.YAMLError, match="given twice"):
        load_yaml("{a: 1, b: {c: 1, c: 2}}")


def test_a_file_larger_than_the_limit_is_not_read(tmp_path: Path) -> None:
    doc = {"study": STUDY | {"title": "x" * MAX_DOCUMENT_BYTES}}
    problem = _read(tmp_path, yaml.safe_dump(doc))
    assert problem.endswith(f"larger than {MAX_DOCUMENT_BYTES} bytes; this cannot be a valid file")


def test_a_number_python_cannot_convert_is_refused(tmp_path: Path) -> None:
    problem = _read(tmp_path, f"study:\n  min_sites: {'9' * 5000}\n")
    assert "a value cannot be read (ValueError)" in problem


def test_problem_messages_quote_values_briefly() -> None:
    nested: Any = "x" * 10_000
    for _ in range(50):
        nested = [nested] * 20
    assert len(short(nested)) < 200 and len(short("y" * 10**6)) < 100
    problems = _problems(STUDY | {"window": {"start": nested, "end": "2026-01-01"}})
    assert len(problems) < 300
    problems = _problems(STUDY | {"unknown" + "k" * 10_000: 1})
    assert len(problems) < 300


# -- field lengths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"title": "t" * (MAX_TITLE_CHARS + 1)}, "study.title"),
        ({"title": "t" * 50_000_000}, "study.title"),
        ({"title": "two\nlines"}, "study.title"),
        ({"title": "\x1b[31mred"}, "study.title"),
        ({"id": "i" * (MAX_ID_CHARS + 1)}, "study.id"),
        ({"min_sites": 10**30}, "study.min_sites"),
        ({"inclusion": {"min_scores": 10**30}}, "study.inclusion.min_scores"),
        ({"bands": [[i, i] for i in range(MAX_BANDS + 1)]}, "study.bands"),
        ({"families": ["counts"] * 10_000}, "study.families"),
        ({"instrument": {"id": "X" * 100, "definition": INLINE}}, "study.instrument.id"),
    ],
)
def test_over_long_fields_are_refused(change: dict[str, Any], field: str) -> None:
    problems = _problems(STUDY | change)
    assert f"{field}: " in problems and len(problems) < 1000


def test_fields_at_their_bounds_are_accepted() -> None:
    s = parse_study(STUDY | {"title": "é" * MAX_TITLE_CHARS, "id": "i" * MAX_ID_CHARS})
    assert len(s.canonical_bytes()) < MAX_STUDY_WIRE_BYTES // 4


# -- the wire form -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b" " * (MAX_STUDY_WIRE_BYTES + 1), "larger than"),
        (b"[" * 30_000 + b"]" * 30_000, "not canonical study JSON"),
        (b'{"a":' * 30 + b"1" + b"}" * 30, "nested more than 20 levels deep"),
        (b'{"schema": 1, "min_sites": ' + b"9" * 5000 + b"}", "not canonical study JSON"),
        (b'{"schema": 1, "privacy": {"rho": Infinity}}', "study.privacy.rho"),
    ],
)
def test_a_wire_study_is_bounded(data: bytes, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        study_from_canonical(data)
    assert expected in "\n".join(info.value.problems)


def test_the_registry_fits_the_bounds() -> None:
    for ins in builtin_instruments().values():
        doc = {k: v for k, v in STUDY.items() if k != "bands"}
        doc |= {"instrument": ins.id, "families": [str(f) for f in Family], "max_session": 100}
        study = parse_study(doc)
        assert study_from_canonical(study.canonical_bytes()) == study
        assert json.loads(study.canonical_bytes())["id"] == "phq9-2026"
