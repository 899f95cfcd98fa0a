# SPDX-License-Identifier: Apache-2.0
"""Hash-chained, append-only audit log anchored in the HSM (DESIGN.md rule 7).

Each record is ``(seq, time, actor, event, subject, details, prev_hash, hash, mac)`` with
``hash = SHA-256(canonical JSON of every other field, prev_hash included)`` and ``mac`` the
HMAC-SHA256 of that hash under the HSM's audit key (``ServerKeys.audit_mac``): the hash chain
finds an edit, a deletion or a reordering, and the MAC a chain re-computed after an edit, which
only the HSM could sign. What no MAC inside the database can show is a cut: the tail deleted
and the head moved back, or everything wiped. For that the server exports signed
**checkpoints** ``(seq, hash, count, time, mac)`` outside the database (a file, syslog:
:mod:`server.services.checkpoints`), and :func:`verify` checks the chain against them: a
checkpoint names a record the chain must still hold, with that hash.

Appends are serialised through the single ``audit_head`` row: its ``UPDATE ... RETURNING`` takes
the row lock (PostgreSQL) or the write lock (SQLite) until the caller's transaction commits, so
several server processes append one after another and the chain never forks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, cast

from sqlalchemy import ColumnElement, Table, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from server.db import runner, server_keys
from server.hsm.secrets import ServerKeys
from server.models import AuditHead, AuditRecord, utcnow

GENESIS_HASH = "0" * 64
HEAD_ID = 1


class Event(StrEnum):
    """The audited security events."""

    LOGIN_OK = "login.ok"
    LOGIN_FAILED = "login.failed"
    LOGOUT = "logout"
    REFRESH = "login.refresh"
    REFRESH_REUSED = "login.refresh.reused"
    PIN_OK = "pin.verify.ok"
    PIN_FAILED = "pin.verify.failed"
    PIN_CHANGE = "pin.change"
    PIN_UNBLOCK = "pin.unblock"
    PIN_UNBLOCK_FAILED = "pin.unblock.failed"
    PUK_CHANGE = "puk.change"
    PUK_CHANGE_FAILED = "puk.change.failed"
    OTP_FAILED = "otp.failed"
    AUTHORIZE = "credential.authorize"
    EXTEND = "credential.extend"
    SIGN = "sign"
    DECRYPT = "decrypt"
    ECDH = "ecdh"
    ENROLL = "enroll"
    DEVICE_ENROLL = "device.enroll"
    REVOKE = "revoke"
    USER_ADD = "admin.user.add"
    USER_DISABLE = "admin.user.disable"
    USER_UNLOCK = "admin.user.unlock"
    ADMIN_UNBLOCK = "admin.unblock"
    CERT_CSR = "admin.cert.csr"
    CERT_IMPORT = "admin.cert.import"
    SERVER_INIT = "server.init"
    SERVER_JOIN = "server.join"
    KEY_REFUSED = "key.refused"
    """A key use refused by rule 3 or the PIN policy (:mod:`server.services.piv`)."""
    TSA_KEY = "tsa.key"
    TSA_TIMESTAMP = "tsa.timestamp"
    TSA_REFUSED = "tsa.refused"


@dataclass(frozen=True)
class Origin:
    """Where a request was served: the node (``Settings.node_name``) and the request's id (the
    ``X-Request-Id`` its client received). Audit records of key uses carry both, so that what a
    client got can be matched with the log of a deployment of several nodes."""

    node: str
    request: str

    def details(self) -> dict[str, str]:
        """The audit ``details`` fields that name the origin."""
        return {"node": self.node, "request": self.request}


@dataclass(frozen=True)
class BadRecord:
    """Where :func:`verify` found the chain broken."""

    seq: int
    reason: str

    def __str__(self) -> str:
        return f"audit record {self.seq}: {self.reason}"


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The canonical encoding that is hashed: sorted-key, compact, ASCII JSON."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


_RECORD_MAC: Final = b"cardbridge audit record\0"
_CHECKPOINT_MAC: Final = b"cardbridge audit checkpoint\0"


def record_mac(keys: ServerKeys, digest: str) -> str:
    """The MAC (hex) of the record whose hash is ``digest``: it covers the record and, through
    ``prev_hash``, the whole chain before it."""
    return keys.audit_mac(_RECORD_MAC + bytes.fromhex(digest)).hex()


def record_hash(
    seq: int, time: str, actor: str, event: str, subject: str, details: str, prev_hash: str
) -> str:
    """SHA-256 (hex) of one record's canonical encoding, chained through ``prev_hash``."""
    fields = {
        "seq": seq,
        "time": time,
        "actor": actor,
        "event": event,
        "subject": subject,
        "details": details,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical(fields)).hexdigest()


