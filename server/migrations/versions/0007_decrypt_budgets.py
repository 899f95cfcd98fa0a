# SPDX-License-Identifier: Apache-2.0
"""Decryption budgets: RSA decryptions per key and login within a window (the counter behind
``Policy.decrypt_budget``).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "decrypt_budgets",
        sa.Column("credential_id", sa.String(length=64), nullable=False),
        sa.Column("family_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("window_start", sa.DateTime(), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["credential_id"],
            ["credentials.id"],
            name=op.f("fk_decrypt_budgets_credential_id_credentials"),
        ),
        sa.PrimaryKeyConstraint("credential_id", "family_id", name=op.f("pk_decrypt_budgets")),
    )
    op.create_index(
        op.f("ix_decrypt_budgets_window_start"), "decrypt_budgets", ["window_start"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_decrypt_budgets_window_start"), table_name="decrypt_budgets")
    op.drop_table("decrypt_budgets")
