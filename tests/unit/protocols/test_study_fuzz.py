"""Fuzzing study files through the real command lines, in-process (issue 8).

Each example is a study document that mixes valid structure with what a hostile or
careless coordinator might send: alias bombs, deep nesting, duplicate keys, numbers with
huge exponents, .inf/.nan, 1e308, integers of thousands of digits, unicode, control
characters, long strings, wrong types, a release too large to send, and signed
envelopes around mutated canonical studies. Every document goes through
``outcomebench-site preview`` and ``release`` against a tiny real site (a fresh ledger per
example), and through ``outcomebench-coordinator sign-study`` (whose output goes through
``preview`` again). Whatever the input: no internal error (site exit 70 or refusal 19,
coordinator exit 1), no uncaught exception, and a small CPU and memory budget per
example (generous bounds on ``getrusage``, not timings).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import resource
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from coordinator.cli import ExitCode as CoordinatorExit
from coordinator.cli import main as coordinator_main
from coordinator.crypto import generate_keypair
from protocols.codes import ErrorCode, exit_code
from protocols.release import canonical_json
from protocols.study import parse_study
from site_agent import crypto
from site_agent.cli import main as site_main
from site_agent.errors import ExitCode as SiteExit

from ..site_agent.privacy_helpers import POLICY

CPU_SECONDS = 30.0  # per example, all four runs together; a valid one takes well under 1 s
RSS_GROWTH_KB = 400_000  # new peak resident memory one example may add

VALID: dict[str, Any] = {
    "id": "fuzz",
    "title": "PHQ-9 fuzz",
    "instrument": "PHQ-9",
    "window": {"start": "2025-01-01", "end": "2026-12-31"},
    "inclusion": {"min_scores": 2},
    "bands": [[0, 9], [10, 27]],
    "families": ["counts", "change", "categories", "trajectory", "histogram"],
    "max_session": 8,
    "privacy": {"rho": 0.05},
    "min_sites": 3,
}
INLINE: dict[str, Any] = VALID | {
    "instrument": {
        "id": "X",
        "definition": {"range": [0, 27], "better": "lower", "reliable_change": 6, "cutoff": 10},
    },
    "bands": [[0, 27]],
}


@dataclass(frozen=True)
class Raw:
    """YAML text spliced in as it is (what a dict cannot hold: aliases, bad syntax)."""

    text: str


def _emit(value: Any) -> str:
    """Flow-style YAML (JSON where possible) of ``value``, with Raw fragments as written."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_emit(str(k))}: {_emit(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_emit(v) for v in value) + "]"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)


def _bomb(levels: int) -> Raw:
    parts = ['&b0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    parts += [f"&b{i} [" + ", ".join([f"*b{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return Raw("[" + ", ".join(parts) + "]")


def _deep(n: int) -> Any:
    return Raw("[" * n + "]" * n) if n > 200 else _nest(n)


def _nest(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


NUMBER_TEXT = st.from_regex(r"-?[0-9]{1,50}(\.[0-9]{0,50})?([eE][-+]?[0-9]{1,8})?", fullmatch=True)
NUMBERS = st.one_of(
    st.sampled_from(
        [
            "1e-1000000", "1e1000000", "-1e-5", "0", "1e-30", "1e30", "Infinity", "NaN",
            Raw(".inf"), Raw("-.inf"), Raw(".nan"), Raw("1.0e-1000000"), Raw("1.0e+400"),
            1e308, -1e308, 5e-324, 0.0, -0.0, 10**4000, 2**63, -(2**63) - 1,
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**40), 10**40),
    st.integers(0, 4400).map(lambda k: Raw("9" * max(k, 1))),
    NUMBER_TEXT,
    NUMBER_TEXT.map(Raw),
)
TEXTS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20),
    st.sampled_from([81, 301, 70_000, 1_100_000]).map(lambda n: "é" * n),
    st.sampled_from(["\x1b[31mred", "two\nlines", "\x00", "\u202e", "\ud7ff", "😀" * 100]),
)
OTHERS = st.one_of(
    st.sampled_from(
        [None, True, False, [], {}, [1, 2], {"a": 1}, [[0, 9]], [["a", "b"]], "2026-02-30",
         Raw("[1, 2"), Raw("{a: 1, a: 2}"), Raw('{"rho": 0.01, "rho": 0.02}'), Raw("!!binary AA=="),
         Raw("!!python/object:os.system x"), Raw("? [a, b]"), Raw("*nowhere")]
    ),
    st.integers(2, 12).map(_bomb),
    st.integers(2, 3000).map(_deep),
)
VALUES = st.one_of(NUMBERS, TEXTS, OTHERS)

