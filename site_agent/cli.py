"""``outcomebench-site``: the clinic's command line. Exit codes: see site_agent.errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from site_agent.config import SiteConfig, load_site_config
from site_agent.data import Intake, read_intake
from site_agent.errors import EXIT_HELP, ConfigError, DataError, ExitCode
from site_agent.outcomes import derive_episodes
from site_agent.summary import LOCAL_ONLY, summarize

__all__ = ["main"]

_EXAMPLES = 10


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {int(c):>3}  {h}" for c, h in EXIT_HELP.items())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="outcomebench-site",
        description="outcomebench site agent: checks the clinic's outcome export and "
        "summarises it locally.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", required=True, type=Path, help="the site's site.yaml")
        sp.add_argument("--json", action="store_true", help="print JSON instead of text")
        sp.add_argument(
            "--strict", action="store_true", help="refuse the whole file if any row is invalid"
        )
        sp.add_argument(
            "--quarantine",
            type=Path,
            default=None,
            metavar="PATH",
            help="where to write the quarantine report (CSV; default: "
            "quarantine.csv beside site.yaml). It holds raw values: keep it local.",
        )

    check = sub.add_parser(
        "check",
        help="validate the export and write the quarantine report",
        description="Validate every row of the export. Invalid rows are "
        "listed in the quarantine report with the line, field, value, "
        "reason and fix, and left out.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(check)
    check.set_defaults(run=_check)

    summary = sub.add_parser(
        "summary",
        help="exact local outcome summary (never leaves the site)",
        description=f"Outcome summary per instrument and intake band. {LOCAL_ONLY}",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(summary)
    summary.add_argument(
        "--max-session",
        type=int,
        default=20,
        metavar="K",
        help="trajectories use sessions 1..K (default 20)",
    )
    summary.set_defaults(run=_summary)
    return p


def _intake(args: argparse.Namespace) -> tuple[SiteConfig, Intake, Path, bool]:
    cfg = load_site_config(args.config)
    intake = read_intake(cfg.data, cfg.instruments)
    report = args.quarantine or cfg.source.parent / "quarantine.csv"
    try:
        intake.quarantine.to_csv(report, index=False)
    except OSError as exc:
        raise DataError(
            str(report),
            f"cannot write the quarantine report ({exc.strerror}); "
            "pass --quarantine PATH to a writable place",
        ) from None
    refused = bool(args.strict and len(intake.quarantine))
    return cfg, intake, report, refused


def _check_doc(cfg: SiteConfig, intake: Intake, report: Path, refused: bool) -> dict[str, Any]:
    q = intake.quarantine
    return {
        "site_id": cfg.site_id,
        "scope": LOCAL_ONLY,
        "file": str(intake.path),
        "rows_read": intake.rows_read,
        "rows_valid": intake.records.n_rows,
        "rows_quarantined": intake.rows_quarantined,
        "episodes": intake.records.n_episodes,
        "problems_by_reason": dict(intake.reasons),
        "quarantine_report": str(report),
        "examples": q.head(_EXAMPLES).to_dict(orient="records"),
        "refused": refused,
    }


def _print_check(doc: dict[str, Any]) -> None:
    print(doc["scope"])
    print(f"file: {doc['file']}")
    print(
        f"rows read {doc['rows_read']}, valid {doc['rows_valid']}, quarantined "
        f"{doc['rows_quarantined']}; {doc['episodes']} episodes"
    )
    if doc["problems_by_reason"]:
        print("problems by reason:")
        for reason, n in doc["problems_by_reason"].items():
            print(f"  {n:>9}  {reason}")
        print(f"first {len(doc['examples'])} (all in {doc['quarantine_report']}):")
        for e in doc["examples"]:
            print(
                f"  {e['file']}:{e['line']} {e['field']}={e['value']!r}: {e['reason']}. "
                f"Fix: {e['fix']}"
            )
    if doc["refused"]:
        print("REFUSED (--strict): the file has invalid rows; nothing was used.")


def _check(args: argparse.Namespace) -> int:
    cfg, intake, report, refused = _intake(args)
    doc = _check_doc(cfg, intake, report, refused)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        _print_check(doc)
    if refused:
        return ExitCode.DATA
    if intake.records.n_rows == 0:
        print(f"{intake.path}: no valid rows; see {report}", file=sys.stderr)
        return ExitCode.DATA
    return ExitCode.OK


def _summary(args: argparse.Namespace) -> int:
    if args.max_session < 1:
        print("--max-session must be at least 1", file=sys.stderr)
        return ExitCode.USAGE
    cfg, intake, report, refused = _intake(args)
    if refused:
        print(
            f"{intake.path}: refused under --strict: {intake.rows_quarantined} invalid rows; "
            f"see {report}",
            file=sys.stderr,
        )
        return ExitCode.DATA
    episodes = derive_episodes(intake.records, cfg.instruments, args.max_session)
    doc = {
        "site_id": cfg.site_id,
        "scope": LOCAL_ONLY,
        "file": str(intake.path),
        "rows_valid": intake.records.n_rows,
        "rows_quarantined": intake.rows_quarantined,
        "instruments": summarize(episodes),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_summary(doc)
    return ExitCode.OK


def _print_summary(doc: dict[str, Any]) -> None:
    print(doc["scope"])
    print(
        f"site {doc['site_id']}: {doc['rows_valid']} valid rows from {doc['file']} "
        f"({doc['rows_quarantined']} quarantined)"
    )
    head = (
        f"{'band':>8} {'episodes':>8} {'intake':>7} {'change':>7} {'sd':>6} {'ES':>6} "
        f"{'rel.imp':>7} {'rel.det':>7} {'recov':>6} {'rel.rec':>7} {'resp':>6} {'remis':>6}"
    )

    def fmt(x: Any, w: int) -> str:
        return f"{'-' if x is None else x:>{w}}"

    for ins in doc["instruments"]:
        excluded = ", ".join(f"{v} {k}" for k, v in ins["excluded"].items() if v)
        print(
            f"\n{ins['instrument']} (better: {ins['better']}, cut-off {ins['cutoff']}, "
            f"reliable change {fmt(ins['reliable_change_points'], 0)})"
            + (f"; excluded: {excluded}" if excluded else "")
        )
        print(head)
        for g in ins["groups"]:
            print(
                " ".join(
                    [
                        fmt(g["band"], 8),
                        fmt(g["episodes"], 8),
                        fmt(g["mean_intake"], 7),
                        fmt(g["mean_change"], 7),
                        fmt(g["sd_change"], 6),
                        fmt(g["effect_size"], 6),
                        fmt(g["reliably_improved"], 7),
                        fmt(g["reliably_deteriorated"], 7),
                        fmt(g["recovered"], 6),
                        fmt(g["reliably_recovered"], 7),
                        fmt(g["response"], 6),
                        fmt(g["remission"], 6),
                    ]
                )
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return int(run(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return ExitCode.CONFIG
    except DataError as exc:
        print(str(exc), file=sys.stderr)
        return ExitCode.DATA
    except BrokenPipeError:  # the reader (e.g. `| head`) went away: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return ExitCode.OK
    except KeyboardInterrupt:
        return ExitCode.INTERNAL
    except Exception as exc:
        print(
            f"internal error ({exc.__class__.__name__}): this is a bug, please report it",
            file=sys.stderr,
        )
        return ExitCode.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
