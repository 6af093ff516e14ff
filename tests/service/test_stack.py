"""``ddpm up`` as a user runs it: a subprocess that starts Redis, a worker and the API, serves a job, and stops
every child on Ctrl-C (SIGINT) or SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _up(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the worker: one torch thread on a small shared machine
    return subprocess.Popen([sys.executable, "-m", "service.cli", "up", *args], cwd=ROOT, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _wait_ready_line(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("DDPM service ready"):
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"ddpm up exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
    raise AssertionError("ddpm up never said it was ready")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_serves_a_job_and_stops_everything(tiny_checkpoint: Path, tmp_path: Path,
                                              stop_signal: signal.Signals) -> None:
    port = free_port()
    proc = _up("--port", str(port), "--checkpoint", f"tiny={tiny_checkpoint}", "--data-dir", str(tmp_path / "redis"),
               "--device", "cpu", "--worker-metrics-port", "0")
    try:
        line = _wait_ready_line(proc)
        url = f"http://127.0.0.1:{port}"
        assert url in line
        assert httpx.get(f"{url}/readyz").status_code == 200
        job = httpx.post(f"{url}/generate", json={"num_images": 2, "steps": 4, "seed": 1}).json()
        deadline = time.monotonic() + 60
        while (view := httpx.get(f"{url}{job['status_url']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, view
            time.sleep(0.1)
        assert view["status"] == "succeeded" and len(view["images"]) == 2
        assert httpx.get(url + view["images"][1]["url"]).headers["content-type"] == "image/png"
        children = _children(proc.pid)
        assert len(children) >= 3  # redis-server, the worker, the API
        proc.send_signal(stop_signal)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(c) for c in children)
        with pytest.raises(ConnectionRefusedError):  # nothing listens on the API port any more
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert list((tmp_path / "redis").glob("appendonly*"))  # the private Redis persisted its jobs
    finally:
        if proc.poll() is None:  # a failed assertion: stop it the way a user would, then make sure
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_children_stop_when_up_is_killed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Even a SIGKILLed supervisor leaves no API or worker behind (they get SIGTERM when it dies)."""
    proc = _up("--port", str(free_port()), "--checkpoint", f"tiny={tiny_checkpoint}", "--data-dir",
               str(tmp_path / "redis"), "--device", "cpu", "--worker-metrics-port", "0")
    _wait_ready_line(proc)
    children = _children(proc.pid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    survivors = [c for c in children if _alive(c) and "service.cli" in _cmdline(c)]
    while survivors and time.monotonic() < deadline:
        time.sleep(0.1)
        survivors = [c for c in survivors if _alive(c)]
    redis_left = [c for c in children if _alive(c)]
    for pid in redis_left:  # the private redis-server has no such hook; stop it here
        os.kill(pid, signal.SIGTERM)
    assert survivors == []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_up_refuses_a_missing_checkpoint_with_a_hint(tmp_path: Path) -> None:
    proc = _up("--port", str(free_port()), "--checkpoint", f"gone={tmp_path / 'gone.safetensors'}",
               "--data-dir", str(tmp_path / "redis"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "model 'gone'" in err and "file not found" in err
    assert not (tmp_path / "redis").exists()  # nothing was started


def test_up_refuses_a_busy_port(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _up("--port", str(port), "--checkpoint", f"tiny={tiny_checkpoint}", "--data-dir",
                   str(tmp_path / "redis"))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_the_lease_setting_reaches_the_worker_and_the_flag_overrides_it(monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from service import stack

    parser = argparse.ArgumentParser()
    stack.configure_parser(parser)

    def worker_lease(*argv: str) -> str:
        args = parser.parse_args(list(argv))
        up = stack._stack_from_args(args, stack._settings(args))
        worker = up.worker_argv(1)
        return worker[worker.index("--lease-seconds") + 1]

    assert worker_lease() == "15"
    monkeypatch.setenv("DDPM_WORKER_LEASE_SECONDS", "7")
    assert worker_lease() == "7"
    assert worker_lease("--lease-seconds", "4") == "4"
    assert stack.main(parser.parse_args(["--lease-seconds", "1"])) == 2  # refused before anything starts
    assert "worker_lease_seconds" in capsys.readouterr().err
