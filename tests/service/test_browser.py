"""The page at ``/`` in headless Chromium, driven over the DevTools protocol (a pipe, no extra packages).

Skipped when /usr/bin/chromium (Debian's ``chromium``) is absent; the CI script installs it. The job behind
the page is run by the real worker process (``shared_stack``); set ``DDPM_SCREENSHOT_DIR`` to keep the
screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from service.queue import JobStore, connect
from service.redis_server import RedisServer
from service.settings import Settings

from .conftest import ApiServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium is not installed "
                                                           "(apt-get install chromium; the CI script does)"),
]


class Browser:
    """Headless Chromium with one page, controlled by DevTools messages over --remote-debugging-pipe
    (Chromium reads NUL-terminated JSON commands on fd 3 and writes replies on fd 4)."""

    def __init__(self, profile: Path, extra_args: Sequence[str] = ()):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # in the child: the pipe ends become fds 3 and 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--remote-debugging-pipe", "--window-size=1100,900", *extra_args, "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=wire_fds, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._next = b"", 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method: str, params: dict[str, Any] | None = None, *, page: bool = False,
             timeout: float = 20.0) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]  # type: ignore[no-any-return]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"no DevTools reply to {method}")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk

    def goto(self, url: str) -> None:
        self.send("Page.enable", page=True)
        self.send("Page.navigate", {"url": url}, page=True)

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, page=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # e.g. the page is still loading
                value = self.js(expression)
                if value:
                    return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never satisfied {expression!r}; status: {self.js('document.body.innerText')}")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, page=True)["data"]
        path.write_bytes(base64.b64decode(data))
        keep = os.environ.get("DDPM_SCREENSHOT_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
        return path

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with tempfile.TemporaryDirectory(prefix="ddpm-chromium-") as profile:
        b = Browser(Path(profile))
        try:
            yield b
        finally:
            b.close()


def _set(browser: Browser, field: str, value: object) -> None:
    browser.js(f"document.getElementById({field!r}).value = {json.dumps(str(value))}")


LOADED_IMAGES = "[...document.querySelectorAll('#images img')].filter(i => i.complete && i.naturalWidth > 0)"


def test_page_generates_and_shows_frames_then_images(browser: Browser, shared_stack: tuple[ApiServer, Any],
                                                     tmp_path: Path) -> None:
    api_server = shared_stack[0]
    browser.goto(api_server.url + "/")
    browser.wait_for("document.querySelector('#model option[value=tiny]') !== null")
    assert browser.js("document.getElementById('steps').max") == "40"  # steps bounded by the model's T
    _set(browser, "num_images", 2)
    _set(browser, "steps", 20)
    _set(browser, "seed", 3)
    browser.js("document.getElementById('submit').click()")
    browser.wait_for("document.body.dataset.jobStatus === 'succeeded'")
    assert browser.wait_for(f"{LOADED_IMAGES}.length === 2")
    sizes = browser.js(f"{LOADED_IMAGES}.map(i => i.naturalWidth + 'x' + i.naturalHeight)")
    assert sizes == ["8x8", "8x8"]
    frames = browser.js("[...document.querySelectorAll('#frames figcaption')].map(c => c.textContent)")
    assert len(frames) == 20 and frames[0] == "t=39" and frames[-1] == "t=0"  # every frame, in order
    assert browser.js("document.getElementById('status').textContent") == "succeeded"
    assert browser.screenshot(tmp_path / "page-succeeded.png").stat().st_size > 0


@pytest.fixture
def api_with_key(shared_stack: tuple[ApiServer, Any]) -> Iterator[ApiServer]:
    """A second API on the shared stack's Redis that needs the key ``page-key``."""
    settings = shared_stack[0].settings.model_copy(update={"api_keys": ["page-key-0123456789"]})
    api = ApiServer(settings).start()
    yield api
    api.stop()