PATHS: Sequence[tuple[Any, ...]] = (
    ("id",), ("title",), ("instrument",), ("instrument", "id"), ("window",),
    ("window", "start"), ("window", "end"), ("inclusion",), ("inclusion", "min_scores"),
    ("bands",), ("bands", 0), ("bands", 0, 1), ("bands", 1, 0), ("families",), ("families", 0),
    ("max_session",), ("privacy",), ("privacy", "rho"), ("privacy", "epsilon"),
    ("privacy", "delta"), ("min_sites",), ("extra",), ("instrument", "definition"),
    ("instrument", "definition", "range"), ("instrument", "definition", "range", 1),
    ("instrument", "definition", "cutoff"), ("instrument", "definition", "reliable_change"),
    ("instrument", "definition", "better"), ("instrument", "definition", "bands"),
    ("instrument", "definition", "sd"), ("instrument", "definition", "reliability"),
)


def _has(node: Any, key: Any) -> bool:
    in_dict = isinstance(node, dict) and isinstance(key, str)
    return in_dict or (isinstance(node, list) and isinstance(key, int) and key < len(node))


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    """Set ``value`` at ``path`` where the document has such a place (else nothing)."""
    node = doc
    for key in path[:-1]:
        if not _has(node, key) or (isinstance(node, dict) and key not in node):
            return
        node = node[key]
    if _has(node, path[-1]):
        node[path[-1]] = value


@st.composite
def _wide(draw: st.DrawFn) -> dict[str, Any]:
    """An inline instrument of a wide range, in many bands, with the histogram: the
    layout-size bound (and the range bound) must refuse it before anything is built."""
    width = draw(st.one_of(st.integers(1, 20_000), st.integers(1, 10**9)))
    n = draw(st.integers(1, 60))
    step = -(-(width + 1) // n)
    doc = json.loads(json.dumps(INLINE))
    doc["instrument"]["definition"] |= {"range": [0, width], "reliable_change": 1, "cutoff": 0}
    doc["bands"] = [[lo, min(lo + step - 1, width)] for lo in range(0, width + 1, step)]
    doc["families"] = draw(st.sampled_from([["histogram"], ["counts", "histogram"],
                                            ["trajectory", "histogram"]]))
    doc["max_session"] = draw(st.integers(1, 100))
    return doc


@st.composite
def study_texts(draw: st.DrawFn) -> tuple[str, str]:
    """(kind, file text) of one study document."""
    kind = draw(st.sampled_from(["draft", "draft", "draft", "wide", "signed", "raw"]))
    if kind == "wide":
        return kind, _emit({"study": draw(_wide())})
    if kind == "raw":
        return kind, _emit(draw(VALUES))
    doc = json.loads(json.dumps(draw(st.sampled_from([VALID, INLINE]))))
    if kind == "signed":  # mutate the canonical form, then sign it with some key
        doc = parse_study(doc).canonical()
        for path, value in draw(st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(
                st.integers(-(10**20), 10**20), st.text(max_size=30), st.floats(),
                st.integers(1, 150).map(_nest), st.sampled_from([None, [], {}]))), max_size=3)):
            _set(doc, path, value)
        payload = canonical_json(doc)
        env = crypto.sign(Ed25519PrivateKey.generate(), "study", payload)
        return kind, env.dumps()
    for path, value in draw(st.lists(st.tuples(st.sampled_from(PATHS), VALUES), max_size=3)):
        _set(doc, path, value)
    wrapped = doc if draw(st.booleans()) else {"study": doc}
    return kind, _emit(wrapped)


# -- a tiny real site, a fresh ledger per example ---------------------------------------

CSV = "client,session_no,seen_on,total\n" + "".join(
    f"c{c},{s},2026-0{s}-0{c % 9 + 1},{max(0, 20 - 3 * s + c % 5)}\n"
    for c in range(12)
    for s in range(1, 5)
)


