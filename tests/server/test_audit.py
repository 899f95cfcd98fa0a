# SPDX-License-Identifier: Apache-2.0
"""The audit chain (DESIGN.md rule 7): an edit, a deletion or a reordering in the database is
found by verify(), which names the first bad record; and, as an attacker who can write the
database but not use the HSM (finding 4): a chain re-hashed after an edit fails on its MACs, a
truncated or wiped one fails against a checkpoint exported before, and a forged checkpoint is
refused."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.db import alembic_config, migrate
from server.hsm.secrets import ServerKeys
from server.models import AuditHead, AuditRecord
from server.services import audit, checkpoints


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


def test_edit_with_recomputed_hash_fails_on_its_mac(chain: Session) -> None:
    rec = chain.get(AuditRecord, 3)
    assert rec is not None
    forged = audit.record_hash(
        3, rec.time, "mallory", rec.event, rec.subject, rec.details, rec.prev_hash
    )
    chain.execute(
        update(AuditRecord).where(AuditRecord.seq == 3).values(actor="mallory", hash=forged)
    )
    chain.commit()
    bad = audit.verify(chain)
    assert bad is not None and bad.seq == 3 and "MAC" in bad.reason


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


# --- finding 4: whoever writes the database cannot rewrite, cut or wipe the chain ------------


def _rechain_from(session: Session, seq: int, **edit: str) -> None:
    """What an attacker with write access does: edit record ``seq`` and recompute every hash
    from there on, and the head, so that the hash chain alone is consistent again."""
    records = session.scalars(
        select(AuditRecord).where(AuditRecord.seq >= seq).order_by(AuditRecord.seq)
    ).all()
    prev = session.scalars(select(AuditRecord.hash).where(AuditRecord.seq == seq - 1)).first()
    prev = prev or audit.GENESIS_HASH
    for rec in records:
        for field, value in edit.items() if rec.seq == seq else ():
            setattr(rec, field, value)
        rec.prev_hash = prev
        rec.hash = audit.record_hash(
            rec.seq, rec.time, rec.actor, rec.event, rec.subject, rec.details, rec.prev_hash
        )
        prev = rec.hash
    session.execute(update(AuditHead).values(last_hash=prev))
    session.commit()


def _cut_to(session: Session, seq: int) -> None:
    """Delete the records after ``seq`` and move the head back to it."""
    session.execute(delete(AuditRecord).where(AuditRecord.seq > seq))
    tip = session.scalars(select(AuditRecord.hash).where(AuditRecord.seq == seq)).first()
    session.execute(update(AuditHead).values(last_seq=seq, last_hash=tip or audit.GENESIS_HASH))
    session.commit()


def test_a_rechained_edit_fails_on_its_mac(chain: Session) -> None:
    _rechain_from(chain, 3, actor="mallory")
    bad = audit.verify(chain)
    assert bad is not None and bad.seq == 3 and "MAC" in bad.reason


def test_a_rechained_deletion_fails_on_its_mac(chain: Session) -> None:
    chain.execute(delete(AuditRecord).where(AuditRecord.seq == 4))
    chain.execute(text("UPDATE audit_log SET seq = 4 WHERE seq = 5"))  # close the gap
    chain.execute(update(AuditHead).values(last_seq=4))
    chain.commit()
    _rechain_from(chain, 4)
    bad = audit.verify(chain)
    assert bad is not None and bad.seq == 4 and "MAC" in bad.reason


def test_a_mac_cannot_be_blanked(chain: Session) -> None:
    chain.execute(update(AuditRecord).where(AuditRecord.seq == 2).values(mac=""))
    chain.commit()
    assert bad_seq(chain) == 2


@pytest.mark.parametrize("keep", [3, 0], ids=["truncated", "wiped"])
def test_a_cut_chain_fails_against_a_checkpoint(chain: Session, keep: int) -> None:
    seen = audit.checkpoint(chain)
    assert (seen.seq, seen.count) == (5, 5)
    assert audit.verify(chain, [seen]) is None
    _cut_to(chain, keep)
    bad = audit.verify(chain, [seen])
    assert bad is not None and bad.seq == keep + 1, bad
    assert "checkpoint" in bad.reason and "holds " + str(keep) in bad.reason


def test_a_rewritten_prefix_fails_against_a_checkpoint(chain: Session) -> None:
    seen = audit.checkpoint(chain)
    _cut_to(chain, 2)
    for i in range(3):  # new records where the old ones were: same seqs, other hashes
        audit.append(chain, actor="mallory", event=audit.Event.USER_ADD, subject=f"user:m{i}")
    chain.commit()
    assert audit.verify(chain) is None  # appended through the server: MACs are genuine
    bad = audit.verify(chain, [seen])
    assert bad is not None and bad.seq == 5 and "differs from the checkpoint" in bad.reason


@pytest.mark.parametrize(
    "forge", [{"seq": 3}, {"count": 4}, {"hash": "ab" * 32}, {"time": "2000-01-01T00:00:00"}]
)
def test_a_forged_checkpoint_is_refused(chain: Session, forge: dict[str, object]) -> None:
    """An attacker who cut the chain writes a checkpoint that matches it: no HSM, no MAC."""
    forged = dataclasses.replace(audit.checkpoint(chain), **forge)  # type: ignore[arg-type]
    bad = audit.verify(chain, [forged])
    assert bad is not None and "not signed by this server's HSM" in bad.reason


def test_export_appends_signed_checkpoints_the_chain_must_hold(
    chain: Session, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = Settings.for_data_dir(tmp_path, db_url="sqlite://", ca_key_id=None)
    assert checkpoints.export(sessions, settings) == 5
    audit.append(chain, actor="admin", event=audit.Event.USER_ADD, subject="user:u6")
    chain.commit()
    assert checkpoints.export_if_grown(sessions, settings, 5) == 6
    assert checkpoints.export_if_grown(sessions, settings, 6) == 6  # no growth, no line
    path = settings.audit_checkpoint_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [cp["seq"] for cp in lines] == [5, 6]
    saved = [audit.Checkpoint(**cp) for cp in lines]
    assert audit.verify(chain, saved) is None
    _cut_to(chain, 5)
    assert bad_seq_against(chain, saved) == 6


def bad_seq_against(session: Session, saved: list[audit.Checkpoint]) -> int:
    session.expire_all()
    bad = audit.verify(session, saved)
    assert bad is not None
    return bad.seq


def test_the_upgrade_anchors_an_intact_chain_and_refuses_a_broken_one(
    chain: Session, db_url: str, server_keys: ServerKeys
) -> None:
    """Records from before the MACs get theirs from ``server init``'s migration (it has the
    HSM); a chain already broken is not anchored, so an earlier tampering cannot be laundered."""
    macs = chain.scalars(select(AuditRecord.mac).order_by(AuditRecord.seq)).all()
    chain.close()
    command.downgrade(alembic_config(db_url), "0003")
    with pytest.raises(RuntimeError, match="server init"):
        migrate(db_url)
    migrate(db_url, keys=server_keys)
    assert chain.scalars(select(AuditRecord.mac).order_by(AuditRecord.seq)).all() == macs
    assert audit.verify(chain) is None
    chain.close()
    command.downgrade(alembic_config(db_url), "0003")
    chain.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2"))
    chain.commit()
    with pytest.raises(RuntimeError, match="broken at record 2"):
        migrate(db_url, keys=server_keys)
