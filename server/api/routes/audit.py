"""Logging (``/api/v1/admin/audit``, admin token only): verify and export the hash-chained,
HSM-anchored audit log, and sign checkpoints of it (rule 7)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select

from server.api.deps import SessionDep
from server.api.errors import documented_errors
from server.api.pipeline import AdminDep, APIRouter
from server.models import AuditRecord
from server.schemas import (
    AuditCheckpoint,
    AuditRecordOut,
    AuditVerifyRequest,
    AuditVerifyResponse,
)
from server.services import audit

router = APIRouter(
    prefix="/api/v1/admin/audit",
    tags=["Logging"],
    responses=documented_errors(401, 403),
)


def _verify(session: SessionDep, checkpoints: Iterable[audit.Checkpoint]) -> AuditVerifyResponse:
    bad = audit.verify(session, checkpoints)
    records = session.scalar(select(func.count()).select_from(AuditRecord)) or 0
    if bad is None:
        return AuditVerifyResponse(ok=True, records=records)
    return AuditVerifyResponse(ok=False, records=records, first_bad=bad.seq, reason=bad.reason)


@router.get("/verify")
def verify(session: SessionDep, _admin: AdminDep) -> AuditVerifyResponse:
    """Check the whole chain and its MACs; a broken one names its first bad record."""
    return _verify(session, ())


@router.post("/verify", responses=documented_errors(400))
def verify_against(
    session: SessionDep, _admin: AdminDep, body: AuditVerifyRequest
) -> AuditVerifyResponse:
    """Check the chain and that it still holds what the given checkpoints saw (a truncated or
    wiped chain fails here); a checkpoint this server's HSM did not sign fails too."""
    return _verify(session, (audit.Checkpoint(**c.model_dump()) for c in body.checkpoints))


@router.get("/checkpoint")
def checkpoint(session: SessionDep, _admin: AdminDep) -> AuditCheckpoint:
    """A checkpoint of the chain as it is now, signed with the HSM's audit key, to keep
    outside the database (``cardbridge admin audit checkpoint``)."""
    return AuditCheckpoint(**vars(audit.checkpoint(session)))


@router.get("/export")
def export(session: SessionDep, _admin: AdminDep) -> list[AuditRecordOut]:
    """Every record, oldest first."""
    return [AuditRecordOut.model_validate(r) for r in audit.export(session)]


routers = [router]
