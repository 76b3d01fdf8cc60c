"""The site's privacy engine: the only package that imports OpenDP.

Public face: the policy, the engine (the one release path) and the ledger.
"""

from site_agent.privacy.engine import (
    Plan,
    Refused,
    ReleaseEngine,
    StudyRequest,
    load_engine,
    load_study_request,
)
from site_agent.privacy.ledger import Budget, Ledger, LedgerRefusal
from site_agent.privacy.policy import Approval, PrivacyPolicy, load_policy

__all__ = [
    "Approval",
    "Budget",
    "Ledger",
    "LedgerRefusal",
    "Plan",
    "PrivacyPolicy",
    "Refused",
    "ReleaseEngine",
    "StudyRequest",
    "load_engine",
    "load_policy",
    "load_study_request",
]
