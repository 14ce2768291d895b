"""The feedback database's tables. Changing them means a new Alembic revision (migrations/)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NOTE_MAX_CHARS = 1000
REVIEWER_MAX_CHARS = 64
FILENAME_MAX_CHARS = 255

# Constraint names fixed by convention, so that migrations name them the same on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Verdict(StrEnum):
    real_defect = "real_defect"  # the alarm was right
    false_alarm = "false_alarm"  # an alarm on defect-free fabric
    missed_defect = "missed_defect"  # a defect the model called normal (or did not mark)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class PredictionRow(Base):
    """One image the service scored: what it decided, with which model, on which image."""

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    request_id: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str | None] = mapped_column(String(FILENAME_MAX_CHARS))
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    model_digest: Mapped[str] = mapped_column(String(64))
    weights_digest: Mapped[str] = mapped_column(String(64), index=True)
    fabric: Mapped[str | None] = mapped_column(String(64), index=True)
    decision: Mapped[str] = mapped_column(String(16), index=True)
    score: Mapped[float] = mapped_column(Float)
    raw_score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    raw_threshold: Mapped[float] = mapped_column(Float)
    kept_regions: Mapped[int] = mapped_column(Integer)
    kept_area: Mapped[int] = mapped_column(Integer)
    # kept and suppressed regions (boxes, scores, reasons) as the API answered them
    regions: Mapped[dict[str, object]] = mapped_column(JSON)
    thumbnail_png: Mapped[bytes | None] = mapped_column(LargeBinary)
    image_path: Mapped[str | None] = mapped_column(Text)  # only when images are kept
    feedback: Mapped[list[FeedbackRow]] = relationship(
        back_populates="prediction", order_by="FeedbackRow.id", lazy="selectin"
    )


class FeedbackRow(Base):
    """What a person said about one prediction; the newest row of a prediction is its verdict."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prediction_id: Mapped[str] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    verdict: Mapped[str] = mapped_column(String(16), index=True)
    note: Mapped[str | None] = mapped_column(String(NOTE_MAX_CHARS))
    reviewer: Mapped[str | None] = mapped_column(String(REVIEWER_MAX_CHARS))
    prediction: Mapped[PredictionRow] = relationship(back_populates="feedback")
