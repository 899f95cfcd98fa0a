# SPDX-License-Identifier: Apache-2.0
"""The CA's certificate revocation list (RFC 5280 §5), published at ``/crl``.

One complete CRL per deployment, kept in the database so that every node serves the same one:
it lists the certificates of revoked credentials that the CA issued, each with its revocation
time. It is signed again (its cRLNumber one higher) when a revocation changed what it lists, or
once it is :data:`REFRESH` old, well before its nextUpdate (:data:`LIFETIME`); a long-term
signature (ETSI EN 319 142-1 B-LT) embeds the CRL it was validated with.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server import ca
from server.db import affected
from server.hsm import Hsm, KeyRef
from server.models import Credential, RevocationList, utcnow
from server.services.credentials import REVOKED

ROW_ID: Final = 1
LIFETIME: Final = timedelta(days=7)
"""From a CRL's thisUpdate to its nextUpdate."""
REFRESH: Final = timedelta(days=1)
"""Age at which the CRL is signed again even if no revocation changed it."""


def _revocation_state(session: Session) -> tuple[int, datetime | None]:
    """How many credentials are revoked and when the last one was: revocations only ever add,
    so any new one changes this pair."""
    count, latest = session.execute(
        select(func.count(), func.max(Credential.revoked_at)).where(Credential.status == REVOKED)
    ).one()
    return int(count), latest


def _revoked_certificates(
    session: Session, ca_cert: x509.Certificate, now: datetime
) -> list[tuple[int, datetime]]:
    """(serial, revocation time) of every revoked credential's certificate issued by the CA
    (an imported certificate of another CA is that CA's to list)."""
    rows = session.execute(
        select(Credential.cert_pem, Credential.revoked_at).where(Credential.status == REVOKED)
    ).all()
    revoked: dict[int, datetime] = {}
    for pem, when in rows:
        if pem is None:
            continue
        cert = x509.load_pem_x509_certificate(pem.encode())
        if cert.issuer == ca_cert.subject:
            revoked.setdefault(cert.serial_number, when or now)
    return sorted(revoked.items())


def current_crl(session: Session, hsm: Hsm, ca_ref: KeyRef, ca_cert: x509.Certificate) -> bytes:
    """The CA's current CRL (DER): the stored one while it is fresh and lists every revocation,
    else a new one signed in the HSM and stored in the caller's transaction. When another node
    stores one first, that one is answered (no two CRLs share a number)."""
    count, latest = _revocation_state(session)
    row = session.get(RevocationList, ROW_ID)
    now = utcnow()
    if (
        row is not None
        and (row.revoked, row.last_revoked_at) == (count, latest)
        and now < row.this_update + REFRESH
    ):
        return row.der
    number = row.number + 1 if row is not None else 1
    crl = ca.build_crl(
        hsm,
        ca_ref,
        ca_cert,
        number=number,
        revoked=_revoked_certificates(session, ca_cert, now),
        this_update=now,
        next_update=now + LIFETIME,
    )
    der = crl.public_bytes(Encoding.DER)
    values = {
        "number": number,
        "der": der,
        "this_update": now,
        "next_update": now + LIFETIME,
        "revoked": count,
        "last_revoked_at": latest,
    }
    if row is None:
        try:
            with session.begin_nested():
                session.add(RevocationList(id=ROW_ID, **values))
        except IntegrityError:  # another node stored the first CRL meanwhile
            return _stored(session)
        return der
    stored = session.execute(
        update(RevocationList)
        .where(RevocationList.id == ROW_ID, RevocationList.number == row.number)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not affected(stored):  # another node signed this number first
        return _stored(session)
    return der


def _stored(session: Session) -> bytes:
    row = session.execute(
        select(RevocationList).where(RevocationList.id == ROW_ID),
        execution_options={"populate_existing": True},
    ).scalar_one()
    return row.der
