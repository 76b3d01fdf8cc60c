"""The architecture's privacy guard rails, checked on the source tree."""

from __future__ import annotations

import ast
from fractions import Fraction
from pathlib import Path

import opendp.mod
import pytest

from protocols.layout import block_layout
from protocols.study import parse_study
from site_agent.privacy.accounting import MECHANISM, assert_only_contrib, compile_block

REPO = Path(__file__).resolve().parents[3]
PRODUCT = ("protocols", "site_agent", "coordinator")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(pkg: str) -> list[Path]:
    return sorted((REPO / pkg).rglob("*.py"))


def test_opendp_only_in_site_agent_privacy() -> None:
    for pkg in PRODUCT:
        for f in _files(pkg):
            uses = any(n == "opendp" or n.startswith("opendp.") for n in _imports(f))
            inside = f.is_relative_to(REPO / "site_agent" / "privacy")
            assert not uses or inside, f


def test_package_boundaries() -> None:
    for f in _files("protocols"):
        assert not {n.split(".")[0] for n in _imports(f)} & {"site_agent", "coordinator"}, f
    for f in _files("site_agent"):
        assert "coordinator" not in {n.split(".")[0] for n in _imports(f)}, f
    for f in _files("coordinator"):
        assert "site_agent" not in {n.split(".")[0] for n in _imports(f)}, f


def test_no_general_purpose_noise_on_release_paths() -> None:
    for f in _files("site_agent") + _files("protocols"):
        text = f.read_text(encoding="utf-8")
        for bad in ("np.random", "numpy.random", "import random", "secrets.randbelow"):
            assert bad not in text, (f, bad)


def test_only_contrib_is_enabled() -> None:
    assert set(opendp.mod.GLOBAL_FEATURES) == {"contrib"}
    assert_only_contrib()
    opendp.mod.enable_features("honest-but-curious")
    try:
        with pytest.raises(RuntimeError):
            assert_only_contrib()
    finally:
        opendp.mod.disable_features("honest-but-curious")
    assert_only_contrib()


def test_the_vetted_sampler_runs() -> None:
    study = parse_study({"id": "s", "instrument": "PHQ-9",
                         "window": {"start": "2026-01-01", "end": "2026-12-31"},
                         "families": ["counts"], "privacy": {"rho": 0.5}})
    [spec] = block_layout(study)
    block = compile_block(spec, Fraction(1, 2), 1)
    m = block.measurement
    # OpenDP's Gaussian mechanism on an integer vector domain under zCDP: discrete Gaussian.
    assert str(m.output_measure).startswith("ZeroConcentratedDivergence")
    assert "AtomDomain(T=i64)" in str(m.input_domain)
    assert Fraction(m.map(block.d_in)) == block.rho <= Fraction(1, 2)
    assert "discrete Gaussian" in MECHANISM


FLOWER_ADAPTERS = {
    REPO / "site_agent" / "bridge.py",
    REPO / "site_agent" / "simulated.py",
    REPO / "coordinator" / "app.py",
}


def test_flower_only_in_its_thin_adapters() -> None:
    for pkg in PRODUCT:
        for f in _files(pkg):
            uses = any(n == "flwr" or n.startswith("flwr.") for n in _imports(f))
            assert not uses or f in FLOWER_ADAPTERS, f


def test_the_project_stands_alone() -> None:
    # A clone has no ../shared: nothing a user reads or runs may point there.
    readers = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
               *sorted((REPO / "configs").iterdir()), *sorted((REPO / "deploy").rglob("*")),
               *sorted((REPO / "protocols" / "data").iterdir())]
    for pkg in PRODUCT:
        readers += _files(pkg)
    offenders = [str(f.relative_to(REPO)) for f in readers
                 if f.is_file() and "../shared" in f.read_text(encoding="utf-8", errors="replace")]
    assert not offenders
    for doc in ("ARCHITECTURE.md", "PRIVACY.md", "METHODS.md", "DEPLOYMENT.md"):
        assert (REPO / "docs" / doc).is_file(), doc
