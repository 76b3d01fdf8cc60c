"""The site's privacy engine: the only package that imports OpenDP.

Public face: the policy, the engine (the one release path) and the ledger.
"""

from site_agent.privacy.engine import (
    Action,
    Decision,
    LedgerUnusable,
    Plan,
    Refused,
    ReleaseEngine,
    StudyRequest,
    load_engine,
    load_study_request,
)
from site_agent.privacy.ledger import Budget, HistoryRow, Ledger, LedgerError, LedgerRefusal
from site_agent.privacy.policy import Approval, PrivacyPolicy, load_policy

__all__ = [
    "Action",
    "Approval",
    "Budget",
    "Decision",
    "HistoryRow",
    "Ledger",
    "LedgerError",
    "LedgerRefusal",
    "LedgerUnusable",
    "Plan",
    "PrivacyPolicy",
    "Refused",
    "ReleaseEngine",
    "StudyRequest",
    "load_engine",
    "load_policy",
    "load_study_request",
]
