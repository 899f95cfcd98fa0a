# SPDX-License-Identifier: Apache-2.0
"""Signature activation data (DESIGN.md rule 4; CSC v2 §9, §11.6, §11.9, §11.10).

A SAD is an opaque 256-bit random value; the server keeps its SHA-256 with the user, the
credential, the number of signatures left, the pinned digests (SCAL 2) and the expiry. Spending
is one ``UPDATE ... WHERE remaining = <value read>``: ``remaining`` only ever decreases, so it
doubles as a version number and of two concurrent spends exactly one wins. Each pinned digest
is consumed when signed, so no digest is signed twice under one SAD.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import runner
from server.errors import InvalidRequest, SadInvalid
from server.models import Sad, utcnow
from server.services import audit
from server.services.hashing import new_token, token_digest


@dataclass(frozen=True)
class SadGrant:
    """What credentials/authorize and extendTransaction return."""

    sad: str
    expires_in: int


def _b64(hashes: Sequence[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


def authorize(
    session: Session,
    policy: Policy,
    *,
    user_id: int,
    credential_id: str,
    num_signatures: int,
    hashes: Sequence[bytes] | None = None,
    hash_oid: str | None = None,
    actor: str = "",
) -> SadGrant:
    """Issue a SAD for ``num_signatures`` signatures, pinned to ``hashes`` when given.

    The caller has already checked the owner, the credential and its factors (PIN, OTP).

    :raises InvalidRequest: ``num_signatures`` outside 1..multisign, or more hashes than that.
    """
    if not 1 <= num_signatures <= policy.multisign:
        raise InvalidRequest(f"numSignatures must be between 1 and {policy.multisign}")
    if hashes is not None and (not hashes or len(hashes) > num_signatures):
        raise InvalidRequest("the number of hashes must be between 1 and numSignatures")
    sad = new_token()
    row = Sad(
        sad_hash=token_digest(sad),
        user_id=user_id,
        credential_id=credential_id,
        remaining=num_signatures,
        hashes=_b64(hashes) if hashes is not None else None,
        hash_oid=hash_oid,
        expires_at=utcnow() + policy.ttl("sad_ttl"),
    )
    sad_id = _insert(session, row)
    audit.append(
        session,
        actor=actor or f"user-id:{user_id}",
        event=audit.Event.AUTHORIZE,
        subject=f"credential:{credential_id}",
        details={"num_signatures": num_signatures, "pinned": hashes is not None, "sad": sad_id},
    )
    return SadGrant(sad, policy.sad_ttl)


def _insert(session: Session, row: Sad) -> int:
    """Add ``row`` and return its id: the audit records of authorizations and extensions name
    the SAD as the ``sign`` records that spend it do (``"sad"``), never its value."""
    session.add(row)
    session.flush()
    return row.id


@dataclass(frozen=True)
class _Held:
    """The fields of a SAD row that spending needs."""

    id: int
    remaining: int
    hashes: list[str] | None
    hash_oid: str | None
    expires_at: datetime


_SADS = cast(Table, Sad.__table__)
# Built once: every signHash spends a SAD, so these skip statement construction and the ORM.
_LOAD = select(
    _SADS.c.id,
    _SADS.c.user_id,
    _SADS.c.credential_id,
    _SADS.c.remaining,
    _SADS.c.hashes,
    _SADS.c.hash_oid,
    _SADS.c.expires_at,
).where(_SADS.c.sad_hash == bindparam("digest"))
_SPEND = (
    update(_SADS)
    .where(
        _SADS.c.id == bindparam("sad_id"),
        _SADS.c.remaining == bindparam("seen"),
        _SADS.c.expires_at > bindparam("now"),
    )
    .values(remaining=bindparam("left"), hashes=bindparam("left_hashes"))
    .returning(_SADS.c.id)
)


def _load(session: Session, sad: str, user_id: int, credential_id: str) -> _Held:
    rows = runner(session)(_LOAD, {"digest": token_digest(sad)})
    if not rows:
        raise SadInvalid("Invalid parameter SAD")
    sad_id, owner_id, owner_credential, remaining, hashes, hash_oid, expires_at = rows[0]
    if owner_id != user_id or owner_credential != credential_id:
        raise SadInvalid("Invalid parameter SAD")
    if expires_at <= utcnow():
        raise SadInvalid("SAD expired")
    if remaining <= 0:
        raise SadInvalid("SAD already used")
    return _Held(sad_id, remaining, hashes, hash_oid, expires_at)


@dataclass(frozen=True)
class Spending:
    """A SAD checked to cover some digests, not spent yet (:func:`spend` spends it)."""

    held: _Held
    count: int
    left_hashes: list[str] | None


def check(
    session: Session,
    sad: str,
    *,
    user_id: int,
    credential_id: str,
    hashes: Sequence[bytes],
    hash_oid: str | None = None,
) -> Spending:
    """Check that ``sad`` authorizes signing ``hashes`` now, without spending it.

    :raises SadInvalid: unknown, another user's or credential's, expired, used up, or not
        covering one of ``hashes``.
    """
    row = _load(session, sad, user_id, credential_id)
    if len(hashes) == 0:
        raise InvalidRequest("no hashes to sign")
    if len(hashes) > row.remaining:
        raise SadInvalid("more hashes than the SAD authorizes")
    if row.hashes is None:
        return Spending(row, len(hashes), None)
    return Spending(row, len(hashes), _take(row, hashes, hash_oid))


def _take(row: _Held, hashes: Sequence[bytes], hash_oid: str | None) -> list[str]:
    """The pinned hashes of ``row`` left once ``hashes`` are taken out of them (a multiset:
    each pinned occurrence is taken once).

    :raises SadInvalid: one of ``hashes`` is not pinned (or no more), or ``hash_oid`` is not
        the pinned hashes' algorithm.
    """
    if hash_oid is not None and row.hash_oid is not None and hash_oid != row.hash_oid:
        raise SadInvalid("hash algorithm differs from the one authorized")
    left = list(row.hashes or ())
    for h in _b64(hashes):
        if h not in left:
            raise SadInvalid("Hash is not authorized by the SAD")
        left.remove(h)
    return left


def spend(session: Session, spending: Spending) -> int:
    """Spend what :func:`check` found, in the caller's transaction, atomically: of two
    concurrent spends of one SAD exactly one wins. Returns the SAD's row id (for the audit).

    :raises SadInvalid: a concurrent spend won, or the SAD expired meanwhile.
    """
    row = spending.held
    won = runner(session)(
        _SPEND,
        {
            "sad_id": row.id,
            "seen": row.remaining,
            "now": utcnow(),
            "left": row.remaining - spending.count,
            "left_hashes": spending.left_hashes,
        },
    )
    if not won:
        raise SadInvalid("SAD already used")
    return row.id


def extend(
    session: Session,
    sad: str,
    *,
    user_id: int,
    credential_id: str,
    hashes: Sequence[bytes] | None = None,
    hash_oid: str | None = None,
    actor: str = "",
) -> SadGrant:
    """Replace ``sad`` by a new SAD for what it has left (CSC credentials/extendTransaction);
    with ``hashes`` the new one covers only them. An extension needs no PIN or OTP, so it never
    authorizes more than ``sad`` did:

    - a SAD that pins hashes (SCAL 2) passes on only hashes it pinned and has not signed;
    - the number of signatures never grows;
    - the new SAD expires when ``sad`` does, so a chain of extensions ends when the original
      authorization does.

    :raises SadInvalid: as :func:`spend`, or a hash the SAD does not cover.
    :raises InvalidRequest: more hashes than signatures left.
    """
    row = _load(session, sad, user_id, credential_id)
    if hashes is None:
        remaining, pinned, oid = row.remaining, row.hashes, row.hash_oid
    else:
        if not 1 <= len(hashes) <= row.remaining:
            raise InvalidRequest("the number of hashes must be between 1 and the signatures left")
        if row.hashes is not None:
            _take(row, hashes, hash_oid)
        remaining, pinned, oid = len(hashes), _b64(hashes), hash_oid or row.hash_oid
    spend(session, Spending(row, row.remaining, row.hashes))  # all of it, or a racer won
    new = new_token()
    new_row = Sad(
        sad_hash=token_digest(new),
        user_id=user_id,
        credential_id=credential_id,
        remaining=remaining,
        hashes=pinned,
        hash_oid=oid,
        expires_at=row.expires_at,
    )
    new_id = _insert(session, new_row)
    audit.append(
        session,
        actor=actor or f"user-id:{user_id}",
        event=audit.Event.EXTEND,
        subject=f"credential:{credential_id}",
        details={"num_signatures": remaining, "pinned": pinned is not None, "from_sad": row.id,
                 "sad": new_id},  # fmt: skip
    )
    return SadGrant(new, max(1, int((row.expires_at - utcnow()).total_seconds())))
