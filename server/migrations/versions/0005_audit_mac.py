# SPDX-License-Identifier: Apache-2.0
"""Audit records carry an HMAC of their hash under the HSM's audit key. Existing records get
theirs here, after their chain is checked: a chain broken before the upgrade is refused rather
than anchored. Upgrading a database that holds records needs the HSM, so it runs through
``cardbridge server init``.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from server.db import migration_keys
from server.services.audit import GENESIS_HASH, record_hash, record_mac

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_log = sa.table(
    "audit_log",
    *(sa.column(c) for c in ("seq", "time", "actor", "event", "subject", "details",
                             "prev_hash", "hash", "mac")),
)


def _macs(rows: Sequence[Any]) -> list[tuple[int, str]]:
    """The MAC of each record of an intact chain.

    :raises RuntimeError: the chain is broken (nothing is anchored).
    """
    if not rows:
        return []
    keys = migration_keys()
    prev, macs = GENESIS_HASH, []
    for expected_seq, row in enumerate(rows, start=1):
        seq, time, actor, event, subject, details, prev_hash, digest = map(str, row)
        again = record_hash(int(seq), time, actor, event, subject, details, prev_hash)
        if int(seq) != expected_seq or prev_hash != prev or again != digest:
            raise RuntimeError(
                f"the audit chain is broken at record {expected_seq}: it is not anchored; "
                "export it for investigation (`cardbridge admin audit export`) first"
            )
        macs.append((expected_seq, record_mac(keys, digest)))
        prev = digest
    return macs


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_log.c.seq, _log.c.time, _log.c.actor, _log.c.event, _log.c.subject,
                  _log.c.details, _log.c.prev_hash, _log.c.hash).order_by(_log.c.seq)
    ).all()
    macs = _macs(rows)  # before any DDL: SQLite commits each statement of it
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("mac", sa.String(length=64), nullable=True))
    for seq, mac in macs:
        conn.execute(_log.update().where(_log.c.seq == seq).values(mac=mac))
    with op.batch_alter_table("audit_log") as batch:
        batch.alter_column("mac", existing_type=sa.String(length=64), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("mac")
