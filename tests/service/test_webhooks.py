"""Signed webhooks end to end: the API over HTTP, a real ``ddpm worker`` process (its dispatcher thread delivers),
and receivers on loopback that verify every delivery with the ``standardwebhooks`` package.

The module shares one stack (a worker start costs seconds). The worker signs with two secrets (a rotation in
progress) and uses short timeouts and backoffs (``DDPM_WEBHOOK_TIMEOUT_SECONDS=1``, backoff 0.2 s). The
allow-list admits 127.0.0.1 (the receiver); refusals are tested only with other loopback addresses.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import redis
from standardwebhooks import Webhook, WebhookVerificationError

from service.redis_server import RedisServer, free_port
from service.settings import Settings
from service.webhooks.signing import new_secret

from .conftest import ApiServer, WorkerProcess
from .test_browser import CHROMIUM, Browser
from .webhook_receiver import Delivery, Receiver, Reply

SECRETS = [new_secret(), new_secret()]  # the new one and the old one, during a rotation
WORKER_ENV = {"DDPM_WEBHOOK_SECRET": ",".join(SECRETS), "DDPM_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
              "DDPM_WEBHOOK_TIMEOUT_SECONDS": "1", "DDPM_WEBHOOK_BACKOFF_SECONDS": "0.2",
              "DDPM_WEBHOOK_FRAME_INTERVAL_SECONDS": "0", "OMP_NUM_THREADS": "1"}
TERMINAL = ("succeeded", "failed", "canceled")


class Stack:
    def __init__(self, api: ApiServer, worker: WorkerProcess, receiver: Receiver, far: Receiver):
        self.api, self.worker, self.receiver, self.far = api, worker, receiver, far

    def submit(self, **body: Any) -> str:
        r = httpx.post(f"{self.api.url}/generate", json={"steps": 4, "seed": 1, **body})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return httpx.get(f"{self.api.url}/jobs/{job_id}").json()  # type: ignore[no-any-return]

    def worker_metrics(self, *samples: str, timeout: float = 10.0) -> str:
        """The worker's metrics once they show every one of ``samples``: the dispatcher reports each outcome to
        its worker over a pipe, so the count may trail the delivery record the API shows by a moment."""
        deadline = time.monotonic() + timeout
        while True:
            text = httpx.get(f"http://127.0.0.1:{self.worker.metrics_port}/metrics").text
            if all(s in text for s in samples):
                return text
            assert time.monotonic() < deadline, (samples, text)
            time.sleep(0.05)

    def settled(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The job once it ended and none of its deliveries is pending."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            hook = job["webhook"]
            if job["status"] in TERMINAL and hook["deliveries"] and all(
                    d["status"] != "pending" for d in hook["deliveries"]) and any(
                    d["event"] == "completed" for d in hook["deliveries"]):
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    receiver = Receiver(SECRETS).start()
    far = Receiver(SECRETS, host="127.0.0.3").start()  # loopback, admitted by the API but not by the worker
    api = ApiServer(Settings(redis_url=redis_server.url, checkpoints={"tiny": str(tiny_checkpoint)},
                             webhook_secret=[new_secret()], webhook_allow_hosts=["127.0.0.1", "127.0.0.3"])).start()
    port, name = free_port(), "webhook-worker"
    args = ["env", *(f"{k}={v}" for k, v in WORKER_ENV.items()), sys.executable, "-m", "service.cli", "worker",
            "--redis-url", redis_server.url, "--checkpoint", f"tiny={tiny_checkpoint}", "--device", "cpu",
            "--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--name", name]
    worker = WorkerProcess(args, port, name, tmp_path_factory.mktemp("worker") / f"{name}.log")
    try:
        worker.wait_ready(redis_server.url)
        yield Stack(api, worker, receiver, far)
    finally:
        worker.stop()
        api.stop()
        receiver.stop()
        far.stop()


def _ids(deliveries: list[Delivery], job_id: str) -> list[str]:
    return [d.id for d in deliveries if d.id.startswith(f"msg_{job_id}_")]


def test_deliveries_are_signed_verified_and_completed_comes_once_the_images_are_readable(stack: Stack) -> None:
    fetched: dict[str, int] = {}

    def fetch_images(delivery: Delivery) -> None:  # what a receiver does on `completed`: download the images
        for image in delivery.record["images"]:
            fetched[image["url"]] = httpx.get(stack.api.url + image["url"]).status_code

    stack.receiver.on_receive["/signed"] = fetch_images
    job_id = stack.submit(num_images=2, steps=6, preview_every=2, webhook=stack.receiver.url("/signed"),
                          webhook_events_filter=["start", "frame", "completed"])
    stack.receiver.wait_for("/signed", lambda ds: f"msg_{job_id}_completed" in _ids(ds, job_id))
    job = stack.settled(job_id)
    got = stack.receiver.at("/signed")

    ids = _ids(got, job_id)
    assert len(ids) == len(set(ids)) >= 3 and {f"msg_{job_id}_start", f"msg_{job_id}_completed"} <= set(ids)
    assert set(ids) <= {f"msg_{job_id}_{name}" for name in ("start", "completed", *(f"frame_{i}" for i in range(4)))}
    for d in got:  # each secret of the rotation verifies every delivery on its own; another secret does not
        assert d.verified == [True, True], d.headers
        with pytest.raises(WebhookVerificationError):
            Webhook(new_secret()).verify(d.body, d.headers)
        assert d.headers["content-type"] == "application/json" and len(d.headers["webhook-signature"].split()) == 2
    [completed] = [d.record for d in got if d.id == f"msg_{job_id}_completed"]
    assert completed["status"] == "succeeded" and completed["id"] == job_id
    assert {k: v for k, v in completed.items() if k != "webhook"} == {k: v for k, v in job.items() if k != "webhook"}
    assert len(fetched) == 2 and set(fetched.values()) == {200}  # readable when `completed` arrived
    assert job["webhook"]["url"] == stack.receiver.url("/signed")
    assert job["webhook"]["events"] == ["start", "frame", "completed"]
    assert sorted(d["id"] for d in job["webhook"]["deliveries"]) == sorted(ids)
    assert all(d["status"] == "delivered" and d["attempts"] == 1 and d["response_status"] == 200
               for d in job["webhook"]["deliveries"])
    stack.worker_metrics('ddpm_webhook_deliveries_total{event="completed",outcome="delivered"}')
    assert not any(s in stack.worker.log() for s in SECRETS)


def test_the_default_filter_is_start_and_completed(stack: Stack) -> None:
    job_id = stack.submit(steps=4, preview_every=1, webhook=stack.receiver.url("/default"))
    stack.settled(job_id)
    assert _ids(stack.receiver.at("/default"), job_id) == [f"msg_{job_id}_start", f"msg_{job_id}_completed"]


def test_a_receiver_failing_twice_is_retried_and_gets_one_delivery_per_webhook_id(stack: Stack) -> None:
    stack.receiver.script("/flaky", [Reply(500), Reply(503)])
    job_id = stack.submit(webhook=stack.receiver.url("/flaky"), webhook_events_filter=["completed"])
    job = stack.settled(job_id)
    got = stack.receiver.at("/flaky")
    assert [d.answered for d in got] == [500, 503, 200]
    assert {d.id for d in got} == {f"msg_{job_id}_completed"}  # one event, as the receiver de-duplicates it
    assert all(d.verified == [True, True] for d in got)
    [delivery] = job["webhook"]["deliveries"]
    assert delivery["status"] == "delivered" and delivery["attempts"] == 3 and delivery["response_status"] == 200
    assert delivery["last_error"].startswith("HTTP 503")


def test_a_hanging_or_dripping_receiver_is_timed_out_and_retried(stack: Stack) -> None:
    stack.receiver.script("/hang", [Reply(hang=30)])
    stack.receiver.script("/drip", [Reply(drip=30)])  # a header byte every 0.2 s: only a whole-attempt deadline ends it
    hung = stack.submit(webhook=stack.receiver.url("/hang"), webhook_events_filter=["completed"])
    dripped = stack.submit(webhook=stack.receiver.url("/drip"), webhook_events_filter=["completed"])
    for job_id, path in ((hung, "/hang"), (dripped, "/drip")):
        [delivery] = stack.settled(job_id)["webhook"]["deliveries"]
        assert delivery["status"] == "delivered" and delivery["attempts"] == 2, delivery
        assert "no complete response within 1 s" in delivery["last_error"]
        first, second = stack.receiver.at(path)
        assert first.id == second.id and second.answered == 200
        assert second.received_at - first.received_at < 20  # the 1 s deadline, far below the 30 s the receiver took


def test_redirects_are_not_followed_other_4xx_give_up_429_waits_for_retry_after(stack: Stack) -> None:
    stack.receiver.script("/redirect", [Reply(302, location=stack.receiver.url("/elsewhere"))])
    stack.receiver.script("/gone", [Reply(410)])
    stack.receiver.script("/busy", [Reply(429, headers={"Retry-After": "1"})])
    redirected = stack.submit(webhook=stack.receiver.url("/redirect"), webhook_events_filter=["completed"])
    gone = stack.submit(webhook=stack.receiver.url("/gone"), webhook_events_filter=["completed"])
    busy = stack.submit(webhook=stack.receiver.url("/busy"), webhook_events_filter=["completed"])

    [d] = stack.settled(redirected)["webhook"]["deliveries"]
    assert d["status"] == "failed" and d["attempts"] == 1 and d["response_status"] == 302
    assert "not followed" in d["last_error"] and stack.receiver.at("/elsewhere") == []
    [d] = stack.settled(gone)["webhook"]["deliveries"]
    assert d["status"] == "failed" and d["attempts"] == 1 and d["last_error"].startswith("HTTP 410")
    [d] = stack.settled(busy)["webhook"]["deliveries"]
    assert d["status"] == "delivered" and d["attempts"] == 2
    first, second = stack.receiver.at("/busy")
    assert second.received_at - first.received_at >= 0.95  # Retry-After: 1, not the 0.2 s backoff
    stack.worker_metrics('ddpm_webhook_deliveries_total{event="completed",outcome="failed"}',
                         'ddpm_webhook_delivery_attempts_total{event="completed",result="4xx"}')


@pytest.mark.parametrize("url", [
    "http://127.0.0.2:{port}/hook",  # loopback, outside the allow-list
    "http://[::1]:{port}/hook",
    "http://[::ffff:127.0.0.2]:{port}/hook",  # IPv4-mapped IPv6
    "http://0.0.0.0:{port}/hook",
    "http://2130706434:{port}/hook",  # 127.0.0.2 written as one number
    "http://0x7f.0.0.2:{port}/hook",  # ... and in hex
])
def test_loopback_addresses_outside_the_allow_list_are_refused_at_submit(stack: Stack, url: str) -> None:
    r = httpx.post(f"{stack.api.url}/generate", json={"webhook": url.format(port=stack.receiver.port)})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("webhook: refused:") and "DDPM_WEBHOOK_ALLOW_HOSTS" in message


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"webhook": "ftp://127.0.0.1/x"}, "webhook", "scheme must be http or https"),
    ({"webhook": "http://user:pw@127.0.0.1/x"}, "webhook", "user name or password"),
    ({"webhook": "not a url"}, "webhook", "printable ASCII"),
    ({"webhook": "http://127.0.0.1/" + "a" * 2100}, "webhook", "2048"),
    ({"webhook_events_filter": ["completed"]}, "webhook_events_filter", "only means something with a webhook"),
    ({"webhook": "http://127.0.0.1/x", "webhook_events_filter": ["done"]}, "webhook_events_filter", "completed"),
    ({"webhook": "http://127.0.0.1/x", "webhook_events_filter": []}, "webhook_events_filter", "at least 1"),
])
def test_bad_webhook_fields_are_422_naming_the_field(stack: Stack, body: dict[str, Any], field: str,
                                                       words: str) -> None:
    r = httpx.post(f"{stack.api.url}/generate", json=body)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert message.startswith(f"{field}") and words in message, message


def test_webhooks_are_refused_when_no_secret_is_set(stack: Stack) -> None:
    api = ApiServer(stack.api.settings.model_copy(update={"webhook_secret": []})).start()
    try:
        r = httpx.post(f"{api.url}/generate", json={"webhook": stack.receiver.url("/x")})
        assert r.status_code == 422 and "DDPM_WEBHOOK_SECRET" in r.json()["error"]["message"]
    finally:
        api.stop()


def test_an_address_the_worker_does_not_admit_is_refused_at_delivery(stack: Stack) -> None:
    job_id = stack.submit(webhook=stack.far.url("/far"), webhook_events_filter=["completed"])  # the API admits it
    [d] = stack.settled(job_id)["webhook"]["deliveries"]
    assert d["status"] == "failed" and d["attempts"] == 1 and d["response_status"] is None
    assert d["last_error"] == ("refused: 127.0.0.3 is a loopback address; the server's DDPM_WEBHOOK_ALLOW_HOSTS "
                               "does not admit it")
    assert stack.far.deliveries == []  # nothing was sent there


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium is not installed")
def test_the_page_shows_the_webhook_deliveries(stack: Stack, tmp_path: Path) -> None:
    stack.receiver.script("/page", [Reply(500)])  # the first attempt fails: the page shows the retry
    with tempfile.TemporaryDirectory(prefix="ddpm-chromium-") as profile:
        browser = Browser(Path(profile))
        try:
            query = urlencode({"steps": 4, "num_images": 1, "seed": 2, "webhook": stack.receiver.url("/page")})
            browser.goto(f"{stack.api.url}/?{query}")
            browser.wait_for("document.querySelector('#model option[value=tiny]') !== null")
            browser.js("document.getElementById('submit').click()")
            browser.wait_for("document.body.dataset.jobStatus === 'succeeded'")
            browser.wait_for("document.body.dataset.webhookSettled === 'true'")
            rows = browser.js("[...document.querySelectorAll('#deliveries tbody tr')]"
                              ".map(r => [...r.cells].map(c => c.textContent))")
            assert rows[0] == ["start", "delivered", "2", "HTTP 500: ok"] and rows[1][:3] == ["completed", "delivered",
                                                                                             "1"]
            assert stack.receiver.url("/page") in browser.js("document.getElementById('webhook-url').textContent")
            browser.screenshot(tmp_path / "page-webhook.png")
        finally:
            browser.close()