_HEAD = cast(Table, AuditHead.__table__)
_LOG = cast(Table, AuditRecord.__table__)
# Built once: appends run on every signature, so they skip statement construction and the ORM.
_NEXT_SEQ = (
    update(_HEAD)
    .where(_HEAD.c.id == HEAD_ID)
    .values(last_seq=_HEAD.c.last_seq + 1)
    .returning(_HEAD.c.last_seq, _HEAD.c.last_hash)
)
_SET_TIP = update(_HEAD).where(_HEAD.c.id == HEAD_ID).values(last_hash=bindparam("tip"))
_INSERT = insert(_LOG).values({c.name: bindparam(c.name) for c in _LOG.columns})


def append(
    session: Session,
    *,
    actor: str,
    event: Event | str,
    subject: str = "",
    details: Mapping[str, Any] | None = None,
) -> int:
    """Append one record in the caller's transaction (the caller commits); returns its seq.

    :param actor: who acted, e.g. ``"user:alice"``, ``"admin"``, ``"device:<id>"``.
    :param subject: what was acted on, e.g. ``"user:bob"``, ``"credential:<id>"``.
    :param details: non-secret facts (never PINs, passwords, OTPs, tokens or key material).
    """
    run = runner(session)
    rows = run(_NEXT_SEQ)
    if not rows:
        raise RuntimeError("audit_head row missing: run the migrations")
    seq, prev_hash = int(rows[0][0]), str(rows[0][1])
    time = utcnow().isoformat(timespec="microseconds")
    details_json = canonical(dict(details or {})).decode()
    digest = record_hash(seq, time, actor, str(event), subject, details_json, prev_hash)
    run(
        _INSERT,
        {
            "seq": seq,
            "time": time,
            "actor": actor,
            "event": str(event),
            "subject": subject,
            "details": details_json,
            "prev_hash": prev_hash,
            "hash": digest,
            "mac": record_mac(server_keys(session), digest),
        },
    )
    run(_SET_TIP, {"tip": digest})
    return seq


def _records(
    session: Session, upto: int | None = None, where: Iterable[ColumnElement[bool]] = ()
) -> Iterator[AuditRecord]:
    q = select(AuditRecord).order_by(AuditRecord.seq).execution_options(yield_per=1000)
    if upto is not None:
        q = q.where(AuditRecord.seq <= upto)
    yield from session.scalars(q.where(*where))


def _head(session: Session) -> tuple[int, str]:
    row = session.execute(select(_HEAD.c.last_seq, _HEAD.c.last_hash)).one_or_none()
    if row is None:
        raise RuntimeError("audit_head row missing: run the migrations")
    return int(row[0]), str(row[1])


def head_seq(session: Session) -> int:
    """The seq of the chain's last committed record (0: empty)."""
    return _head(session)[0]


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement of the chain's state: record ``seq`` has ``hash``, the chain holds
    ``count`` records, at ``time`` (ISO 8601 UTC); ``mac`` is the HSM audit key's HMAC."""

    seq: int
    hash: str
    count: int
    time: str
    mac: str

    def signed_fields(self) -> bytes:
        """What :attr:`mac` covers."""
        fields = {"seq": self.seq, "hash": self.hash, "count": self.count, "time": self.time}
        return _CHECKPOINT_MAC + canonical(fields)

    def to_json(self) -> str:
        """One line of a checkpoint file."""
        return canonical(asdict(self)).decode()


def checkpoint(session: Session) -> Checkpoint:
    """A checkpoint of the chain as committed now, signed with the HSM's audit key."""
    seq, digest = _head(session)
    unsigned = Checkpoint(seq, digest, seq, utcnow().isoformat(timespec="seconds"), "")
    mac = server_keys(session).audit_mac(unsigned.signed_fields()).hex()
    return Checkpoint(seq, digest, seq, unsigned.time, mac)


