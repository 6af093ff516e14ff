"""``/docs`` (Swagger UI) and ``/redoc`` work offline: the pages reference only assets the service serves itself,
and headless Chromium, with every host but the API's made unresolvable, renders every operation of the document
and Swagger UI's "Try it out" calls the API. The browser tests are skipped when /usr/bin/chromium is absent (as
test_browser.py's are)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ApiServer
from .test_browser import CHROMIUM, Browser

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium is not installed "
                                                                       "(apt-get install chromium; the CI script does)")
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"  # no CDN, no fonts, no validator
# Every resource the page tried to load from another host, and those its Content-Security-Policy blocked.
FOREIGN = "performance.getEntriesByType('resource').map(e => e.name).filter(u => !u.startsWith(location.origin))"
NOTE_BLOCKED = ("window.blocked = []; document.addEventListener('securitypolicyviolation', "
                "e => window.blocked.push(e.blockedURI))")


def _open(browser: Browser, url: str) -> None:
    browser.send("Page.addScriptToEvaluateOnNewDocument", {"source": NOTE_BLOCKED}, page=True)
    browser.goto(url)


def _assert_nothing_left_the_host(browser: Browser) -> None:
    """Only resources of the API were loaded; anything else the page asked for was refused by its CSP before a
    request went out (ReDoc's footer logo)."""
    foreign, blocked = browser.js(FOREIGN), browser.js("window.blocked")
    assert set(foreign) <= set(blocked), f"fetched from other hosts: {sorted(set(foreign) - set(blocked))}"


@pytest.fixture
def offline_browser() -> Iterator[Browser]:
    with tempfile.TemporaryDirectory(prefix="ddpm-chromium-") as profile:
        browser = Browser(Path(profile), [OFFLINE])
        try:
            yield browser
        finally:
            browser.close()


def test_the_pages_reference_only_assets_the_service_serves(api_server: ApiServer) -> None:
    for page in ("/docs", "/redoc"):
        r = httpx.get(api_server.url + page)
        assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
        links = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert links and all(link.startswith("/docs/assets/") for link in links), links
        for link in links:
            asset = httpx.get(api_server.url + link)
            assert asset.status_code == 200 and len(asset.content) > 1000, link
        assert "url: '/openapi.json'" in r.text or 'spec-url="/openapi.json"' in r.text


def _operations(api: ApiServer) -> set[str]:
    document = httpx.get(f"{api.url}/openapi.json").json()
    return {op["operationId"] for item in document["paths"].values() for op in item.values()}


@pytest.mark.browser
@needs_chromium
def test_swagger_ui_renders_every_operation_and_tries_one_offline(offline_browser: Browser, api_server: ApiServer,
                                                                  tmp_path: Path) -> None:
    browser, operations = offline_browser, _operations(api_server)
    _open(browser, f"{api_server.url}/docs")
    browser.wait_for(f"document.querySelectorAll('.opblock').length === {len(operations)}", timeout=30)
    shown = browser.js("[...document.querySelectorAll('.opblock')].map(b => b.id)")  # operations-<tag>-<id>
    assert {block.rsplit("-", 1)[-1] for block in shown} == operations
    for control in (".opblock-summary-control", ".try-out__btn", ".execute"):  # open, "Try it out", "Execute"
        button = f"document.querySelector('#operations-service-list_models {control}')"
        browser.wait_for(f"{button} !== null")
        browser.js(f"{button}.click()")
    status = "document.querySelector('#operations-service-list_models .live-responses-table .response " \
             ".response-col_status')"
    assert browser.wait_for(f"{status} && {status}.textContent.trim()", timeout=30) == "200"
    assert '"name": "tiny"' in browser.js("document.querySelector('#operations-service-list_models "
                                          ".live-responses-table .microlight').textContent")
    _assert_nothing_left_the_host(browser)
    assert browser.screenshot(tmp_path / "docs-swagger-ui.png").stat().st_size > 0


@pytest.mark.browser
@needs_chromium
def test_redoc_renders_every_operation_offline(offline_browser: Browser, api_server: ApiServer,
                                               tmp_path: Path) -> None:
    browser, operations = offline_browser, _operations(api_server)
    _open(browser, f"{api_server.url}/redoc")
    sections = "[...document.querySelectorAll('[data-section-id*=\"operation/\"]')]"
    browser.wait_for(f"{sections}.length >= {len(operations)}", timeout=30)
    shown = browser.js(f"{sections}.map(s => s.dataset.sectionId.split('operation/')[1])")
    assert set(shown) == operations
    _assert_nothing_left_the_host(browser)
    assert browser.screenshot(tmp_path / "docs-redoc.png").stat().st_size > 0
