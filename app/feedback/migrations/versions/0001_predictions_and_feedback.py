"""Predictions and feedback: the first revision.

Revision ID: 0001
Revises: (none)
Create Date: 2026-12-01 05:06:05.548752
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=True),
        sa.Column("image_sha256", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("model_digest", sa.String(length=64), nullable=False),
        sa.Column("weights_digest", sa.String(length=64), nullable=False),
        sa.Column("fabric", sa.String(length=64), nullable=True),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("raw_score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("raw_threshold", sa.Float(), nullable=False),
        sa.Column("kept_regions", sa.Integer(), nullable=False),
        sa.Column("kept_area", sa.Integer(), nullable=False),
        sa.Column("regions", sa.JSON(), nullable=False),
        sa.Column("thumbnail_png", sa.LargeBinary(), nullable=True),
        sa.Column("image_path", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
    )
    op.create_index(op.f("ix_predictions_created_at"), "predictions", ["created_at"], unique=False)
    op.create_index(op.f("ix_predictions_decision"), "predictions", ["decision"], unique=False)
    op.create_index(op.f("ix_predictions_fabric"), "predictions", ["fabric"], unique=False)
    op.create_index(
        op.f("ix_predictions_image_sha256"), "predictions", ["image_sha256"], unique=False
    )
    op.create_index(
        op.f("ix_predictions_weights_digest"), "predictions", ["weights_digest"], unique=False
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("prediction_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("note", sa.String(length=1000), nullable=True),
        sa.Column("reviewer", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["predictions.id"],
            name=op.f("fk_feedback_prediction_id_predictions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index(op.f("ix_feedback_prediction_id"), "feedback", ["prediction_id"], unique=False)
    op.create_index(op.f("ix_feedback_verdict"), "feedback", ["verdict"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_feedback_verdict"), table_name="feedback")
    op.drop_index(op.f("ix_feedback_prediction_id"), table_name="feedback")
    op.drop_table("feedback")
    op.drop_index(op.f("ix_predictions_weights_digest"), table_name="predictions")
    op.drop_index(op.f("ix_predictions_image_sha256"), table_name="predictions")
    op.drop_index(op.f("ix_predictions_fabric"), table_name="predictions")
    op.drop_index(op.f("ix_predictions_decision"), table_name="predictions")
    op.drop_index(op.f("ix_predictions_created_at"), table_name="predictions")
    op.drop_table("predictions")
