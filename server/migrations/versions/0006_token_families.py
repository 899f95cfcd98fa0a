# SPDX-License-Identifier: Apache-2.0
"""Token families: every token of one login (the refresh tokens rotated from its first one,
their access tokens and PIN marks) shares ``family_id``, so a reused refresh token can revoke
them all (RFC 9700 §4.14.2). Tokens issued before are each their own refresh token's family.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("auth_tokens") as batch:
        batch.add_column(sa.Column("family_id", sa.Integer(), nullable=True))
        batch.create_index(batch.f("ix_auth_tokens_family_id"), ["family_id"], unique=False)
    op.execute("UPDATE auth_tokens SET family_id = id WHERE kind = 'refresh'")
    op.execute("UPDATE auth_tokens SET family_id = parent_id WHERE parent_id IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("auth_tokens") as batch:
        batch.drop_index(batch.f("ix_auth_tokens_family_id"))
        batch.drop_column("family_id")
