"""Error codes that may cross the wire: a code and its fixed message, never exception text.

Each code has a distinct process exit code for the site CLI, so a script can tell a
budget refusal from a malformed study without parsing text.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["MESSAGES", "ErrorCode", "exit_code"]


class ErrorCode(StrEnum):
    BUDGET_EXHAUSTED = "budget_exhausted"
    OVER_STUDY_CAP = "over_study_cap"
    NOT_ALLOWED = "not_allowed"
    MALFORMED_STUDY = "malformed_study"
    STUDY_CONFLICT = "study_conflict"
    UNTRUSTED_STUDY = "untrusted_study"
    PENDING_APPROVAL = "pending_approval"
    DENIED = "denied"
    INVALID_DATA = "invalid_data"
    INTERNAL_ERROR = "internal_error"


MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.BUDGET_EXHAUSTED: "the site's privacy budget for this period cannot cover this study",
    ErrorCode.OVER_STUDY_CAP: "the study asks for more privacy loss than the site allows per study",
    ErrorCode.NOT_ALLOWED: "the site's policy does not allow this instrument or statistic family",
    ErrorCode.MALFORMED_STUDY: "the study request is malformed",
    ErrorCode.STUDY_CONFLICT: "a different study with the same id was already answered",
    ErrorCode.UNTRUSTED_STUDY: "the study is not signed by a coordinator key the site trusts",
    ErrorCode.PENDING_APPROVAL: "the study awaits the privacy officer's approval",
    ErrorCode.DENIED: "the privacy officer denied this study",
    ErrorCode.INVALID_DATA: "the site's data cannot answer this study",
    ErrorCode.INTERNAL_ERROR: "internal error at the site",
}

_EXIT = {code: 10 + i for i, code in enumerate(ErrorCode)}


def exit_code(code: ErrorCode) -> int:
    """The site CLI's exit code for a refusal: 10 + the code's position (10..19)."""
    return _EXIT[code]
