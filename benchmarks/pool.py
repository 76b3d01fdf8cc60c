"""Benchmark: pooling 1,000 signed site releases into a signed benchmark bundle.

The releases answer one full study (PHQ-9, bands 0-9/10-14/15-19/20-27, all five
statistic families, K = 20 sessions, rho 0.05 per site: 18 blocks, 516 values each). Their
contents come from the site's own pipeline on ten synthetic clinics (``synthesize`` ->
``read_intake`` -> ``derive_episodes`` -> ``select_episodes`` -> ``exact_blocks``), site i
taking clinic i mod 10, noised by the engine's compiled OpenDP measurements; each site has
its own Ed25519 key, registered as ``<site id>.pub.pem`` in the keys directory, and signs
its release exactly as the engine does (``site_agent.crypto.sign``). Building them is not
timed.

Timed:

- ``command``: ``outcomebench-coordinator pool --study ... --releases <1000 files> --keys
  ... --out ...`` in a fresh interpreter, end to end (start-up and imports included);
- the same work in this process, phase by phase: reading and verifying the 1,000 files
  (``load_release_file``: signature, study hash, layout), ``pool``, ``estimate_all``, and
  ``benchmark_document`` + ``write_bundle`` (JSON, CSVs, report.html, signed manifest).

The bundle is then verified (``verify_bundle``) and must contain all 1,000 sites.

Target: the command under 5 s. The exit status is 0 whether the target passes or not;
non-zero on errors.

Usage::

    python benchmarks/pool.py
    python benchmarks/pool.py --releases 200 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import yaml
from clinics import ALL_FAMILIES, compiled_blocks, load_clinics, noised, site_release, study_draft
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import crypto as network_crypto
from coordinator.estimates import estimate_all
from coordinator.pooling import Contribution, load_release_file, pool, site_keys
from coordinator.publish import benchmark_document, verify_bundle, write_bundle
from protocols.study import Study, parse_study
from site_agent import crypto as site_crypto

RHO = Fraction(1, 20)
DELTA = Fraction(1, 10**6)
TARGET_S = 5.0


def draft(n_sites: int) -> dict[str, object]:
    """The study as the research network writes it (study.yaml)."""
    return study_draft(
        "pool-benchmark",
        "pooling many releases",
        ALL_FAMILIES,
        {"rho": float(RHO)},
        min_sites=n_sites,
    )


def write_releases(study: Study, n_sites: int, root: Path) -> list[Path]:
    """``n_sites`` signed releases under ``root/releases``, keys under ``root/keys``."""
    clinics = load_clinics(10, 2026, study, root / "clinics")
    compiled = compiled_blocks(study, clinics[0].config)
    exact = np.stack([clinics[i % len(clinics)].exact for i in range(n_sites)])
    values = noised(exact, compiled)
    (root / "keys").mkdir()
    (root / "releases").mkdir()
    network_crypto.generate_keypair(root / "keys", "network")
    paths = []
    for i in range(n_sites):
        site_id = f"site-{i:04d}"
        key = Ed25519PrivateKey.generate()
        (root / "keys" / f"{site_id}.pub.pem").write_text(site_crypto.public_pem(key))
        release = site_release(study, site_id, values[i], compiled, delta=DELTA)
        path = root / "releases" / f"{site_id}.json"
        path.write_text(site_crypto.sign(key, "release", release.canonical_bytes()).dumps())
        paths.append(path)
    return paths


def run_command(study_path: Path, releases: list[Path], root: Path, out: Path) -> float:
    env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    argv = [
        sys.executable,
        "-m",
        "coordinator",
        "pool",
        "--study",
        str(study_path),
        "--releases",
        *map(str, releases),
        "--keys",
        str(root / "keys"),
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"pool exited {done.returncode}: {done.stderr.strip()}")
    return elapsed


def run_phases(study: Study, releases: list[Path], root: Path, out: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    keys = site_keys(root / "keys")
    start = time.perf_counter()
    loaded = [load_release_file(p, study, keys) for p in releases]
    times["read + verify"] = time.perf_counter() - start
    accepted = [c for c in loaded if isinstance(c, Contribution)]
    if len(accepted) != len(releases):
        raise RuntimeError(f"{len(releases) - len(accepted)} releases refused: {loaded[:1]}")
    t = time.perf_counter()
    pooled = pool(study, accepted)
    times["pool"] = time.perf_counter() - t
    t = time.perf_counter()
    tables = estimate_all(pooled)
    times["estimate_all"] = time.perf_counter() - t
    t = time.perf_counter()
    doc = benchmark_document(pooled, tables, [])
    write_bundle(out, doc, network_crypto.load_private(root / "keys" / "network.key.pem"))
    times["document + bundle"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--releases", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="best of R (default %(default)s)")
    args = ap.parse_args(argv)
    doc = draft(args.releases)
    study = parse_study(doc)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        releases = write_releases(study, args.releases, root)
        built = time.perf_counter() - t
        study_path = root / "study.yaml"
        study_path.write_text(yaml.safe_dump({"study": doc}))
        size = sum(p.stat().st_size for p in releases)
        print(
            f"{args.releases} signed releases of study {study.id} "
            f"({size / len(releases) / 1024:.1f} KiB each, {size / 2**20:.1f} MiB in all), "
            f"built in {built:.1f} s (not timed)"
        )
        commands, phases = [], []
        for r in range(args.repeat):
            commands.append(run_command(study_path, releases, root, root / f"bundle-cmd-{r}"))
            phases.append(run_phases(study, releases, root, root / f"bundle-{r}"))
        public = network_crypto.load_public(root / "keys" / "network.pub.pem")
        for bundle in (root / "bundle-cmd-0", root / "bundle-0"):
            problems = verify_bundle(bundle, public)
            bench = json.loads((bundle / "benchmark.json").read_text())
            n = len(bench["sites"]["contributed"])
            if problems or n != args.releases:
                raise RuntimeError(f"{bundle}: {problems or f'{n} sites'}")
    print(f"best of {args.repeat}; bundles verified, {args.releases} sites each")
    print(f"{'phase':<22}{'seconds':>9}")
    print("-" * 31)
    for name in phases[0]:
        print(f"{name:<22}{min(p[name] for p in phases):>9.3f}")
    best = min(commands)
    print(f"{'command (fresh python)':<22}{best:>9.3f}")
    verdict = "PASS" if best < TARGET_S else "FAIL"
    print(f"target: command under {TARGET_S:g} s: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
