# SPDX-License-Identifier: Apache-2.0
"""The deployment that every server node of one database belongs to (DESIGN.md "Storage and
scale"): its CA and its time-stamping authority, whose keys are on the HSM token that every
node reaches. ``server init`` records it once; ``server join`` adds a node to it; ``server
init`` on a database that already holds one refuses instead of forking it (a second CA, token
and admin token on the same users).
"""

from __future__ import annotations

from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.db import affected
from server.errors import Conflict, NotFound
from server.hsm import KeyAlg, KeyRef
from server.models import AuditHead, Deployment
from server.services import audit

ROW_ID = 1
FORK_REFUSED = (
    "the database already holds a deployment; add this node to it with `cardbridge server "
    "join --data DIR --db URL --hsm-module PATH --hsm-pin-file F` instead"
)


def find(session: Session) -> Deployment | None:
    """The database's deployment, or None before ``server init`` recorded one."""
    return session.get(Deployment, ROW_ID)


def in_use(session: Session) -> bool:
    """Whether the database holds the records of a deployment (its audit log is not empty),
    recorded or not (one set up before deployments were recorded has no row)."""
    return bool(session.scalar(select(AuditHead.last_seq)))


def ca_of(row: Deployment) -> tuple[KeyRef, x509.Certificate]:
    """The deployment's CA: its key in the HSM and its certificate."""
    cert = x509.load_pem_x509_certificate(row.ca_cert_pem.encode())
    return KeyRef(row.ca_key_id, KeyAlg(row.ca_key_alg)), cert


def tsa_of(row: Deployment) -> tuple[KeyRef, x509.Certificate]:
    """The deployment's time-stamping authority: its key in the HSM and its certificate.

    :raises NotFound: none yet (a data directory from before timestamps, not upgraded).
    """
    if row.tsa_key_id is None or row.tsa_key_alg is None or row.tsa_cert_pem is None:
        raise NotFound(
            "this deployment has no time-stamping authority yet: run `cardbridge server init` "
            "on its data directory to upgrade it"
        )
    return KeyRef(row.tsa_key_id, KeyAlg(row.tsa_key_alg)), _certificate(row.tsa_cert_pem)


@lru_cache(maxsize=8)
def _certificate(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def record_tsa(
    session: Session, row: Deployment, ref: KeyRef, cert: x509.Certificate, *, node: str
) -> None:
    """Record the time-stamping authority's key and certificate (in the caller's transaction,
    with its audit record), unless the deployment has one already.

    :raises Conflict: another ``server init`` recorded a TSA first (the caller destroys the
        key it made).
    """
    recorded = session.execute(
        update(Deployment)
        .where(Deployment.id == row.id, Deployment.tsa_key_id.is_(None))
        .values(
            tsa_key_id=ref.key_id,
            tsa_key_alg=str(ref.alg),
            tsa_cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        )
        .execution_options(synchronize_session="fetch")
    )
    if not affected(recorded):
        raise Conflict("the deployment has a time-stamping authority already")
    audit.append(
        session,
        actor="server-init",
        event=audit.Event.TSA_KEY,
        details={"tsa_key_id": ref.key_id, "serial": format(cert.serial_number, "x"),
                 "node": node},
    )  # fmt: skip


def record(
    session: Session, ca_ref: KeyRef, ca_cert: x509.Certificate, token_label: str, *, node: str
) -> None:
    """Record the deployment (in the caller's transaction, with its audit record).

    :raises Conflict: another ``server init`` recorded one first.
    """
    session.add(
        Deployment(
            id=ROW_ID,
            ca_key_id=ca_ref.key_id,
            ca_key_alg=str(ca_ref.alg),
            ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
            token_label=token_label,
        )
    )
    try:
        session.flush()
    except IntegrityError as e:
        raise Conflict(FORK_REFUSED) from e
    audit.append(
        session,
        actor="server-init",
        event=audit.Event.SERVER_INIT,
        details={"ca_key_id": ca_ref.key_id, "token_label": token_label, "node": node},
    )


def joined(session: Session, row: Deployment, *, node: str) -> None:
    """Audit that ``node`` joined the deployment (``server join``)."""
    audit.append(
        session,
        actor="server-join",
        event=audit.Event.SERVER_JOIN,
        details={"ca_key_id": row.ca_key_id, "node": node},
    )
