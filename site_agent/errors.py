"""Errors of the site agent and the exit codes its CLI returns.

    ValueError
    ├── protocols.SpecError      a YAML specification is invalid (lists every problem)
    │   └── ConfigError          the site configuration is invalid
    └── DataError                the data file cannot be used at all (missing, unreadable,
                                 no valid rows, or refused whole under --strict)

Row-level problems are not exceptions: they go to the quarantine report.
"""

from __future__ import annotations

from enum import IntEnum

from protocols.codes import MESSAGES, ErrorCode
from protocols.errors import SpecError, printable

__all__ = ["EXIT_HELP", "ConfigError", "DataError", "ExitCode", "refusal_exit"]


class ConfigError(SpecError):
    """The site configuration (site.yaml, or a file it names) is invalid."""


class DataError(ValueError):
    """The outcome export cannot be used; the message names the file and the fix. It may
    quote the file's header: control characters are escaped (protocols.errors.printable)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(printable(f"{path}: {message}"))


class ExitCode(IntEnum):
    """Exit codes of ``outcomebench-site``; every code has help text in EXIT_HELP.

    10-19 are refusals of a study, one per protocol error code (protocols.codes).
    """

    OK = 0
    USAGE = 2
    CONFIG = 3
    DATA = 4
    AUDIT = 5
    BUDGET_EXHAUSTED = 10
    OVER_STUDY_CAP = 11
    NOT_ALLOWED = 12
    MALFORMED_STUDY = 13
    STUDY_CONFLICT = 14
    UNTRUSTED_STUDY = 15
    PENDING_APPROVAL = 16
    DENIED = 17
    INVALID_DATA = 18
    INTERNAL_ERROR = 19
    INTERNAL = 70


EXIT_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.USAGE: "the command line was wrong: see --help",
    ExitCode.CONFIG: "the site configuration is invalid: every problem is listed with its fix",
    ExitCode.DATA: "the data file cannot be used (missing, unreadable, no valid rows, or "
    "refused whole under --strict); see the quarantine report",
    ExitCode.AUDIT: "the audit log failed verification (edited, reordered or truncated), or "
    "the ledger, its anchor or the signing key is missing, unusable (state dir not a "
    "writable directory, ledger not a SQLite database) or does not match: the message says "
    "which file and the fix",
    **{ExitCode[c.name]: f"refused: {MESSAGES[c]}" for c in ErrorCode},
    ExitCode.INTERNAL: "internal error: this is a bug, please report it",
}


def refusal_exit(code: ErrorCode) -> ExitCode:
    return ExitCode[code.name]
