# SPDX-License-Identifier: Apache-2.0
"""Failed-login counters per client address and per user name; user names unique without
regard to case (``name_key``: NFKC, case-folded).

Users whose names differ only in case could be created before: the first keeps the name, each
later one is disabled and its key suffixed with ``~<id>`` (a warning names them), so an
administrator can look at them before anyone logs in as the wrong one.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.services.users import name_key

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

_users = sa.table(
    "users",
    sa.column("id", sa.Integer),
    sa.column("name", sa.String),
    sa.column("name_key", sa.String),
    sa.column("disabled", sa.Boolean),
)


def upgrade() -> None:
    op.create_table(
        "login_failures",
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name=op.f("pk_login_failures")),
    )
    op.create_index(op.f("ix_login_failures_window_start"), "login_failures", ["window_start"])
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("name_key", sa.String(length=64), nullable=True))
    conn = op.get_bind()
    seen: set[str] = set()
    for user_id, name in conn.execute(sa.select(_users.c.id, _users.c.name).order_by("id")):
        key, values = name_key(name), {}
        if key in seen:
            suffix = f"~{user_id}"
            key = key[: 64 - len(suffix)] + suffix
            values["disabled"] = True
            log.warning("user %r differs from another only in case: disabled", name)
        seen.add(key)
        conn.execute(_users.update().where(_users.c.id == user_id).values(name_key=key, **values))
    with op.batch_alter_table("users") as batch:
        batch.alter_column("name_key", existing_type=sa.String(length=64), nullable=False)
        batch.create_unique_constraint(batch.f("uq_users_name_key"), ["name_key"])


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint(batch.f("uq_users_name_key"), type_="unique")
        batch.drop_column("name_key")
    op.drop_index(op.f("ix_login_failures_window_start"), table_name="login_failures")
    op.drop_table("login_failures")
