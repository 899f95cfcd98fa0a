"""Logging (``/api/v1/admin/audit``, admin token only): verify and export the hash-chained
audit log (rule 7)."""

from __future__ import annotations

from sqlalchemy import func, select

from server.api.deps import SessionDep
from server.api.errors import documented_errors
from server.api.pipeline import AdminDep, APIRouter
from server.models import AuditRecord
from server.schemas import AuditRecordOut, AuditVerifyResponse
from server.services import audit

router = APIRouter(
    prefix="/api/v1/admin/audit",
    tags=["Logging"],
    responses=documented_errors(401, 403),
)


@router.get("/verify")
def verify(session: SessionDep, _admin: AdminDep) -> AuditVerifyResponse:
    """Check the whole chain; a broken one names its first bad record."""
    bad = audit.verify(session)
    records = session.scalar(select(func.count()).select_from(AuditRecord)) or 0
    if bad is None:
        return AuditVerifyResponse(ok=True, records=records)
    return AuditVerifyResponse(ok=False, records=records, first_bad=bad.seq, reason=bad.reason)


@router.get("/export")
def export(session: SessionDep, _admin: AdminDep) -> list[AuditRecordOut]:
    """Every record, oldest first."""
    return [AuditRecordOut.model_validate(r) for r in audit.export(session)]


routers = [router]