@dataclass
class Site:
    root: Path
    network_key: Path
    counter: Iterator[int]

    def fresh(self) -> Path:
        """site.yaml and privacy.yaml with a state directory of their own."""
        d = self.root / f"site-{next(self.counter)}"
        d.mkdir()
        (d / "site.yaml").write_text(yaml.safe_dump({
            "site": {"id": "clinic-fuzz"},
            "data": {"path": str(self.root / "outcomes.csv"), "instrument": "PHQ-9",
                     "columns": {"client_id": "client", "session": "session_no",
                                 "date": "seen_on", "score": "total"}},
            "privacy_policy": "privacy.yaml",
        }))
        (d / "privacy.yaml").write_text(yaml.safe_dump(POLICY | {
            "per_study": {"rho": 1},
            "budget": {"rho": 10, "period_days": 365},
            "allow": POLICY["allow"] | {"instruments": ["PHQ-9", "X"]},
        }))
        return d / "site.yaml"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("fuzz-site")
    (root / "outcomes.csv").write_text(CSV)
    private, _ = generate_keypair(root / "keys", "network")
    s = Site(root, private, itertools.count())
    # Warm up (imports, OpenDP, the registry), so memory is measured per example.
    study = root / "valid.yaml"
    study.write_text(yaml.safe_dump({"study": VALID}))
    config = s.fresh()
    assert _run(site_main, ["preview", "--config", str(config), "--study", str(study)])[0] == 0
    out = str(root / "valid.json")
    code, _, err = _run(site_main, ["release", "--config", str(config), "--study", str(study),
                                    "--out", out])
    assert code == 0, err
    return s


def _run(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


INTERNAL = {int(SiteExit.INTERNAL), exit_code(ErrorCode.INTERNAL_ERROR)}
SITE_CODES = {int(SiteExit.OK)} | {exit_code(c) for c in ErrorCode}


def _usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_maxrss


def _check_site(argv: list[str]) -> int:
    code, out, err = _run(site_main, argv)
    assert code not in INTERNAL, (argv, code, err[-2000:])
    assert code in SITE_CODES, (argv, code, err[-2000:])
    assert "this is a bug" not in err and "Traceback" not in err, err[-2000:]
    if "--json" in argv:
        doc = json.loads(out)
        if code != 0:
            assert exit_code(ErrorCode(doc["refused"])) == code
        if code == exit_code(ErrorCode.MALFORMED_STUDY):
            assert doc["detail_local_only"]  # the site's operator is told what is wrong
    return code


def _fuzz_one(site: Site, kind: str, text: str) -> None:
    cpu0, rss0 = _usage()
    config = site.fresh()
    study = config.parent / "study.yaml"
    study.write_text(text, encoding="utf-8", errors="surrogatepass")
    common = ["--config", str(config), "--study", str(study), "--json"]
    preview = _check_site(["preview", *common])
    release = _check_site(["release", *common, "--out", str(config.parent / "r.json")])
    event(f"{kind}: preview {preview}, release {release}")
    if kind in ("draft", "wide") and preview == 0:
        assert release != exit_code(ErrorCode.MALFORMED_STUDY)  # preview and release agree
    signed = config.parent / "signed.json"
    code, _, err = _run(coordinator_main, ["sign-study", "--study", str(study), "--signing-key",
                                           str(site.network_key), "--out", str(signed)])
    assert code != CoordinatorExit.INTERNAL_ERROR and "this is a bug" not in err, err[-2000:]
    assert code in (CoordinatorExit.OK, CoordinatorExit.INPUT_ERROR), err[-2000:]
    if code == CoordinatorExit.OK:
        assert _check_site(["preview", "--config", str(config), "--study", str(signed)]) != 13
    cpu1, rss1 = _usage()
    assert cpu1 - cpu0 < CPU_SECONDS, (kind, text[:300])
    assert rss1 - rss0 < RSS_GROWTH_KB, (kind, text[:300])


_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow,
                                                         HealthCheck.data_too_large]}


@settings(max_examples=120, **_SETTINGS)  # type: ignore[arg-type]
@given(study_texts())
def test_no_study_file_makes_an_internal_error(site: Site, doc: tuple[str, str]) -> None:
    _fuzz_one(site, *doc)


@pytest.mark.slow
@settings(max_examples=1500, **_SETTINGS)  # type: ignore[arg-type]
@given(study_texts())
def test_no_study_file_makes_an_internal_error_long_run(site: Site, doc: tuple[str, str]) -> None:
    _fuzz_one(site, *doc)
