"""Webhook deliveries survive the processes that owe them: a worker killed between a job's end and its
``completed`` delivery, a dispatcher killed in the middle of an attempt, and jobs that end in the API (a cancel)
while no worker runs. Deliveries go to a receiver on 127.0.0.1 (allow-listed) that verifies each signature.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.queue import JobStore, connect
from service.webhooks.signing import new_secret

from .conftest import ApiServer, WorkerProcess
from .webhook_receiver import Receiver, Reply

SECRET = new_secret()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([SECRET]).start()
    yield r
    r.stop()


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch, make_api: Callable[..., ApiServer]) -> ApiServer:
    """The API with webhooks on; processes started from here on inherit the secret and the allow-list."""
    for name, value in {"DDPM_WEBHOOK_SECRET": SECRET, "DDPM_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
                        "DDPM_WEBHOOK_TIMEOUT_SECONDS": "2", "DDPM_WEBHOOK_BACKOFF_SECONDS": "0.2",
                        "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    return make_api(webhook_secret=[SECRET], webhook_allow_hosts=["127.0.0.1"])


@pytest.fixture
def dispatcher(redis_url: str, tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Factory: ``ddpm webhooks`` processes (the dispatcher alone, no model), killed after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"webhooks-{len(started)}.log", "wb")  # noqa: SIM115 (the process owns it)
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "webhooks", "--redis-url", redis_url],
                                stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _submit(api: ApiServer, **body: Any) -> str:
    r = httpx.post(f"{api.url}/generate", json={"steps": 4, "seed": 3, **body})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _job(api: ApiServer, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{api.url}/jobs/{job_id}").json()  # type: ignore[no-any-return]


def _wait(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_a_worker_killed_before_its_completed_delivery_delivers_it_after_restart(
        hooked: ApiServer, worker_process: Callable[..., WorkerProcess], receiver: Receiver) -> None:
    first = worker_process("--webhook-concurrency", "0")  # runs jobs, delivers nothing: killed before it could
    job_id = _submit(hooked, webhook=receiver.url("/hook"))
    _wait(lambda: _job(hooked, job_id)["status"] == "succeeded", "the job never ended")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert receiver.deliveries == []
    assert [d["event"] for d in _job(hooked, job_id)["webhook"]["deliveries"]] == []

    second = worker_process()  # the restart, with its dispatcher (a child process)
    got = receiver.wait_for("/hook", lambda ds: len({d.id for d in ds}) == 2)
    assert sorted({d.id for d in got}) == [f"msg_{job_id}_completed", f"msg_{job_id}_start"]
    assert all(d.verified == [True] for d in got)
    [completed] = [d.record for d in got if d.id.endswith("_completed")]
    assert completed["status"] == "succeeded" and len(completed["images"]) == 1

    def recorded() -> list[dict[str, Any]]:
        deliveries = _job(hooked, job_id)["webhook"]["deliveries"]
        return deliveries if all(d["status"] == "delivered" for d in deliveries) else []

    assert [d["event"] for d in _wait(recorded, "deliveries never recorded")] == ["start", "completed"]
    metrics = httpx.get(f"http://127.0.0.1:{second.metrics_port}/metrics").text  # the child's counts, relayed
    assert 'ddpm_webhook_deliveries_total{event="completed",outcome="delivered"} 1.0' in metrics

    children = _children(second.proc.pid)
    assert len(children) == 1  # its dispatcher
    second.proc.send_signal(signal.SIGKILL)
    _wait(lambda: not any(_alive(pid) for pid in children), "the dispatcher outlived its worker", timeout=15)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_an_attempt_cut_short_by_its_dispatcher_dying_is_made_again(
        hooked: ApiServer, dispatcher: Callable[[], subprocess.Popen[bytes]], receiver: Receiver) -> None:
    receiver.script("/slow", [Reply(hang=60)])  # the first attempt is still waiting when its process dies
    job_id = _submit(hooked, webhook=receiver.url("/slow"), webhook_events_filter=["completed"])
    store = JobStore(connect(hooked.settings.redis_url))
    assert store.start(job_id, "test") and store.succeed(job_id, [b"png"])  # the job ends (no worker needed)
    doomed = dispatcher()
    receiver.wait_for("/slow", lambda ds: len(ds) == 1)
    doomed.kill()  # SIGKILL mid-attempt: its claim on the delivery lapses after the lease (2 s + 5 s)
    doomed.wait(10)
    dispatcher()
    got = receiver.wait_for("/slow", lambda ds: any(d.answered == 200 for d in ds), timeout=60)
    assert len(got) == 2 and got[0].id == got[1].id == f"msg_{job_id}_completed" and got[1].verified == [True]
    [d] = _wait(lambda: [d for d in _job(hooked, job_id)["webhook"]["deliveries"] if d["status"] == "delivered"],
                "the delivery was never recorded")
    assert d["attempts"] == 2


def test_a_job_canceled_while_queued_is_delivered_as_completed_by_ddpm_webhooks(
        hooked: ApiServer, dispatcher: Callable[[], subprocess.Popen[bytes]], receiver: Receiver) -> None:
    dispatcher()  # no worker at all: the job never starts
    job_id = _submit(hooked, webhook=receiver.url("/canceled"))
    assert httpx.delete(f"{hooked.url}/jobs/{job_id}").json()["status"] == "canceled"
    [delivery] = receiver.wait_for("/canceled", lambda ds: len(ds) == 1)
    assert delivery.id == f"msg_{job_id}_completed" and delivery.verified == [True]  # no `start`: it never ran
    assert delivery.record["status"] == "canceled"
