"""The committed gRPC code is exactly what grpcio-tools makes of site_agent.proto."""

from __future__ import annotations

from pathlib import Path

from protocols import site_agent_pb2 as pb
from protocols import site_agent_pb2_grpc as pb_grpc
from protocols.generate import GENERATED, PROTO, ROOT, generate


def test_committed_code_matches_the_proto(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    for name, new in zip(GENERATED, fresh, strict=True):
        committed = ROOT / name
        assert committed.read_bytes() == new.read_bytes(), (
            f"{name} is stale: run `python -m protocols.generate` after editing {PROTO}"
        )


def test_generated_code_imports_from_the_package() -> None:
    service = pb.DESCRIPTOR.services_by_name["SiteAgent"]
    assert service.full_name == "outcomebench.site.v1.SiteAgent"
    assert [m.name for m in service.methods] == ["Describe", "Preview", "Release", "Status"]
    assert pb_grpc.SiteAgentStub.__module__ == "protocols.site_agent_pb2_grpc"
    assert pb.DESCRIPTOR.name == PROTO


def test_replies_carry_a_release_or_an_error_never_both() -> None:
    reply = pb.ReleaseReply(release=b"{}")
    reply.error.code = "not_allowed"
    assert reply.WhichOneof("result") == "error" and not reply.release
    assert pb.StudyMessage(study=b"x").HasField("envelope") is False
    assert pb.StudyMessage(study=b"x", envelope=b"").HasField("envelope") is True
