"""Synthetic clinics read by the site's own pipeline, and the releases its engine would make
of them, for the accuracy benchmarks (``utility.py``, ``usefulness.py``) and ``pool.py``.

Nothing here re-derives what the product decides: the exact blocks come from the site's
pipeline (``load_site_config`` -> ``read_intake`` -> ``derive_episodes`` ->
``select_episodes`` -> ``exact_blocks``), the measurements from the engine's own
``ReleaseEngine.plan`` (layout, budget split and OpenDP compilation, as a site compiles
them), and the coordinator's side from ``pool`` and ``estimate_all``. When the layout or the
split changes, these follow.

Noise is the compiled measurements' own (``CompiledBlock.release``), drawn for many copies
in one OpenDP call per block (:func:`noised`): the same measurement, independent draws.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.pooling import Contribution
from coordinator.synth import synthesize
from protocols.layout import block_layout
from protocols.release import NoisyBlock, SiteRelease
from protocols.study import Study
from site_agent.config import load_site_config
from site_agent.data import read_intake
from site_agent.outcomes import derive_episodes
from site_agent.privacy.accounting import (
    MECHANISM,
    OPENDP_VERSION,
    CompiledBlock,
    zcdp_to_epsilon,
)
from site_agent.privacy.engine import ReleaseEngine, StudyRequest
from site_agent.privacy.policy import load_policy
from site_agent.privacy.statistics import Selection, exact_blocks, select_episodes

INSTRUMENT = "PHQ-9"
BANDS = ((0, 9), (10, 14), (15, 19), (20, 27))
WINDOW = {"start": "2025-01-01", "end": "2026-12-31"}  # the generator's dates
ALL_FAMILIES = ("counts", "change", "categories", "trajectory", "histogram")
MAX_EPISODES = 1
I64 = npt.NDArray[np.int64]

# The policy the benchmarks' engine plans under: everything allowed, caps far above any
# study here (plan() reads no data and spends nothing, so no ledger is ever opened).
_POLICY_YAML = """\
unit: client_id
max_episodes_per_client: {m}
per_study: {{rho: 1000000000000}}
budget: {{rho: 1000000000000, period_days: 365}}
allow:
  instruments: [{instrument}]
  families: [counts, change, categories, trajectory, histogram]
approval: auto
state_dir: state
"""


def study_draft(
    study_id: str,
    title: str,
    families: Sequence[str],
    privacy: dict[str, Any],
    *,
    max_session: int = 20,
    min_sites: int = 1,
) -> dict[str, Any]:
    """A study as the research network writes it (study.yaml), on the benchmarks' bands.
    ``min_sites`` 1 by default: central DP pools one "site"."""
    return {
        "id": study_id,
        "title": title,
        "instrument": INSTRUMENT,
        "window": dict(WINDOW),
        "bands": [list(b) for b in BANDS],
        "families": list(families),
        "max_session": max_session,
        "privacy": privacy,
        "min_sites": min_sites,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class Clinic:
    site_id: str
    config: Path  # its site.yaml
    exact: I64  # every block, concatenated in layout order
    selection: Selection  # the episodes the study counts (for per-episode baselines)


def load_clinics(n_sites: int, seed: int, study: Study, root: Path) -> list[Clinic]:
    """``synthesize(n_sites, root, seed=seed)`` read by the site's pipeline: each clinic's
    exact blocks for ``study`` at one episode per client. Clinic k is the same whatever
    ``n_sites`` (synth draws each from its own stream)."""
    layout = block_layout(study)
    clinics = []
    for files in synthesize(n_sites, root, seed=seed):
        cfg = load_site_config(files.config_path)
        intake = read_intake(cfg.data, cfg.instruments)
        episodes = derive_episodes(intake.records, cfg.instruments, study.max_session)
        sel = select_episodes(episodes[INSTRUMENT], study, max_episodes=MAX_EPISODES)
        blocks = exact_blocks(sel, study)
        clinics.append(
            Clinic(
                site_id=files.site_id,
                config=files.config_path,
                exact=np.concatenate([blocks[spec.name] for spec in layout]),
                selection=sel,
            )
        )
    return clinics


def compiled_blocks(study: Study, site_config: Path) -> tuple[CompiledBlock, ...]:
    """The measurements the engine of the site ``site_config`` compiles for ``study`` (its
    own ``plan``: the study's privacy request, the layout, the budget split, OpenDP), under
    a policy that allows it at one episode per client. A policy file is written beside the
    site's configuration."""
    policy = site_config.parent / "benchmark-privacy.yaml"
    policy.write_text(
        _POLICY_YAML.format(m=MAX_EPISODES, instrument=study.instrument.id), encoding="utf-8"
    )
    engine = ReleaseEngine(load_site_config(site_config), load_policy(policy))
    return engine.plan(StudyRequest(study)).blocks


def noised(exact: I64, compiled: Sequence[CompiledBlock]) -> I64:
    """``exact`` (..., values) noised block by block with one OpenDP call per block: the
    compiled measurement applied to a vector holding every copy (same scale, independent
    draws per value)."""
    out = np.empty_like(exact)
    at = 0
    for block in compiled:
        size = block.spec.size
        values = exact[..., at : at + size]
        copies = values.size // size
        twin = dataclasses.replace(
            block, spec=dataclasses.replace(block.spec, n_bands=block.spec.n_bands * copies)
        )
        out[..., at : at + size] = twin.release(values.reshape(-1)).reshape(values.shape)
        at += size
    return out


@functools.lru_cache(maxsize=8)
def _epsilon(rho: Fraction, delta: Fraction) -> float:
    return zcdp_to_epsilon(rho, delta)  # OpenDP builds a measurement: once, not per release


def site_release(
    study: Study,
    site_id: str,
    values: I64,
    compiled: Sequence[CompiledBlock],
    *,
    delta: Fraction = Fraction(1, 10**6),
) -> SiteRelease:
    """The release a site's engine would build from these noisy ``values`` (every block,
    concatenated in layout order), with its provenance."""
    blocks, at = [], 0
    for b in compiled:
        spec = b.spec
        blocks.append(
            NoisyBlock(
                name=spec.name,
                family=str(spec.family),
                n_bands=spec.n_bands,
                width=spec.width,
                values=tuple(int(v) for v in values[at : at + spec.size]),
                lo=spec.lo,
                hi=spec.hi,
                sensitivity=b.d_in,
                scale=b.scale,
                rho=b.rho,
            )
        )
        at += spec.size
    rho = sum((b.rho for b in compiled), Fraction(0))
    return SiteRelease(
        study_id=study.id,
        study_hash=study.hash,
        site_id=site_id,
        created="2026-11-27T12:00:00+00:00",
        blocks=tuple(blocks),
        rho=rho,
        epsilon=_epsilon(rho, delta),
        delta=float(delta),
        unit="client",
        max_episodes_per_client=MAX_EPISODES,
        mechanism=MECHANISM,
        window_applied=True,
        versions={"outcomebench": "benchmark", "opendp": OPENDP_VERSION},
    )


def contribution(
    study: Study, site_id: str, values: I64, compiled: Sequence[CompiledBlock]
) -> Contribution:
    """An accepted contribution (verification is ``pool.py``'s business, not accuracy's)."""
    release = site_release(study, site_id, values, compiled)
    return Contribution(site_id=site_id, release=release, sha256="0" * 64)
