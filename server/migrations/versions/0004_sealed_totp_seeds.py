# SPDX-License-Identifier: Apache-2.0
"""TOTP seeds sealed with the HSM's AES key (AES-256-GCM, bound to the user): existing seeds
are sealed and the clear column is dropped. Upgrading a database that holds seeds needs the
HSM, so it runs through ``cardbridge server init``.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.db import migration_keys
from server.services.otp import open_seed, seal_seed

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_users = sa.table(
    "users",
    sa.column("id", sa.Integer),
    sa.column("otp_secret", sa.String),
    sa.column("otp_seed", sa.LargeBinary),
)


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_users.c.id, _users.c.otp_secret).where(_users.c.otp_secret.is_not(None))
    ).all()
    keys = migration_keys() if rows else None  # before any DDL: SQLite commits each one
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("otp_seed", sa.LargeBinary(length=128), nullable=True))
    if keys is not None:
        for user_id, secret in rows:
            conn.execute(
                _users.update()
                .where(_users.c.id == user_id)
                .values(otp_seed=seal_seed(keys, user_id, secret))
            )
    with op.batch_alter_table("users") as batch:
        batch.drop_column("otp_secret")


def downgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_users.c.id, _users.c.otp_seed).where(_users.c.otp_seed.is_not(None))
    ).all()
    keys = migration_keys() if rows else None
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("otp_secret", sa.String(length=64), nullable=True))
    if keys is not None:
        for user_id, sealed in rows:
            conn.execute(
                _users.update()
                .where(_users.c.id == user_id)
                .values(otp_secret=open_seed(keys, user_id, sealed))
            )
    with op.batch_alter_table("users") as batch:
        batch.drop_column("otp_seed")
