"""The ``outcomebench-coordinator`` command.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: it adds its own arguments and
runs with the parsed namespace. A command reports failure by raising
:class:`CommandError` with an :class:`ExitCode`; :func:`main` prints the message on stderr
and returns the code, so ``main`` can be called from tests without catching SystemExit.

Exit codes (each has help text in :data:`EXIT_CODE_HELP`, shown by ``--help``):

    0  OK              the command did what was asked
    1  INTERNAL_ERROR  an unexpected error: this is a bug, please report it
    2  USAGE           the command line is wrong (argparse uses 2 as well)
    3  OUTPUT_ERROR    an output file or directory could not be written
    4  INPUT_ERROR     a study, release or key file is invalid
    5  QUORUM          fewer valid releases than the study's min_sites: nothing published
    6  VERIFY_FAILED   a bundle does not match its signed manifest
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import crypto
from coordinator.clinic_sizes import DEFAULT_CLIENTS_RANGE, MIN_CLIENTS
from coordinator.estimates import estimate_all
from coordinator.pooling import (
    Contribution,
    QuorumNotReached,
    Rejection,
    load_release_file,
    pool,
    require_quorum,
    site_keys,
)
from coordinator.publish import benchmark_document, verify_bundle, write_bundle
from coordinator.study import load_study
from protocols import SpecError, builtin_instruments
from protocols.study import Study

if TYPE_CHECKING:
    from coordinator.synth import SiteFiles

__all__ = [
    "COMMANDS",
    "EXIT_CODE_HELP",
    "Command",
    "CommandError",
    "ExitCode",
    "build_parser",
    "main",
]

PROG = "outcomebench-coordinator"


class ExitCode(IntEnum):
    """What the process exit status means."""

    OK = 0
    INTERNAL_ERROR = 1
    USAGE = 2
    OUTPUT_ERROR = 3
    INPUT_ERROR = 4
    QUORUM = 5
    VERIFY_FAILED = 6
    INTERRUPTED = 130


EXIT_CODE_HELP: Mapping[ExitCode, str] = MappingProxyType(
    {
        ExitCode.OK: "the command did what was asked",
        ExitCode.INTERNAL_ERROR: "an unexpected error: this is a bug, please report it",
        ExitCode.USAGE: "the command line is wrong; see --help",
        ExitCode.OUTPUT_ERROR: "an output file or directory could not be written",
        ExitCode.INPUT_ERROR: "a study, release or key file is invalid",
        ExitCode.QUORUM: "fewer valid releases than the study's min_sites: nothing was published",
        ExitCode.VERIFY_FAILED: "the bundle does not match its signed manifest",
        ExitCode.INTERRUPTED: "interrupted (Ctrl-C): every process the command started was stopped",
    }
)


class CommandError(Exception):
    """A command failed in a way the user can fix; ``message`` says how."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """One subcommand: its name, one-line help, arguments and what it runs."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO], ExitCode]


def _whole_number(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
        return value

    return parse


# --- synth -----------------------------------------------------------------------------


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sites",
        type=_whole_number(1),
        required=True,
        metavar="N",
        help="number of clinics to write (at least 1)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory to write DIR/clinic-01/{outcomes.csv,site.yaml}, ...",
    )
    parser.add_argument(
        "--seed",
        type=_whole_number(0),
        default=0,
        metavar="S",
        help="random seed; the same seed writes byte-identical files (default: %(default)s)",
    )
    parser.add_argument(
        "--messy",
        action="store_true",
        help="inject a few percent of bad rows of every kind real exports have",
    )
    parser.add_argument(
        "--instrument",
        default="PHQ-9",
        choices=sorted(builtin_instruments()),
        metavar="ID",
        help="outcome measure, a registry id (default: %(default)s)",
    )
    parser.add_argument(
        "--clients-min",
        type=_whole_number(MIN_CLIENTS),
        metavar="A",
        help=f"smallest clinic, in clients (default: {DEFAULT_CLIENTS_RANGE[0]})",
    )
    parser.add_argument(
        "--clients-max",
        type=_whole_number(MIN_CLIENTS),
        metavar="B",
        help=f"largest clinic, in clients (default: {DEFAULT_CLIENTS_RANGE[1]}); "
        "sizes are drawn log-uniformly between the two",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the sites written as JSON instead of a table"
    )