def _bad_checkpoint(keys: ServerKeys, cp: Checkpoint) -> str | None:
    """Why ``cp`` cannot be a checkpoint of this server, or None."""
    expected = keys.audit_mac(cp.signed_fields()).hex()
    if not hmac.compare_digest(expected, cp.mac):
        return "is not signed by this server's HSM audit key"
    if cp.count != cp.seq:
        return "is inconsistent (count differs from seq)"
    return None


def verify(session: Session, checkpoints: Iterable[Checkpoint] = ()) -> BadRecord | None:
    """Check the whole chain, and that it still holds what ``checkpoints`` saw; return the
    first bad record, or None when it is intact.

    Detects an edited record (its hash no longer matches), a deleted one (a gap in ``seq`` or a
    broken ``prev_hash`` link; a deleted tail shows against the head row), reordering (the
    hash covers ``seq`` and the previous hash), a chain re-hashed after an edit (its MACs need
    the HSM), and, against a checkpoint exported before, a truncation or a wipe (the
    checkpoint's record is gone or has another hash). The head is read first and only records
    up to it are checked, so appends committed meanwhile by other servers are not mistaken for
    damage.
    """
    keys = server_keys(session)
    expected_at: dict[int, Checkpoint] = {}
    for cp in checkpoints:
        why = _bad_checkpoint(keys, cp)
        if why is not None:
            return BadRecord(cp.seq, f"the checkpoint of {cp.time} {why}")
        expected_at[cp.seq] = cp
    last_seq, last_hash = _head(session)
    expected_seq, prev = 1, GENESIS_HASH
    for rec in _records(session, last_seq):
        if rec.seq != expected_seq:
            return BadRecord(expected_seq, f"missing (next record is {rec.seq})")
        if rec.prev_hash != prev:
            return BadRecord(rec.seq, "prev_hash does not link to the previous record")
        again = record_hash(
            rec.seq, rec.time, rec.actor, rec.event, rec.subject, rec.details, rec.prev_hash
        )
        if again != rec.hash:
            return BadRecord(rec.seq, "contents do not match its hash")
        if not hmac.compare_digest(record_mac(keys, rec.hash), rec.mac or ""):
            return BadRecord(rec.seq, "its MAC is wrong: the chain was rewritten")
        seen = expected_at.get(rec.seq)
        if seen is not None and seen.hash != rec.hash:
            return BadRecord(rec.seq, f"differs from the checkpoint of {seen.time}")
        prev = rec.hash
        expected_seq += 1
    if last_seq != expected_seq - 1 or last_hash != prev:
        return BadRecord(expected_seq, f"missing (the chain's head is record {last_seq})")
    beyond = [cp for cp in expected_at.values() if cp.seq > last_seq]
    if beyond:
        cp = max(beyond, key=lambda c: c.seq)
        return BadRecord(
            last_seq + 1,
            f"missing: the checkpoint of {cp.time} saw {cp.count} records, the chain now "
            f"holds {last_seq} (truncated or wiped)",
        )
    return None


def export(
    session: Session,
    *,
    user: str | None = None,
    event: Event | None = None,
    since: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """The records, oldest first, as JSON-ready dicts (``details`` decoded); only those that
    match every filter given.

    :param user: a user name: the records that user acted in (``actor``) or that were about
        them (``subject``), e.g. their logins, signatures and the administrator's enrollment of
        them. Names are compared without regard to case, as they are unique (user names are
        ASCII once NFKC-normalised, :data:`server.schemas.Name`).
    :param event: one event.
    :param since: records from this time on (a naive time is UTC).
    """
    where: list[ColumnElement[bool]] = []
    if user is not None:
        who = f"user:{user.lower()}"
        where.append(or_(func.lower(_LOG.c.actor) == who, func.lower(_LOG.c.subject) == who))
    if event is not None:
        where.append(_LOG.c.event == str(event))
    if since is not None:
        utc = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
        # Every record's time is UTC ISO 8601 with microseconds (see :func:`append`): one width,
        # one offset, so text order is time order.
        where.append(_LOG.c.time >= utc.isoformat(timespec="microseconds"))
    for rec in _records(session, where=where):
        yield {
            "seq": rec.seq,
            "time": rec.time,
            "actor": rec.actor,
            "event": rec.event,
            "subject": rec.subject,
            "details": json.loads(rec.details),
            "prev_hash": rec.prev_hash,
            "hash": rec.hash,
            "mac": rec.mac,
        }
