"""Statistical tests of every noise block: what runs is OpenDP's discrete Gaussian at the
compiled scale, and what is charged is OpenDP's own privacy map.

Every block of a study with all families (PHQ-9, K = 20, the instrument's bands) is
compiled as the site compiles it and released on a fixed integer vector through
``CompiledBlock.release`` (of a twin with more bands, so that each call yields thousands
of draws from the same measurement); each value of each release is one draw. The tests run
at alpha = 1e-6 and each has negative controls: the same statistic must reject a
hypothesised scale of 0.7x and 1.3x the true one.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from opendp.mod import GLOBAL_FEATURES

from protocols.layout import block_layout, budget_weights
from protocols.study import Family, Study, parse_study

if TYPE_CHECKING:
    from site_agent.privacy.accounting import CompiledBlock


def _site_agent(module: str) -> Any:
    """``site_agent.<module>``, imported when a test runs, not when this file is collected.

    This file is collected before tests/unit/site_agent, a test package that
    --import-mode=importlib registers as "site_agent": with the product's site_agent
    already imported, that package's relative imports (``from .helpers import ...``)
    resolve against the product package and its collection fails.
    """
    return importlib.import_module(f"site_agent.{module}")


pytestmark = pytest.mark.slow

ALPHA = 1e-6
DRAWS = 20_000  # per block, at least
CALLS = 10  # releases per block, each of DRAWS / CALLS values or more
RHO = Fraction(1, 10)
MAX_EPISODES = 1


def _study(rho: str = "0.1") -> Study:
    return parse_study(
        {
            "id": "noise",
            "title": "every family",
            "instrument": "PHQ-9",
            "window": {"start": "2020-01-01", "end": "2029-12-31"},
            "families": [str(f) for f in Family],
            "max_session": 20,
            "privacy": {"rho": rho},
            "min_sites": 1,
        }
    )


STUDY = _study()
LAYOUT = block_layout(STUDY)
NAMES = [b.name for b in LAYOUT]


def _compile(study: Study, max_episodes: int = MAX_EPISODES) -> list[CompiledBlock]:
    compile_block = _site_agent("privacy.accounting").compile_block
    layout = block_layout(study)
    rho = study.privacy.rho
    assert rho is not None
    return [
        compile_block(spec, rho * share, max_episodes)
        for spec, share in zip(layout, budget_weights(layout), strict=True)
    ]


# -- the tests, as functions of a sample ----------------------------------------------


def _critical(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2)


def scale_consistent(samples: npt.ArrayLike, hypothesised_scale: float, alpha: float) -> bool:
    """Two-sided test of "these are centred draws with SD ``hypothesised_scale``".

    Under the hypothesis, sum(x^2) / scale^2 is chi-square with n degrees of freedom (the
    discrete Gaussian's variance equals scale^2 to within exp(-2 pi^2 scale^2), nothing at
    the scales here); the Wilson-Hilferty cube root makes it standard normal even in the
    far tails that alpha = 1e-6 reaches.
    """
    x = np.asarray(samples, dtype=np.float64)
    n = x.size
    q = float(np.sum(np.square(x / hypothesised_scale))) / n
    z = (q ** (1 / 3) - (1 - 2 / (9 * n))) / math.sqrt(2 / (9 * n))
    return abs(z) <= _critical(alpha)


def mean_consistent(samples: npt.ArrayLike, scale: float, alpha: float) -> bool:
    """Two-sided z-test of "the noise has mean 0" (the release is centred on the input)."""
    x = np.asarray(samples, dtype=np.float64)
    return abs(float(x.mean())) * math.sqrt(x.size) / scale <= _critical(alpha)


def _discrete_gaussian_tail(scale: float, t: float) -> float:
    """P(|X| > t) for the discrete Gaussian with ``scale``, summed exactly enough."""
    m = math.ceil(14 * scale) + 10
    k = np.arange(-m, m + 1, dtype=np.float64)
    w = np.exp(-(k * k) / (2 * scale * scale))
    return float(w[np.abs(k) > t].sum() / w.sum())


def tail_consistent(samples: npt.ArrayLike, scale: float, alpha: float) -> bool:
    """Binomial z-test of the share of draws beyond 2 scales against the discrete Gaussian:
    tells a Gaussian from, e.g., a Laplace of the same variance."""
    x = np.asarray(samples)
    p = _discrete_gaussian_tail(scale, 2 * scale)
    hits = int(np.count_nonzero(np.abs(x) > 2 * scale))
    z = (hits - x.size * p) / math.sqrt(x.size * p * (1 - p))
    return abs(z) <= _critical(alpha)


def uncorrelated(
    pairs: Iterable[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]], scale: float, alpha: float
) -> bool:
    """z-test of "paired centred draws are uncorrelated" (sum of products / (n scale^2))."""
    prod, n = 0.0, 0
    for a, b in pairs:
        prod += float(np.dot(a.astype(np.float64), b.astype(np.float64)))
        n += a.size
    return abs(prod / (scale * scale)) / math.sqrt(n) <= _critical(alpha)


# -- drawing -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Draws:
    block: CompiledBlock
    values: npt.NDArray[np.int64]  # the exact vector released
    noise: npt.NDArray[np.int64]  # (calls, size): release - values

    @property
    def flat(self) -> npt.NDArray[np.int64]:
        return self.noise.reshape(-1)


def _twin(block: CompiledBlock, n_bands: int) -> CompiledBlock:
    """The same compiled measurement behind a spec with ``n_bands`` bands, so that one
    ``release`` call yields ``n_bands * width`` draws (at the study's 5 bands a small
    block would cost a round trip into OpenDP per 5 draws)."""
    return dataclasses.replace(block, spec=dataclasses.replace(block.spec, n_bands=n_bands))


def _draw(block: CompiledBlock) -> Draws:
    width = block.spec.width
    twin = _twin(block, math.ceil(DRAWS / CALLS / width))
    size = twin.spec.size
    assert twin.measurement is block.measurement and twin.scale == block.scale
    # A fixed, non-zero vector with negative and large entries: the output is centred on it.
    values = (np.arange(size, dtype=np.int64) % 7 - 3) * 1_000_003
    noise = np.empty((CALLS, size), dtype=np.int64)
    for i in range(CALLS):
        noise[i] = twin.release(values) - values
    return Draws(block=block, values=values, noise=noise)


@pytest.fixture(scope="module")
def draws() -> dict[str, Draws]:
    return {b.spec.name: _draw(b) for b in _compile(STUDY)}


def test_the_study_has_every_family() -> None:
    assert {b.family for b in LAYOUT} == set(Family)
    # v2: 5 change blocks, 6 categories (no band straddles the cut-off: no caseness block)
    assert len(LAYOUT) == 16 and len(STUDY.bands) == 5
    sizes = {b.name: b.size for b in LAYOUT}
    assert sizes["traj_sum"] == 5 * 9 and sizes["change_hist"] == 5 * 35


@pytest.mark.parametrize("name", NAMES)
def test_noise_is_centred_on_the_input(name: str, draws: dict[str, Draws]) -> None:
    d = draws[name]
    x, scale = d.flat, d.block.scale
    assert x.size >= DRAWS
    assert mean_consistent(x, scale, ALPHA)
    # negative controls: a bias of a tenth of the scale is caught
    shift = max(1, round(0.1 * scale))
    assert not mean_consistent(x + shift, scale, ALPHA)
    assert not mean_consistent(x - shift, scale, ALPHA)


@pytest.mark.parametrize("name", NAMES)
def test_noise_has_the_compiled_scale(name: str, draws: dict[str, Draws]) -> None:
    d = draws[name]
    x, scale = d.flat, d.block.scale
    assert scale_consistent(x, scale, ALPHA)
    assert not scale_consistent(x, 0.7 * scale, ALPHA)
    assert not scale_consistent(x, 1.3 * scale, ALPHA)


@pytest.mark.parametrize("name", NAMES)
def test_noise_has_gaussian_tails(name: str, draws: dict[str, Draws]) -> None:
    d = draws[name]
    x, scale = d.flat, d.block.scale
    assert tail_consistent(x, scale, ALPHA)
    assert not tail_consistent(x, 0.7 * scale, ALPHA)
    assert not tail_consistent(x, 1.3 * scale, ALPHA)
    # negative control: (rounded) Laplace noise of the same variance has heavier tails
    rng = np.random.default_rng(1234)
    laplace = np.rint(rng.laplace(scale=scale / math.sqrt(2), size=x.size))
    assert scale_consistent(laplace, scale, ALPHA)  # same variance: the SD test cannot tell
    assert not tail_consistent(laplace, scale, ALPHA)


@pytest.mark.parametrize("name", NAMES)
def test_draws_are_independent(name: str, draws: dict[str, Draws]) -> None:
    d = draws[name]
    noise, scale = d.noise, d.block.scale
    across = [(noise[:-1].reshape(-1), noise[1:].reshape(-1))]  # same value, next release
    assert uncorrelated(across, scale, ALPHA)
    if noise.shape[1] > 1:
        within = [(noise[:, :-1].reshape(-1), noise[:, 1:].reshape(-1))]  # neighbours
        assert uncorrelated(within, scale, ALPHA)
    # negative control: a moving sum of two draws is correlated with its neighbour
    flat = d.flat
    smeared = flat[:-1] + flat[1:]
    assert not uncorrelated([(smeared[:-1], smeared[1:])], scale, ALPHA)


@pytest.mark.parametrize("name", NAMES)
def test_draws_are_integers(name: str, draws: dict[str, Draws]) -> None:
    d = draws[name]
    block = d.block
    assert str(block.measurement.input_domain) == "VectorDomain(AtomDomain(T=i64))"
    assert "ZeroConcentratedDivergence" in str(block.measurement.output_measure)
    raw = block.measurement(d.values.tolist())  # what OpenDP itself returns
    assert len(raw) == d.values.size and all(type(v) is int for v in raw)
    values = d.values[: block.spec.size]
    out = block.release(values)  # the block at its true shape
    assert out.dtype == np.int64 and out.shape == (block.spec.size,)
    assert mean_consistent(out - values, block.scale, ALPHA)
    with pytest.raises(ValueError, match="expected"):
        block.release(d.values)  # and only at its true shape
    # Integer noise on the whole lattice, not on a coarser grid of multiples.
    assert set(np.unique(d.flat % 10).tolist()) == set(range(10))
    assert len(np.unique(d.flat)) > 20


def test_opendp_runs_with_contrib_only(draws: dict[str, Draws]) -> None:
    assert len(draws) == len(NAMES)  # after all the sampling above
    assert set(GLOBAL_FEATURES) == {"contrib"}
    _site_agent("privacy.accounting").assert_only_contrib()


@pytest.mark.parametrize("max_episodes", [1, 3])
@pytest.mark.parametrize("rho", ["0.1", "0.001", "1", "0.0123"])
def test_blocks_charge_opendps_own_map(rho: str, max_episodes: int) -> None:
    study = _study(rho)
    requested = Fraction(rho)
    layout = block_layout(study)
    shares = budget_weights(layout)
    blocks = _compile(study, max_episodes)
    charged = Fraction(0)
    for block, spec, share in zip(blocks, layout, shares, strict=True):
        assert block.spec == spec
        assert block.d_in == spec.sensitivity(max_episodes)
        cost = Fraction(block.measurement.map(block.d_in))
        assert cost == block.rho
        assert 0 < cost <= requested * share
        assert cost >= requested * share * (1 - Fraction(1, 10**9))  # no budget wasted
        charged += cost
    assert charged == _site_agent("privacy.accounting").total_rho(blocks)
    assert charged <= requested


def test_the_engine_plans_with_opendps_map(tmp_path: Path) -> None:
    """The cost the engine would debit is the exact sum of the blocks' OpenDP maps."""
    load_site_config = _site_agent("config").load_site_config
    engine_module, load_policy = _site_agent("privacy.engine"), _site_agent("privacy").load_policy
    (tmp_path / "outcomes.csv").write_text("client,session_no,seen_on,total\n")
    site = {
        "site": {"id": "clinic-noise"},
        "data": {
            "path": "outcomes.csv",
            "instrument": "PHQ-9",
            "columns": {
                "client_id": "client",
                "session": "session_no",
                "date": "seen_on",
                "score": "total",
            },
        },
        "privacy_policy": "privacy.yaml",
    }
    policy = {
        "unit": "client_id",
        "max_episodes_per_client": 2,
        "per_study": {"rho": "0.1"},
        "budget": {"rho": "0.5", "period_days": 365},
        "allow": {"instruments": ["PHQ-9"], "families": [str(f) for f in Family]},
        "approval": "auto",
        "state_dir": "state",
    }
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    (tmp_path / "privacy.yaml").write_text(yaml.safe_dump(policy))
    engine = engine_module.ReleaseEngine(
        load_site_config(tmp_path / "site.yaml"), load_policy(tmp_path / "privacy.yaml")
    )
    plan = engine.plan(engine_module.StudyRequest(STUDY))
    maps = [Fraction(b.measurement.map(b.d_in)) for b in plan.blocks]
    assert [b.rho for b in plan.blocks] == maps
    assert plan.cost == sum(maps, Fraction(0)) <= plan.requested_rho == RHO
    assert [b.d_in for b in plan.blocks] == [s.sensitivity(2) for s in LAYOUT]
