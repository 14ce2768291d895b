"""The review page and the API docs in a real browser: Playwright driving Debian's Chromium
(`apt-get install chromium`; Playwright's own browser downloads are not used).

A real service on a loopback port, with an API key and a SQLite feedback database: the page
takes the key, scores a strip with a hostile file name, shows the overlay, takes a "false alarm"
with a hostile note, and the row is in the database; nothing typed or uploaded runs as script,
the key never appears in a URL, and no request leaves the service's own origin.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn

from app.main import create_app
from tests.helpers import free_port, make_settings, png_bytes, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("LOOMWATCH_CHROMIUM", "/usr/bin/chromium"))
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
API_KEY = "k3y-for-headers-only"
HOSTILE_NAME = "<img src=x onerror=alert('name')>.png"
HOSTILE_NOTE = "</td><script>alert('note')</script><svg onload=alert('svg')>"


@dataclass
class Live:
    url: str
    database: Path


def sync_api() -> Any:
    return pytest.importorskip("playwright.sync_api", reason="pip install playwright")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or LOOMWATCH_CHROMIUM)")
    with sync_api().sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def live(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The service under uvicorn in a thread, as `loomwatch serve` runs it."""
    database = tmp_path_factory.mktemp("browser") / "feedback.db"
    settings = make_settings(bundle, None, database_url=f"sqlite:///{database}", api_key=API_KEY)
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 120, "the service to start")
    yield Live(f"http://127.0.0.1:{port}", database)
    server.should_exit = True
    thread.join(30)


@pytest.fixture()
def strip(defect_strip: np.ndarray, tmp_path: Path) -> Path:
    path = tmp_path / HOSTILE_NAME
    path.write_bytes(png_bytes(defect_strip))
    return path


class Watch:
    """What a page did: dialogs opened (injected script ran), requests, console errors."""

    def __init__(self, page: Any) -> None:
        self.dialogs: list[str] = []
        self.urls: list[str] = []
        self.finished: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self.on_dialog)
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("requestfinished", lambda request: self.finished.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on(
            "console",
            lambda message: self.errors.append(message.text) if message.type == "error" else None,
        )

    def on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def test_review_page_scores_a_strip_and_stores_a_false_alarm(
    browser: Any, live: Live, strip: Path
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = Watch(page)
    page.goto(f"{live.url}/ui")
    expect = sync_api().expect  # polls from outside the page: its CSP forbids eval
    expect(page.locator("#model")).to_contain_text("API key")

    page.fill("#key", API_KEY)
    page.fill("#reviewer", "night shift")
    page.click("#access button[type=submit]")
    expect(page.locator("#model")).to_contain_text("version")
    watch.errors.clear()  # the 401s of the page's first look, before it had the key

    page.set_input_files("#files", str(strip))
    card = page.locator(".result[data-state=done]")
    card.wait_for(timeout=60_000)
    overlay = card.locator("canvas.overlay")
    assert overlay.count() >= 1
    assert card.locator(".badge.anomalous").count() == 1
    assert card.locator("table.regions").first.locator("tr").count() >= 2  # a kept region
    drawn = page.evaluate(
        "() => { const c = document.querySelector('.result canvas.overlay');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let red = 0; for (let i = 0; i < d.length; i += 4)"
        " if (d[i] > 200 && d[i + 1] < 40 && d[i + 2] < 40) red++; return red; }"
    )
    assert drawn > 0, "no kept region outlined in red on the overlay"
    assert card.locator("h3").inner_text().startswith(HOSTILE_NAME)  # shown as text

    prediction_id = card.get_attribute("data-prediction")
    assert prediction_id
    card.locator(".feedback .note").fill(HOSTILE_NOTE)
    card.locator("button[data-verdict=false_alarm]").click()
    card.locator(".feedback[data-state=saved]").wait_for(timeout=10_000)

    with sqlite3.connect(live.database) as connection:
        stored = connection.execute(
            "SELECT p.filename, p.decision, f.verdict, f.note, f.reviewer FROM predictions p "
            "JOIN feedback f ON f.prediction_id = p.id WHERE p.id = ?",
            (prediction_id,),
        ).fetchall()
    assert stored == [(HOSTILE_NAME, "anomalous", "false_alarm", HOSTILE_NOTE, "night shift")]

    # The recent list shows the name and the note back, as text
    page.click("#filters button[type=submit]")
    row = page.locator(f"#recent tr[data-prediction='{prediction_id}']")
    row.wait_for()
    row.locator("img.thumb").wait_for()
    assert HOSTILE_NAME in row.inner_text() and HOSTILE_NOTE in row.inner_text()
    assert "false alarm" in row.inner_text()
    assert page.locator("img[src=x], svg, script:not([src])").count() == 0
    assert watch.dialogs == []  # no injected script ran
    assert not [url for url in watch.urls if API_KEY in url]  # the key only in headers
    assert all(url.startswith((live.url, "blob:", "data:")) for url in watch.urls), watch.urls
    assert watch.errors == []
    page.close()


def test_the_page_refuses_quietly_without_the_key(browser: Any, live: Live) -> None:
    page = browser.new_page()
    page.goto(f"{live.url}/ui")
    sync_api().expect(page.locator("#recent-status")).to_contain_text("needs an API key")
    sync_api().expect(page.locator("#model")).to_contain_text("needs an API key")
    page.close()


@pytest.mark.parametrize(("path", "ready"), [("/docs", ".opblock"), ("/redoc", "h1")])
def test_the_api_docs_render_from_the_service_alone(
    browser: Any, live: Live, path: str, ready: str
) -> None:
    page = browser.new_page()
    watch = Watch(page)
    page.goto(f"{live.url}{path}")
    page.locator(ready).first.wait_for(timeout=30_000)
    assert "Loomwatch" in page.content()
    own = (live.url, f"blob:{live.url}")  # ReDoc runs its search in a worker made from a blob
    assert watch.finished and all(url.startswith(own) for url in watch.finished), watch.finished
    # ReDoc's footer links a logo from its makers' site: the CSP blocks it, nothing else
    blocked = [error for error in watch.errors if "Content Security Policy" in error]
    assert len(watch.errors) == len(blocked) <= (1 if path == "/redoc" else 0), watch.errors
    page.close()