def _synth_run(args: argparse.Namespace, stdout: TextIO) -> ExitCode:
    clients_range: tuple[int, int] | None = None
    if args.clients_min is not None or args.clients_max is not None:
        lo = args.clients_min if args.clients_min is not None else DEFAULT_CLIENTS_RANGE[0]
        hi = args.clients_max if args.clients_max is not None else DEFAULT_CLIENTS_RANGE[1]
        if lo > hi:
            raise CommandError(
                ExitCode.USAGE,
                f"--clients-min {lo} is larger than --clients-max {hi}; "
                "swap them or widen the range",
            )
        clients_range = (lo, hi)
    from coordinator.synth import synthesize  # noqa: PLC0415 - pandas only to write data

    out: Path = args.out
    try:
        sites = synthesize(
            args.sites,
            out,
            seed=args.seed,
            messy=args.messy,
            instrument=args.instrument,
            clients_range=clients_range,
        )
    except SpecError as exc:
        raise CommandError(ExitCode.USAGE, "; ".join(exc.problems)) from None
    except ValueError as exc:
        raise CommandError(ExitCode.USAGE, str(exc)) from None
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        where = exc.filename if exc.filename is not None else out
        raise CommandError(
            ExitCode.OUTPUT_ERROR,
            f"cannot write to {where}: {reason}; choose a writable --out directory",
        ) from None
    if args.json:
        stdout.write(json.dumps(_sites_json(sites, args), indent=2) + "\n")
    else:
        stdout.write(_sites_table(sites, args))
    return ExitCode.OK


def _sites_json(sites: Sequence[SiteFiles], args: argparse.Namespace) -> dict[str, object]:
    return {
        "out": str(args.out),
        "seed": args.seed,
        "instrument": args.instrument,
        "messy": args.messy,
        "sites": [
            {
                "site_id": s.site_id,
                "directory": str(s.directory),
                "data_path": str(s.data_path),
                "config_path": str(s.config_path),
                "n_clients": s.n_clients,
                "n_rows": s.n_rows,
                "n_bad_rows": s.n_bad_rows,
            }
            for s in sites
        ],
    }


def _sites_table(sites: Sequence[SiteFiles], args: argparse.Namespace) -> str:
    header = ("site", "clients", "rows", "bad rows", "config")
    body = [
        (s.site_id, f"{s.n_clients:,}", f"{s.n_rows:,}", f"{s.n_bad_rows:,}", str(s.config_path))
        for s in sites
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    right = (False, True, True, True, False)

    def line(row: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
        ]
        return "  ".join(cells).rstrip()

    lines = [line(header), *(line(row) for row in body)]
    clients = sum(s.n_clients for s in sites)
    rows = sum(s.n_rows for s in sites)
    lines.append(
        f"{len(sites)} synthetic clinic(s), {clients:,} clients, {rows:,} rows of "
        f"{args.instrument} written to {args.out} (seed {args.seed}"
        f"{', messy' if args.messy else ''})"
    )
    return "\n".join(lines) + "\n"


_SYNTH = Command(
    name="synth",
    help="write synthetic clinics (outcomes.csv + site.yaml each)",
    description=(
        "Write N synthetic clinics under DIR, one directory each with outcomes.csv (the "
        "clinic's own column names) and site.yaml (mapping them). Clinics differ in size, "
        "case mix and effectiveness; scores follow published routine-care figures. Not "
        "real client data."
    ),
    add_arguments=_synth_arguments,
    run=_synth_run,
)

# --- keys, studies, pooling, verification ----------------------------------------------


def _keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for NAME.key.pem (owner-only) and NAME.pub.pem",
    )
    parser.add_argument("--name", default="network", help="key name (default: %(default)s)")


def _keygen_run(args: argparse.Namespace, stdout: TextIO) -> ExitCode:
    try:
        private, public = crypto.generate_keypair(args.out, args.name)
    except FileExistsError:
        raise CommandError(
            ExitCode.OUTPUT_ERROR,
            f"{args.out / args.name}.key.pem exists; refusing to overwrite a key",
        ) from None
    except OSError as exc:
        raise CommandError(ExitCode.OUTPUT_ERROR, f"{args.out}: {exc.strerror}") from None
    print(
        f"private key {private} (keep it secret)\npublic key  {public} (give it to sites "
        "to trust, and to readers to verify bundles)",
        file=stdout,
    )
    return ExitCode.OK


def _read_study(path: Path) -> Study:
    try:
        return load_study(path)
    except SpecError as exc:
        raise CommandError(ExitCode.INPUT_ERROR, str(exc)) from None


def _private_key(path: Path) -> Ed25519PrivateKey:
    try:
        return crypto.load_private(path)
    except (OSError, ValueError) as exc:
        raise CommandError(
            ExitCode.INPUT_ERROR,
            f"{path}: cannot load an Ed25519 private key "
            f"({exc.__class__.__name__}); create one with `{PROG} keygen`",
        ) from None


