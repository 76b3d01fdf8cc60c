from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StudyMessage(_message.Message):
    __slots__ = ("study", "envelope")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    study: bytes
    envelope: bytes
    def __init__(self, study: _Optional[bytes] = ..., envelope: _Optional[bytes] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("site_id", "instruments", "families", "approval", "per_study_rho", "budget_rho", "period_days", "delta", "unit", "max_episodes_per_client", "signed_studies_required", "study_schema")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUMENTS_FIELD_NUMBER: _ClassVar[int]
    FAMILIES_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    PER_STUDY_RHO_FIELD_NUMBER: _ClassVar[int]
    BUDGET_RHO_FIELD_NUMBER: _ClassVar[int]
    PERIOD_DAYS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    MAX_EPISODES_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    SIGNED_STUDIES_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    STUDY_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    instruments: _containers.RepeatedScalarFieldContainer[str]
    families: _containers.RepeatedScalarFieldContainer[str]
    approval: str
    per_study_rho: str
    budget_rho: str
    period_days: int
    delta: str
    unit: str
    max_episodes_per_client: int
    signed_studies_required: bool
    study_schema: int
    def __init__(self, site_id: _Optional[str] = ..., instruments: _Optional[_Iterable[str]] = ..., families: _Optional[_Iterable[str]] = ..., approval: _Optional[str] = ..., per_study_rho: _Optional[str] = ..., budget_rho: _Optional[str] = ..., period_days: _Optional[int] = ..., delta: _Optional[str] = ..., unit: _Optional[str] = ..., max_episodes_per_client: _Optional[int] = ..., signed_studies_required: _Optional[bool] = ..., study_schema: _Optional[int] = ...) -> None: ...

class PreviewReply(_message.Message):
    __slots__ = ("preview_json", "error")
    PREVIEW_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    preview_json: bytes
    error: Error
    def __init__(self, preview_json: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("release", "error")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    release: bytes
    error: Error
    def __init__(self, release: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("site_id", "period_start", "period_end", "budget_rho", "spent_rho", "remaining_rho", "pending_requests")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    BUDGET_RHO_FIELD_NUMBER: _ClassVar[int]
    SPENT_RHO_FIELD_NUMBER: _ClassVar[int]
    REMAINING_RHO_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    period_start: str
    period_end: str
    budget_rho: str
    spent_rho: str
    remaining_rho: str
    pending_requests: int
    def __init__(self, site_id: _Optional[str] = ..., period_start: _Optional[str] = ..., period_end: _Optional[str] = ..., budget_rho: _Optional[str] = ..., spent_rho: _Optional[str] = ..., remaining_rho: _Optional[str] = ..., pending_requests: _Optional[int] = ...) -> None: ...
