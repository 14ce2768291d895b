"""Request and response bodies of the feedback routes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.feedback.tables import (
    NOTE_MAX_CHARS,
    REVIEWER_MAX_CHARS,
    FeedbackRow,
    PredictionRow,
    Verdict,
)


class FeedbackIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {"verdict": "false_alarm", "note": "selvage fold", "reviewer": "line 3"}
        },
    )

    verdict: Verdict = Field(
        description="real_defect: the alarm was right; false_alarm: defect-free fabric; "
        "missed_defect: a defect the model did not report"
    )
    note: str | None = Field(default=None, max_length=NOTE_MAX_CHARS)
    reviewer: str | None = Field(
        default=None, max_length=REVIEWER_MAX_CHARS, description="who says so (a name, a shift)"
    )


class FeedbackOut(BaseModel):
    id: int
    prediction_id: str
    created_at: datetime
    verdict: Verdict
    note: str | None
    reviewer: str | None

    @classmethod
    def of(cls, row: FeedbackRow) -> FeedbackOut:
        return cls(
            id=row.id,
            prediction_id=row.prediction_id,
            created_at=row.created_at,
            verdict=Verdict(row.verdict),
            note=row.note,
            reviewer=row.reviewer,
        )


class RecordedModel(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    digest: str = Field(description="the bundle (manifest and weights)")
    weights_digest: str = Field(
        description="the weights and the scale of their raw scores (pipeline.image_level): "
        "the same across calibrations that keep the scale"
    )


class PredictionRecord(BaseModel):
    id: str = Field(description="the prediction id that /predict answered (prediction_id)")
    created_at: datetime
    request_id: str
    filename: str | None
    image_sha256: str
    width: int
    height: int
    model: RecordedModel
    fabric: str | None
    decision: Literal["anomalous", "normal"]
    score: float
    threshold: float
    raw_score: float
    raw_threshold: float
    kept_regions: int
    kept_area: int = Field(description="fabric pixels in the kept regions, together")
    regions: dict[str, Any] = Field(
        description="kept: the regions reported; suppressed: the suppression log's regions"
    )
    has_thumbnail: bool
    has_image: bool = Field(description="the image was kept (FEEDBACK_IMAGE_DIR)")
    verdict: Verdict | None = Field(description="the newest feedback's verdict")
    feedback: list[FeedbackOut] = Field(description="all feedback, oldest first")

    @classmethod
    def of(cls, row: PredictionRow) -> PredictionRecord:
        feedback = [FeedbackOut.of(item) for item in row.feedback]
        return cls(
            id=row.id,
            created_at=row.created_at,
            request_id=row.request_id,
            filename=row.filename,
            image_sha256=row.image_sha256,
            width=row.width,
            height=row.height,
            model=RecordedModel(
                name=row.model_name,
                version=row.model_version,
                digest=row.model_digest,
                weights_digest=row.weights_digest,
            ),
            fabric=row.fabric,
            decision="anomalous" if row.decision == "anomalous" else "normal",
            score=row.score,
            threshold=row.threshold,
            raw_score=row.raw_score,
            raw_threshold=row.raw_threshold,
            kept_regions=row.kept_regions,
            kept_area=row.kept_area,
            regions=row.regions,
            has_thumbnail=row.thumbnail_png is not None,
            has_image=row.image_path is not None,
            verdict=feedback[-1].verdict if feedback else None,
            feedback=feedback,
        )


class PredictionList(BaseModel):
    count: int
    items: list[PredictionRecord] = Field(description="newest first")
    fabrics: list[str] = Field(description="every fabric recorded, for filtering")