def _sign_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", type=Path, required=True, help="study.yaml")
    parser.add_argument(
        "--signing-key",
        type=Path,
        required=True,
        metavar="KEY",
        help="the network's private key (NAME.key.pem)",
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the signed study")


def _sign_study_run(args: argparse.Namespace, stdout: TextIO) -> ExitCode:
    study = _read_study(args.study)
    env = crypto.sign(_private_key(args.signing_key), "study", study.canonical_bytes())
    _write(args.out, env.dumps())
    print(f"signed study {study.id} ({study.hash}) written to {args.out}", file=stdout)
    return ExitCode.OK


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CommandError(ExitCode.OUTPUT_ERROR, f"{path}: {exc.strerror}") from None


def _pool_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", type=Path, required=True, help="study.yaml or signed study")
    parser.add_argument(
        "--releases",
        type=Path,
        nargs="+",
        required=True,
        metavar="PATH",
        help="signed release files from the sites",
    )
    parser.add_argument(
        "--keys",
        type=Path,
        required=True,
        metavar="SITE_KEYS_DIR",
        help="registered site keys: <site id>.pub.pem",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="BUNDLE_DIR",
        help="a new directory for the signed bundle",
    )
    parser.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        metavar="KEY",
        help="the network's publication key (default: SITE_KEYS_DIR/network.key.pem)",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="pool the valid releases and list the invalid ones in the bundle "
        "as missing, instead of refusing",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def _pool_run(args: argparse.Namespace, stdout: TextIO) -> ExitCode:
    study = _read_study(args.study)
    try:
        keys = site_keys(args.keys)
    except SpecError as exc:
        raise CommandError(ExitCode.INPUT_ERROR, str(exc)) from None
    key = _private_key(args.signing_key or args.keys / "network.key.pem")
    accepted: list[Contribution] = []
    rejected: list[Rejection] = []
    seen: dict[str, Path] = {}
    for path in args.releases:
        result = load_release_file(path, study, keys)
        if isinstance(result, Rejection):
            rejected.append(result)
        elif result.site_id in seen:
            rejected.append(
                Rejection(
                    str(path),
                    f"site {result.site_id} is already counted from {seen[result.site_id]}",
                )
            )
        else:
            seen[result.site_id] = path
            accepted.append(result)
    if rejected and not args.skip_invalid:
        lines = "\n".join(f"  {r.source}: {r.reason}" for r in rejected)
        raise CommandError(
            ExitCode.INPUT_ERROR,
            f"refused {len(rejected)} release(s):\n{lines}"
            "\nfix or remove them, or pass --skip-invalid; nothing was published",
        )
    try:
        require_quorum(study, accepted)
    except QuorumNotReached as exc:
        raise CommandError(ExitCode.QUORUM, str(exc)) from None
    pooled = pool(study, accepted)
    doc = benchmark_document(pooled, estimate_all(pooled), rejected)
    try:
        files = write_bundle(args.out, doc, key)
    except (OSError, FileExistsError) as exc:
        raise CommandError(ExitCode.OUTPUT_ERROR, str(exc)) from None
    summary = {
        "bundle": str(args.out),
        "study_id": study.id,
        "study_hash": study.hash,
        "sites": [c.site_id for c in accepted],
        "missing": [{"site": r.source, "reason": r.reason} for r in rejected],
        "files": [f.name for f in files],
        "report": str(args.out / "report.html"),
    }
    if args.json:
        print(json.dumps(summary, indent=2), file=stdout)
    else:
        print(
            f"pooled {len(accepted)} site(s) for {study.id}; bundle {args.out} "
            f"({len(files)} files, signed); report: {args.out / 'report.html'}",
            file=stdout,
        )
    return ExitCode.OK


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    parser.add_argument(
        "--key",
        type=Path,
        required=True,
        metavar="NETWORK_PUB",
        help="the network's public key (NAME.pub.pem)",
    )


def _verify_run(args: argparse.Namespace, stdout: TextIO) -> ExitCode:
    try:
        key = crypto.load_public(args.key)
    except (OSError, ValueError) as exc:
        raise CommandError(
            ExitCode.INPUT_ERROR,
            f"{args.key}: not an Ed25519 public key ({exc.__class__.__name__})",
        ) from None
    problems = verify_bundle(args.bundle, key)
    if problems:
        raise CommandError(
            ExitCode.VERIFY_FAILED,
            "bundle does NOT verify:\n" + "\n".join(f"  {p}" for p in problems),
        )
    print(f"bundle {args.bundle} verifies: every file is exactly as signed", file=stdout)
    return ExitCode.OK


_KEYGEN = Command(
    name="keygen",
    help="create an Ed25519 key pair (network publication key)",
    description="Create NAME.key.pem (owner-only) and NAME.pub.pem: the key "
    "that signs studies and benchmark bundles.",
    add_arguments=_keygen_arguments,
    run=_keygen_run,
)
_SIGN_STUDY = Command(
    name="sign-study",
    help="sign a study with the network's key",
    description="Write the study's canonical form signed with the network's "
    "key; sites that list the public key in trusted_coordinator_keys accept "
    "only such studies.",
    add_arguments=_sign_study_arguments,
    run=_sign_study_run,
)
_POOL = Command(
    name="pool",
    help="pool signed site releases into a signed benchmark bundle",
    description="Verify each release against its site's registered key and the "
    "study hash, pool them (no privacy cost), derive the benchmarks with 95% "
    "intervals that include the DP noise, and write benchmark.json, CSVs, "
    "report.html and a signed MANIFEST.json into BUNDLE_DIR.",
    add_arguments=_pool_arguments,
    run=_pool_run,
)
_VERIFY = Command(
    name="verify",
    help="verify a benchmark bundle against the network key",
    description="Check MANIFEST.json's signature and that every file is exactly "
    "as signed: fails on any changed, added or missing file.",
    add_arguments=_verify_arguments,
    run=_verify_run,
)

# --- demo -------------------------------------------------------------------------------

_DEMO_MARKER = ".outcomebench-demo"


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sites",
        type=_whole_number(3),
        default=5,
        metavar="N",
        help="number of synthetic clinics (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outcomebench-demo"),
        metavar="DIR",
        help="working directory for the demo network (default: %(default)s)",
    )
    parser.add_argument("--seed", type=_whole_number(0), default=1, metavar="S")
    parser.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds the ServerApp waits for the sites' replies",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="delete an earlier demo in --out first (otherwise it is kept and the demo stops)",
    )
    parser.add_argument(
        "--engine",
        choices=("deployment", "simulation"),
        default="deployment",
        help="deployment: real daemons with TLS and node authentication "
        "(default); simulation: Flower's simulation engine, one virtual node "
        "per clinic, e.g. --sites 200",
    )


