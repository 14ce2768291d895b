"""Schemathesis against the service's own OpenAPI schema, in-process (one started app).

    report = fuzz(app, examples_per_operation=10)   # inside `with TestClient(app):` or not

Cases come from the schema (both valid and invalid parameters and bodies). An upload the schema
can only call "a string of bytes" is, in about half of the cases, replaced by a real image of
the corpus (a fabric strip in PNG, JPEG, TIFF, 16-bit, palette, or a hostile file), so that the
scoring paths are exercised, not only the refusals. Every response must pass schemathesis'
checks: no 5xx, a documented status code, content type, headers and body that match the schema,
invalid input refused, and the API key enforced where the schema says so. One check is left out:
"schema-valid data accepted" cannot hold, since the schema cannot say "a decodable image".
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS
from schemathesis.core.result import Ok
from schemathesis.python.asgi import shutdown_lifespans

UPLOAD_FIELDS = ("file", "files")


@dataclass
class FuzzReport:
    cases: int = 0
    by_operation: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # one line each, deduplicated
    details: dict[str, str] = field(default_factory=dict)  # schemathesis' report of each

    def line(self) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return f"{self.cases} cases, {len(self.failures)} failures; statuses {statuses}"


def _checks() -> list[Any]:
    excluded = {"positive_data_acceptance", "max_response_time"}
    return [check for check in CHECKS.get_all() if check.__name__ not in excluded]


def _with_upload(case: Any, upload: bytes | None) -> None:
    """Put a real image where the generated body has an upload field."""
    if upload is None or not isinstance(case.body, dict):
        return
    for name in UPLOAD_FIELDS:
        if name in case.body:
            case.body[name] = [upload] if name == "files" else upload


def _record(report: FuzzReport, message: str, exc: BaseException) -> None:
    if message not in report.details:
        report.failures.append(message)
        report.details[message] = str(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip().startswith("- "):  # schemathesis: "- <check title>"
            return line.strip()[2:]
    return text.splitlines()[0] if text else type(exc).__name__


def fuzz(
    app: FastAPI,
    examples_per_operation: int,
    uploads: list[bytes],
    headers: dict[str, str] | None = None,
    seed: int = 0,
) -> FuzzReport:
    """Run `examples_per_operation` generated cases against every operation of `app`."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    report = FuzzReport()
    checks = _checks()
    multipart_log = logging.getLogger("python_multipart")  # warns on each malformed body (400)
    level = multipart_log.level
    multipart_log.setLevel(logging.ERROR)
    try:
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):
                report.failures.append(f"the schema has an invalid operation: {result.err()}")
                continue
            operation = result.ok()
            # Real images go only into valid cases: a negative case stays invalid.
            valid = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
            invalid = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
            images = st.one_of(st.none(), st.integers(0, len(uploads) - 1))  # an index: short repr
            pairs = st.one_of(st.tuples(valid, images), st.tuples(invalid, st.none()))

            @hypothesis.seed(seed)
            @given(pair=pairs)
            @settings(
                max_examples=examples_per_operation,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(pair: tuple[Any, int | None]) -> None:
                case, upload = pair
                label = case.operation.label
                _with_upload(case, None if upload is None else uploads[upload])
                report.cases += 1
                report.by_operation[label] += 1
                try:
                    response = case.call(headers=headers)
                except Exception as exc:  # in-process, an unhandled error reaches the caller
                    report.statuses[500] += 1
                    _record(report, f"{label}: 500: {type(exc).__name__}: {exc}", exc)
                    return
                report.statuses[response.status_code] += 1
                try:
                    case.validate_response(response, checks=checks, headers=headers)
                except (Exception, BaseExceptionGroup) as exc:  # recorded; the fuzzing goes on
                    _record(report, f"{label}: {response.status_code}: {_first_line(exc)}", exc)

            run()
    finally:  # schemathesis started the app's lifespan (once) for its in-process calls
        shutdown_lifespans()
        multipart_log.setLevel(level)
    return report
