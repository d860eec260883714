"""Device certificates, pre-authorised enrolment tokens and operator API tokens.

Revision ID: 0003_identity_and_access
Revises: 0002_tuf_metadata
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_identity_and_access"
down_revision: str | None = "0002_tuf_metadata"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("cert_serial", sa.String(64), nullable=True))
        batch.add_column(sa.Column("cert_not_after", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("prev_cert_serial", sa.String(64), nullable=True))
        batch.add_column(sa.Column("decommissioned_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.add_column(sa.Column("device_id", sa.String(128), nullable=True))
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )


def downgrade() -> None:
    op.drop_table("api_tokens")
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.drop_column("device_id")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("decommissioned_at")
        batch.drop_column("prev_cert_serial")
        batch.drop_column("cert_not_after")
        batch.drop_column("cert_serial")