def _demo_run(args: argparse.Namespace, stdout: TextIO) -> ExitCode:
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not (out / _DEMO_MARKER).exists():
            raise CommandError(
                ExitCode.USAGE, f"{out} exists and is not a demo directory; choose another --out"
            )
        if not args.replace:
            raise CommandError(
                ExitCode.USAGE,
                f"{out} holds an earlier demo (its bundle, keys and logs); pass --replace to "
                "delete it and run again, or choose another --out",
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / _DEMO_MARKER).write_text("created by outcomebench-coordinator demo\n")
    from coordinator.demo import DemoError, run_demo, run_simulation  # noqa: PLC0415 - Flower

    try:
        run = run_simulation if args.engine == "simulation" else run_demo
        result = run(
            out.resolve(), n_sites=args.sites, seed=args.seed, timeout=args.timeout, log=stdout
        )
    except DemoError as exc:
        raise CommandError(ExitCode.QUORUM, str(exc)) from None
    print(
        f"\nbenchmark bundle verified: {result.bundle}\n"
        f"report:             {result.bundle / 'report.html'}\n"
        f"network public key: {result.network_key}\n"
        f"study:              {result.study}\n"
        f"site configs:       {result.sites}/<site>/site.yaml and privacy.yaml\n"
        f"logs:               {result.logs}",
        file=stdout,
    )
    return ExitCode.OK


_DEMO = Command(
    name="demo",
    help="run the demo network on synthetic clinics, end to end",
    description="Synthesize clinics, start a local network on loopback (SuperLink "
    "with TLS, node authentication and a database; one site agent and one "
    "SuperNode per clinic), run a study, verify the signed bundle, print where "
    "report.html is, and stop every process it started.",
    add_arguments=_demo_arguments,
    run=_demo_run,
)

COMMANDS: tuple[Command, ...] = (_SYNTH, _KEYGEN, _SIGN_STUDY, _POOL, _VERIFY, _DEMO)


# --- entry point -----------------------------------------------------------------------


def _exit_code_epilog() -> str:
    lines = ["exit codes:"]
    lines += [f"  {code.value}  {code.name:<15} {EXIT_CODE_HELP[code]}" for code in ExitCode]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Coordinate federated, differentially private outcome benchmarks.",
        epilog=_exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(
            command.name,
            help=command.help,
            description=textwrap.fill(command.description, 80),
            epilog=_exit_code_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(child)
        child.set_defaults(_command=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return exc.code if isinstance(exc.code, int) else int(ExitCode.USAGE)
    command: Command | None = getattr(args, "_command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    try:
        return int(command.run(args, sys.stdout))
    except KeyboardInterrupt:
        # The commands stop what they started in `finally` blocks, which have run by now.
        print(f"\n{PROG} {command.name}: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except CommandError as exc:
        print(f"{PROG} {command.name}: error: {exc.message}", file=sys.stderr)
        return int(exc.code)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(
            f"{PROG} {command.name}: internal error ({exc.__class__.__name__}); this is a "
            "bug, please report it with the traceback above",
            file=sys.stderr,
        )
        return int(ExitCode.INTERNAL_ERROR)
