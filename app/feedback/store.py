"""The feedback database behind one small interface: :class:`FeedbackStore`.

Every call is synchronous (SQLAlchemy's ORM) and runs off the event loop. A database that cannot
be reached raises :class:`FeedbackUnavailableError` (one line, no password), which the routes answer
with 503; recording a prediction never fails the request that scored it.

SQLite (the default, a file) is opened per use (``NullPool``), so a file that disappears or
locks up shows at once, and threads never share a connection; PostgreSQL keeps a pool that is
checked before each use (``pool_pre_ping``). The schema is Alembic's newest revision: the store
upgrades the database before its first use, and again after a failure.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, func, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.feedback.tables import FeedbackRow, PredictionRow, Verdict

log = logging.getLogger("loomwatch.app")

MIGRATIONS = Path(__file__).parent / "migrations"
PURGE_EVERY_S = 600.0  # kept images past their retention are deleted at most this often
RECENT_MAX = 500
UNREVIEWED = "none"  # the verdict filter for predictions without feedback


class FeedbackUnavailableError(RuntimeError):
    """The feedback database cannot be used now; the message says why in one line."""


class UnknownPredictionError(LookupError):
    """No prediction has that id."""


@dataclass(frozen=True)
class NewPrediction:
    """What the service records about one scored image."""

    id: str
    request_id: str
    filename: str | None
    image_sha256: str
    image_format: str
    width: int
    height: int
    model_name: str
    model_version: str
    model_digest: str
    weights_digest: str
    fabric: str | None
    decision: str
    score: float
    raw_score: float
    threshold: float
    raw_threshold: float
    regions: dict[str, Any]
    thumbnail_png: bytes | None = None
    image: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LabelledScore:
    """One reviewed prediction, as ``loomwatch calibrate --feedback`` reads it."""

    prediction_id: str
    raw_score: float
    decision: str
    verdict: str | None  # the newest verdict; None: nobody said anything
    label: int | None  # 1 defective, 0 defect-free, None unknown (an alarm nobody reviewed)


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparsable URL)"


def _engine(url: URL, timeout_s: float) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": timeout_s})

        @event.listens_for(engine, "connect")
        def _foreign_keys(connection: Any, _: Any) -> None:
            connection.execute("PRAGMA foreign_keys=ON")

        return engine
    options: dict[str, Any] = {"pool_pre_ping": True, "pool_timeout": timeout_s}
    if url.get_backend_name() == "postgresql":
        options["connect_args"] = {"connect_timeout": max(1, math.ceil(timeout_s))}
    return create_engine(url, **options)


def _utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class FeedbackStore:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 3.0,
        image_dir: Path | None = None,
        retention_days: float = 30.0,
        thumbnails: bool = True,
    ) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ValueError(f"DATABASE_URL is not a database URL: {safe_url(url)}") from None
        self.url = safe_url(url)
        self.engine = _engine(parsed, timeout_s)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.image_dir = image_dir
        self.retention = timedelta(days=retention_days)
        self.thumbnails = thumbnails
        self._migrated = False
        self._lock = threading.Lock()
        self._last_purge = -math.inf

    # ---- schema ------------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Bring the database to Alembic's newest revision (once; again after a failure)."""
        with self._lock:
            if self._migrated:
                return
            url = self.engine.url
            with self._errors("migrate"):
                if url.get_backend_name() == "sqlite" and url.database not in (
                    None,
                    "",
                    ":memory:",
                ):
                    Path(str(url.database)).parent.mkdir(parents=True, exist_ok=True)
            with self._errors("migrate"), self.engine.begin() as connection:
                config = alembic_config()
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
            self._migrated = True

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (SQLAlchemyError, OSError) as exc:
            self._migrated = False  # it may come back empty: upgrade again before next use
            reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]
            raise FeedbackUnavailableError(
                f"the feedback database ({self.url}) is unavailable ({doing}): {reason}"
            ) from None

    @contextmanager
    def session(self, doing: str) -> Iterator[Session]:
        self.upgrade()
        with self._errors(doing), self.sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # ---- predictions -------------------------------------------------------------------------

    def record(self, predictions: Sequence[NewPrediction]) -> None:
        """Insert scored images (and keep their files when asked); all or none."""
        now = datetime.now(UTC)
        written: list[Path] = []
        try:
            rows = [self._row(item, now, written) for item in predictions]
            with self.session("record") as session:
                session.add_all(rows)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        if time.monotonic() - self._last_purge > PURGE_EVERY_S:
            self.purge_expired(now)

    def _row(self, item: NewPrediction, now: datetime, written: list[Path]) -> PredictionRow:
        image_path = None
        if self.image_dir is not None and item.image is not None:
            image_path = self._keep_image(item, now)
            written.append(image_path)
        kept = item.regions.get("kept", [])
        return PredictionRow(
            id=item.id,
            created_at=now,
            request_id=item.request_id,
            filename=item.filename[:255] if item.filename else None,
            image_sha256=item.image_sha256,
            width=item.width,
            height=item.height,
            model_name=item.model_name,
            model_version=item.model_version,
            model_digest=item.model_digest,
            weights_digest=item.weights_digest,
            fabric=item.fabric,
            decision=item.decision,
            score=item.score,
            raw_score=item.raw_score,
            threshold=item.threshold,
            raw_threshold=item.raw_threshold,
            kept_regions=len(kept),
            kept_area=sum(int(region["area"]) for region in kept),
            regions=item.regions,
            thumbnail_png=item.thumbnail_png if self.thumbnails else None,
            image_path=str(image_path) if image_path else None,
        )

    def _keep_image(self, item: NewPrediction, now: datetime) -> Path:
        assert self.image_dir is not None and item.image is not None
        folder = self.image_dir / now.strftime("%Y-%m-%d")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{item.id}.{item.image_format.lower()}"
            partial = target.with_suffix(".partial")
            partial.write_bytes(item.image)
            partial.replace(target)
        except OSError as exc:
            raise FeedbackUnavailableError(
                f"cannot keep the image in {self.image_dir}: {exc.strerror or exc}"
            ) from None
        return target

    def purge_expired(self, now: datetime | None = None) -> int:
        """Delete kept images and thumbnails older than the retention bound; how many."""
        now = now or datetime.now(UTC)
        self._last_purge = time.monotonic()
        cutoff = now - self.retention
        with self.session("purge") as session:
            expired = session.execute(
                select(PredictionRow.id, PredictionRow.image_path).where(
                    PredictionRow.created_at < cutoff,
                    (PredictionRow.image_path.is_not(None))
                    | (PredictionRow.thumbnail_png.is_not(None)),
                )
            ).all()
            for _, path in expired:
                if path:
                    Path(path).unlink(missing_ok=True)
            ids = [row_id for row_id, _ in expired]
            if ids:
                session.execute(
                    update(PredictionRow)
                    .where(PredictionRow.id.in_(ids))
                    .values(image_path=None, thumbnail_png=None)
                )
        if ids:
            log.info("feedback store: %d kept image(s) past retention deleted", len(ids))
        return len(ids)

    def recent(
        self,
        limit: int = 50,
        decision: str | None = None,
        fabric: str | None = None,
        verdict: str | None = None,
        before: datetime | None = None,
    ) -> list[PredictionRow]:
        """Newest first, filtered; ``verdict`` matches a prediction's newest feedback, and
        ``"none"`` (UNREVIEWED) the predictions nobody gave feedback on."""
        query = select(PredictionRow).order_by(PredictionRow.created_at.desc(), PredictionRow.id)
        if decision:
            query = query.where(PredictionRow.decision == decision)
        if fabric:
            query = query.where(PredictionRow.fabric == fabric)
        if before:
            query = query.where(PredictionRow.created_at < before)
        if verdict == UNREVIEWED:
            given = select(FeedbackRow.id).where(FeedbackRow.prediction_id == PredictionRow.id)
            query = query.where(~given.exists())
        elif verdict:
            newest = (
                select(FeedbackRow.verdict)
                .where(FeedbackRow.prediction_id == PredictionRow.id)
                .order_by(FeedbackRow.id.desc())
                .limit(1)
                .scalar_subquery()
            )
            query = query.where(newest == verdict)
        with self.session("list") as session:
            rows = list(session.scalars(query.limit(min(limit, RECENT_MAX))))
        for row in rows:
            row.created_at = _utc(row.created_at)
            for item in row.feedback:
                item.created_at = _utc(item.created_at)
        return rows

    def get(self, prediction_id: str) -> PredictionRow:
        with self.session("read") as session:
            row = session.get(PredictionRow, prediction_id)
            if row is None:
                raise UnknownPredictionError(prediction_id)
            row.created_at = _utc(row.created_at)
            for item in row.feedback:
                item.created_at = _utc(item.created_at)
            return row

    def fabrics(self) -> list[str]:
        with self.session("list") as session:
            query = select(PredictionRow.fabric).where(PredictionRow.fabric.is_not(None))
            return sorted({fabric for fabric in session.scalars(query.distinct()) if fabric})

    def kept_image(self, prediction_id: str) -> tuple[bytes | None, str]:
        """The kept image's bytes (None when not kept, or gone) and its format (PNG, JPEG...)."""
        path = self.get(prediction_id).image_path
        if path is None:
            return None, ""
        try:
            return Path(path).read_bytes(), Path(path).suffix.lstrip(".").upper()
        except OSError:
            return None, ""

    # ---- feedback ----------------------------------------------------------------------------

    def add_feedback(
        self, prediction_id: str, verdict: Verdict, note: str | None, reviewer: str | None
    ) -> FeedbackRow:
        with self.session("feedback") as session:
            if session.get(PredictionRow, prediction_id) is None:
                raise UnknownPredictionError(prediction_id)
            row = FeedbackRow(
                prediction_id=prediction_id,
                created_at=datetime.now(UTC),
                verdict=verdict.value,
                note=note or None,
                reviewer=reviewer or None,
            )
            session.add(row)
        return row

    def verdict_counts(self) -> dict[str, int]:
        """Feedback rows by verdict (every row, not only the newest of each prediction)."""
        with self.session("count") as session:
            query = select(FeedbackRow.verdict, func.count()).group_by(FeedbackRow.verdict)
            counted = {verdict: int(count) for verdict, count in session.execute(query)}
        return {verdict.value: counted.get(verdict.value, 0) for verdict in Verdict}

    # ---- evidence for calibration ------------------------------------------------------------

    def labelled_scores(
        self, weights_digest: str | None = None, since: datetime | None = None
    ) -> list[LabelledScore]:
        """Every prediction of these weights with what is known of its truth.

        The newest verdict decides: ``real_defect`` and ``missed_defect`` make it defective,
        ``false_alarm`` defect-free. Without feedback, a strip decided normal counts as
        defect-free (nobody reported a missed defect on it), an alarm as unknown (label None).
        """
        newest = (
            select(FeedbackRow.prediction_id, func.max(FeedbackRow.id).label("newest"))
            .group_by(FeedbackRow.prediction_id)
            .subquery()
        )
        query = (
            select(PredictionRow.id, PredictionRow.raw_score, PredictionRow.decision)
            .add_columns(FeedbackRow.verdict)
            .outerjoin(newest, newest.c.prediction_id == PredictionRow.id)
            .outerjoin(FeedbackRow, FeedbackRow.id == newest.c.newest)
            .order_by(PredictionRow.created_at)
        )
        if weights_digest:
            query = query.where(PredictionRow.weights_digest == weights_digest)
        if since:
            query = query.where(PredictionRow.created_at >= since)
        with self.session("read") as session:
            found = session.execute(query).all()
        scores = []
        for prediction_id, raw_score, decision, verdict in found:
            label: int | None
            if verdict is None:
                label = None if decision == "anomalous" else 0
            else:
                label = int(verdict != Verdict.false_alarm.value)
            scores.append(LabelledScore(prediction_id, raw_score, decision, verdict, label))
        return scores
