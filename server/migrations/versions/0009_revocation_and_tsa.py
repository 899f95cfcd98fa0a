# SPDX-License-Identifier: Apache-2.0
"""Revocation data and timestamps for long-term signatures: the revocation time of each
credential (its certificate's entry on the CRL), the CA's current CRL, the time-stamping
authority's key and certificate in the deployment record (0003's ``deployment`` table), and
the per-address budgets of ``/tsa`` requests.

The TSA itself is created by ``server init`` (it needs the HSM), on a new data directory or
on the upgrade of an existing one; until then ``/tsa`` answers 404.

Credentials revoked before this revision get the time of the upgrade as their revocation time.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("revoked_at", sa.DateTime(), nullable=True))
    credentials = sa.table(
        "credentials", sa.column("status", sa.String), sa.column("revoked_at", sa.DateTime)
    )
    op.execute(
        credentials.update()
        .where(credentials.c.status == "revoked")
        .values(revoked_at=datetime.now(UTC).replace(tzinfo=None))
    )
    with op.batch_alter_table("deployment") as batch:
        batch.add_column(sa.Column("tsa_key_id", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("tsa_key_alg", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("tsa_cert_pem", sa.Text(), nullable=True))
    op.create_table(
        "revocation_list",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("this_update", sa.DateTime(), nullable=False),
        sa.Column("next_update", sa.DateTime(), nullable=False),
        sa.Column("revoked", sa.Integer(), nullable=False),
        sa.Column("last_revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revocation_list")),
    )
    op.create_table(
        "tsa_budgets",
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.DateTime(), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_tsa_budgets")),
    )
    op.create_index(op.f("ix_tsa_budgets_window_start"), "tsa_budgets", ["window_start"])


def downgrade() -> None:
    op.drop_index(op.f("ix_tsa_budgets_window_start"), table_name="tsa_budgets")
    op.drop_table("tsa_budgets")
    op.drop_table("revocation_list")
    with op.batch_alter_table("deployment") as batch:
        batch.drop_column("tsa_cert_pem")
        batch.drop_column("tsa_key_alg")
        batch.drop_column("tsa_key_id")
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("revoked_at")