def test_page_with_an_api_key_polls_and_shows_errors(browser: Browser, api_with_key: ApiServer,
                                                     tmp_path: Path) -> None:
    api = api_with_key
    browser.goto(api.url + "/?num_images=1&steps=4&seed=5")
    browser.wait_for("document.getElementById('error').textContent.includes('401')")  # no key yet
    _set(browser, "api_key", "page-key-0123456789")
    browser.js("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    browser.wait_for("document.querySelector('#model option[value=tiny]') !== null")
    browser.js("document.getElementById('error').textContent = ''")
    _set(browser, "steps", 4)
    browser.js("document.getElementById('submit').click()")
    browser.wait_for("document.body.dataset.jobStatus === 'succeeded'")
    assert browser.wait_for(f"{LOADED_IMAGES}.length === 1")
    _set(browser, "num_images", 17)  # over the server's limit: its 422 message is shown
    browser.js("document.getElementById('submit').click()")
    message = browser.wait_for("document.getElementById('error').textContent")
    assert "num_images: must be between 1 and 16" in message and "422" in message
    browser.screenshot(tmp_path / "page-error.png")


def test_page_says_when_no_worker_serves_the_model(browser: Browser, tiny_checkpoint: Path, tmp_path: Path) -> None:
    # Its own Redis, no worker: the API is ready and takes jobs; the page says they will wait.
    with RedisServer() as redis_server:
        api = ApiServer(Settings(redis_url=redis_server.url, checkpoints={"tiny": str(tiny_checkpoint)})).start()
        try:
            browser.goto(api.url + "/")
            browser.wait_for("document.body.dataset.workers === 'none'")
            notice = browser.js("document.getElementById('workers')")
            assert notice is not None and not browser.js("document.getElementById('workers').hidden")
            text = browser.js("document.getElementById('workers').textContent")
            assert "No worker is serving tiny" in text and "wait in the queue" in text
            browser.screenshot(tmp_path / "page-no-worker.png")
            JobStore(connect(redis_server.url)).heartbeat("w", {"name": "w", "models": ["tiny"], "device": "cpu"})
            browser.js("refreshWorkers()")  # what the page does every 10 s
            browser.wait_for("document.body.dataset.workers === 'serving'")
            assert browser.js("document.getElementById('workers').hidden")
        finally:
            api.stop()


def _op(browser: Browser, name: str) -> None:
    browser.js(f"document.querySelector('input[name=op][value={name}]').click()")


def _run_and_wait(browser: Browser, images: int) -> str:
    browser.js("document.getElementById('submit').click()")
    browser.wait_for("document.body.dataset.jobStatus === 'succeeded' && document.body.dataset.images !== undefined")
    assert browser.wait_for(f"{LOADED_IMAGES}.length === {images}")
    return str(browser.js("document.body.dataset.jobId"))


def test_page_varies_interpolates_measures_an_upload_and_plays_animations(
        browser: Browser, shared_stack: tuple[ApiServer, Any], tmp_path: Path) -> None:
    import httpx
    from PIL import Image

    api = shared_stack[0]
    browser.goto(api.url + "/?num_images=2&steps=8&seed=3")
    browser.wait_for("document.querySelector('#model option[value=tiny]') !== null")
    first = _run_and_wait(browser, 2)
    browser.js("document.getElementById('play').click()")  # the job's frames, animated (fetched with the key)
    browser.wait_for("document.body.dataset.animation === 'loaded'")
    assert browser.js("document.querySelector('#animation-box img').naturalWidth") > 8
    # pick image 0 and vary it from t = 5
    browser.js("document.querySelectorAll('#images figure')[0].click()")
    browser.wait_for("document.body.dataset.pictures === '1'")
    _op(browser, "vary")
    assert not browser.js("document.getElementById('start_t').closest('label').hidden")
    assert browser.js("document.getElementById('num_images').closest('label').hidden") is False
    _set(browser, "start_t", 5)
    varied = _run_and_wait(browser, 2)
    request = httpx.get(f"{api.url}/jobs/{varied}").json()["request"]
    assert request["init_image"] == {"job": first, "index": 0} and request["start_t"] == 5 and request["steps"] == 5
    # pick one of the variations too, and interpolate between the two at t = 6
    browser.js("document.querySelectorAll('#images figure')[1].click()")
    browser.wait_for("document.body.dataset.pictures === '2'")
    _op(browser, "interpolate")
    _set(browser, "t", 6)
    _set(browser, "lambdas", "0, 0.5, 1")
    mixed = _run_and_wait(browser, 3)
    captions = browser.js("[...document.querySelectorAll('#images figcaption')].map(c => c.textContent)")
    assert captions == ["λ=0", "λ=0.5", "λ=1"]
    job = httpx.get(f"{api.url}/jobs/{mixed}").json()
    assert job["kind"] == "interpolate" and job["request"]["images"] == [{"job": first, "index": 0},
                                                                          {"job": varied, "index": 1}]
    # measure an uploaded picture (a real file chosen through the file input)
    browser.js("document.getElementById('clear-picks').click()")
    upload = tmp_path / "upload.png"
    Image.new("RGB", (20, 14), (30, 140, 220)).save(upload)
    root = browser.send("DOM.getDocument", page=True)["root"]["nodeId"]
    node = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#upload"}, page=True)["nodeId"]
    browser.send("DOM.setFileInputFiles", {"files": [str(upload)], "nodeId": node}, page=True)
    browser.wait_for("document.body.dataset.pictures === '1'")
    _op(browser, "likelihood")
    browser.js("document.getElementById('submit').click()")
    browser.wait_for("document.body.dataset.bits !== undefined", timeout=120)
    measured = str(browser.js("document.body.dataset.jobId"))
    result = httpx.get(f"{api.url}/jobs/{measured}").json()["result"]
    shown = browser.js("[...document.querySelectorAll('#bits td')].map(c => c.textContent)")
    assert shown == ["1", f"{result['bits_per_dim'][0]:.4f}"]
    assert browser.js("document.querySelectorAll('#rd tbody tr').length") == len(result["rate_distortion"]) == 20
    browser.js("document.getElementById('play').click()")  # the progressive decoding, animated
    browser.wait_for("document.body.dataset.animation === 'loaded'")
    browser.screenshot(tmp_path / "page-likelihood.png")
