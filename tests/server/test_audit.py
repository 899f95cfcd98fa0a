# SPDX-License-Identifier: Apache-2.0
"""The audit chain (DESIGN.md rule 7): an edit, a deletion or a reordering in the database is
found by verify(), which names the first bad record."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from server.models import AuditRecord
from server.services import audit


@pytest.fixture
def chain(session: Session) -> Session:
    for i in range(1, 6):
        audit.append(
            session,
            actor="admin",
            event=audit.Event.USER_ADD,
            subject=f"user:u{i}",
            details={"i": i},
        )
        session.commit()
    assert audit.verify(session) is None
    return session


def bad_seq(session: Session) -> int:
    session.expire_all()
    bad = audit.verify(session)
    assert bad is not None
    return bad.seq


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("actor", "mallory"),
        ("event", "login.ok"),
        ("subject", "user:x"),
        ("time", "2000-01-01"),
        ("details", '{"i":99}'),
    ],
)
def test_edit_is_named(chain: Session, field: str, value: str) -> None:
    chain.execute(update(AuditRecord).where(AuditRecord.seq == 3).values({field: value}))
    chain.commit()
    assert bad_seq(chain) == 3


def test_edit_with_recomputed_hash_breaks_the_next_link(chain: Session) -> None:
    rec = chain.get(AuditRecord, 3)
    assert rec is not None
    forged = audit.record_hash(
        3, rec.time, "mallory", rec.event, rec.subject, rec.details, rec.prev_hash
    )
    chain.execute(
        update(AuditRecord).where(AuditRecord.seq == 3).values(actor="mallory", hash=forged)
    )
    chain.commit()
    assert bad_seq(chain) == 4


def test_delete_is_named(chain: Session) -> None:
    chain.execute(delete(AuditRecord).where(AuditRecord.seq == 2))
    chain.commit()
    bad = audit.verify(chain)
    assert bad is not None and bad.seq == 2 and "missing" in bad.reason


def test_delete_of_the_tail_is_named(chain: Session) -> None:
    chain.execute(delete(AuditRecord).where(AuditRecord.seq == 5))
    chain.commit()
    assert bad_seq(chain) == 5


def test_reorder_is_named(chain: Session) -> None:
    # swap the contents of records 2 and 4, keeping their seq numbers
    cols = ("time", "actor", "event", "subject", "details", "prev_hash", "hash")
    r2, r4 = (
        chain.execute(
            select(*(getattr(AuditRecord, c) for c in cols)).where(AuditRecord.seq == s)
        ).one()
        for s in (2, 4)
    )
    chain.execute(
        update(AuditRecord).where(AuditRecord.seq == 2).values(dict(zip(cols, r4, strict=True)))
    )
    chain.execute(
        update(AuditRecord).where(AuditRecord.seq == 4).values(dict(zip(cols, r2, strict=True)))
    )
    chain.commit()
    assert bad_seq(chain) == 2


def test_renumbering_is_named(chain: Session) -> None:
    chain.execute(text("UPDATE audit_log SET seq = 100 WHERE seq = 4"))
    chain.execute(text("UPDATE audit_log SET seq = 4 WHERE seq = 5"))
    chain.execute(text("UPDATE audit_log SET seq = 5 WHERE seq = 100"))
    chain.commit()
    assert bad_seq(chain) == 4


def test_export_is_the_chain(chain: Session) -> None:
    rows = list(audit.export(chain))
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["prev_hash"] == audit.GENESIS_HASH
    assert all(rows[i]["prev_hash"] == rows[i - 1]["hash"] for i in range(1, 5))
    assert rows[2]["details"] == {"i": 3}
    json.dumps(rows)  # JSON-ready
    assert str(audit.verify(chain)) == "None"


def test_bad_record_names_itself() -> None:
    assert str(audit.BadRecord(7, "contents do not match its hash")) == (
        "audit record 7: contents do not match its hash"
    )
