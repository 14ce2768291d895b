"""The browser pages work offline: Swagger UI, ReDoc and the review page load every script,
style and image from the app itself, run no inline script, and keep a strict CSP; the review
page's script writes what the service says as text only. (tests/app/test_browser.py drives the
review page in a real browser.)"""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

PAGES = ("/docs", "/redoc", "/ui")


class _References(HTMLParser):
    """Every URL a page references (src, href), and the text of each inline script."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts: list[str] = []
        self.inline_styles = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]
        self.inline_styles += "style" in values or tag == "style"
        if tag == "script":
            self._in_script = "src" not in values
        for name, _ in attrs:
            assert not name.startswith("on"), f"inline handler {name} on <{tag}>"

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


def references(html: str) -> _References:
    parser = _References()
    parser.feed(html)
    return parser


def csp_directives(header: str) -> dict[str, list[str]]:
    directives = [part.split() for part in header.split(";") if part.strip()]
    return {words[0]: words[1:] for words in directives}


@pytest.mark.parametrize("path", PAGES)
def test_the_pages_reference_no_other_host_and_every_file_is_served(
    client: TestClient, path: str
) -> None:
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    found = references(page.text)
    assert found.urls, "the page loads nothing: the viewer cannot start"
    assert not found.inline_scripts and not found.inline_styles
    for url in found.urls:
        assert "//" not in url and ":" not in url, f"{path} references {url}"
        asset = client.get(f"/{url}")  # relative to the site root, where the page is
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    scripts = [url for url in found.urls if url.endswith(".js")]
    assert any("vendor" not in url for url in scripts)  # ours starts the page
    if path != "/ui":
        assert any("vendor" in url for url in scripts)  # the viewer itself, from the package


@pytest.mark.parametrize("path", PAGES)
def test_the_pages_csp_allows_only_the_app_itself(client: TestClient, path: str) -> None:
    csp = csp_directives(client.get(path).headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]  # no inline script, no eval, no CDN
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["form-action"] == ["'none'"]
    for sources in csp.values():
        assert not any("http" in source or "*" in source for source in sources), sources


def test_the_review_page_allows_no_inline_style_either(client: TestClient) -> None:
    csp = csp_directives(client.get("/ui").headers["content-security-policy"])
    assert csp["style-src"] == ["'self'"]
    assert csp["img-src"] == ["'self'", "data:", "blob:"]  # the upload, heatmap, thumbnails


def test_the_review_script_writes_text_only(client: TestClient) -> None:
    """No API for markup anywhere in the script: names and notes can only ever be text."""
    script = client.get("/static/ui.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setAttribute(\"style", "srcdoc"):  # fmt: skip
        assert sink not in script, sink
    assert "textContent" in script
    assert "X-API-Key" in script and "?key" not in script and "&key" not in script


def test_the_viewers_are_started_by_scripts_of_ours_on_the_apps_schema(
    client: TestClient,
) -> None:
    for page, starter, viewer in (
        ("/docs", "docs.js", "SwaggerUIBundle"),
        ("/redoc", "redoc.js", "Redoc"),
    ):
        assert 'data-spec="openapi.json"' in client.get(page).text
        script = client.get(f"/static/{starter}")
        assert script.status_code == 200 and viewer in script.text
    assert "validatorUrl: null" in client.get("/static/docs.js").text  # no outside validator
    assert client.get("/openapi.json").json()["info"]["title"] == "Loomwatch"


def test_static_files_stay_inside_their_folders(client: TestClient) -> None:
    for path in ("/static/../settings.py", "/static/%2e%2e/settings.py", "/static/vendor/../x"):
        assert client.get(path).status_code == 404, path
