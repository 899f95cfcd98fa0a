# SPDX-License-Identifier: Apache-2.0
"""Device binding (DPoP, RFC 9449): the device key's JWK thumbprint on devices and on the
tokens issued to them, and the record of used proofs.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Devices enrolled before device binding have no thumbprint: they must enroll again.
    op.execute("DELETE FROM devices")
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("jkt", sa.String(length=64), nullable=False))
        batch.create_unique_constraint(batch.f("uq_devices_jkt"), ["jkt"])
    with op.batch_alter_table("auth_tokens") as batch:
        batch.add_column(sa.Column("jkt", sa.String(length=64), nullable=True))
    op.create_table(
        "dpop_proofs",
        sa.Column("jti_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("jti_hash", name=op.f("pk_dpop_proofs")),
    )
    op.create_index(op.f("ix_dpop_proofs_expires_at"), "dpop_proofs", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_dpop_proofs_expires_at"), table_name="dpop_proofs")
    op.drop_table("dpop_proofs")
    with op.batch_alter_table("auth_tokens") as batch:
        batch.drop_column("jkt")
    with op.batch_alter_table("devices") as batch:
        batch.drop_constraint(batch.f("uq_devices_jkt"), type_="unique")
        batch.drop_column("jkt")
