"""Initial schema: registry, devices, enrolment, rollouts, decisions, telemetry.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("bundle_key", sa.String(512), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("target_path", sa.String(256), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    )
    op.create_index("ix_model_versions_name", "model_versions", ["name"])

    op.create_table(
        "model_aliases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("name", "alias", name="pk_model_aliases"),
    )

    op.create_table(
        "devices",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("hardware", sa.JSON(), nullable=False),
        sa.Column("secret_hash", sa.String(128), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        _ts("enrolled_at"),
        _ts("last_seen_at", nullable=True),
        sa.Column("connected", sa.Boolean(), nullable=False),
        sa.Column("actual", sa.JSON(), nullable=False),
        sa.Column("desired", sa.JSON(), nullable=False),
        sa.Column("desired_generation", sa.BigInteger(), nullable=False),
        sa.Column("acked_generation", sa.BigInteger(), nullable=False),
        sa.Column("decommissioned", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
    )

    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        _ts("expires_at"),
        sa.Column("labels", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_enrollment_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_enrollment_tokens_token_hash"),
    )

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("gate", sa.JSON(), nullable=False),
        sa.Column("shadow_sample_rate", sa.Float(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("step_phase", sa.String(16), nullable=False),
        _ts("step_started_at", nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("finished_at", nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    op.create_index("ix_rollouts_model", "rollouts", ["model"])
    op.create_index("ix_rollouts_phase", "rollouts", ["phase"])

    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("rank", sa.Float(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("baseline_version", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name="fk_rollout_devices_rollout_id_rollouts", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name="fk_rollout_devices_device_id_devices", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name="pk_rollout_devices"),
    )

    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(128), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        _ts("at"),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("actor", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name="fk_decisions_rollout_id_rollouts", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_decisions"),
    )
    op.create_index("ix_decisions_rollout_id", "decisions", ["rollout_id"])

    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("rollout_id", sa.String(128), nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_assignments"),
    )
    op.create_index("ix_assignments_model", "assignments", ["model"])

    op.create_table(
        "telemetry_windows",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("compared_to", sa.String(64), nullable=False),
        _ts("window_start"),
        _ts("window_end"),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        _ts("received_at"),
        sa.PrimaryKeyConstraint("id", name="pk_telemetry_windows"),
    )
    op.create_index("ix_telemetry_windows_device_id", "telemetry_windows", ["device_id"])
    op.create_index(
        "ix_telemetry_windows_model_version_role_start",
        "telemetry_windows",
        ["model", "version", "role", "window_start"],
    )

    op.create_table(
        "telemetry_batches",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        _ts("received_at"),
        sa.PrimaryKeyConstraint("device_id", "seq", name="pk_telemetry_batches"),
    )

    op.create_table(
        "update_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _ts("at"),
        sa.PrimaryKeyConstraint("id", name="pk_update_events"),
    )
    op.create_index("ix_update_events_device_id", "update_events", ["device_id"])


def downgrade() -> None:
    for table in (
        "update_events",
        "telemetry_batches",
        "telemetry_windows",
        "assignments",
        "decisions",
        "rollout_devices",
        "rollouts",
        "enrollment_tokens",
        "devices",
        "model_aliases",
        "model_versions",
    ):
        op.drop_table(table)
