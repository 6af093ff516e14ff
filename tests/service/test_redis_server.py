"""The private redis-server wrapper (``service.redis_server``): a real process on loopback, in its own session,
persisting when asked, refusing a taken port, and gone with the process that started it. (The job store on top
of it: tests/service/test_queue.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from service.redis_server import RedisServer, find_redis_server, free_port


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_server_answers_on_loopback_in_its_own_session_and_stops(tmp_path: Path) -> None:
    assert os.access(find_redis_server(), os.X_OK)
    with RedisServer(data_dir=tmp_path) as server:
        assert server.proc is not None
        pid = server.proc.pid
        client = redis.Redis.from_url(server.url)
        assert client.ping() and server.url == f"redis://127.0.0.1:{server.port}/0"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("appendonly")["appendonly"] == "no"
        assert os.getsid(pid) != os.getsid(0)  # a terminal's Ctrl-C to our process group never reaches it
        client.close()
    assert server.proc is None and _gone(pid)


def test_append_only_data_survives_a_restart_on_the_same_port(tmp_path: Path) -> None:
    server = RedisServer(port=free_port(), data_dir=tmp_path / "redis", appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        client.set("kept", b"yes")
        client.close()
        server.stop()
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.get("kept") == b"yes"
        client.close()
    finally:
        server.cleanup()
    assert (tmp_path / "redis").is_dir()  # a data directory given is the caller's: never removed


def test_a_temporary_data_directory_is_removed_on_cleanup() -> None:
    server = RedisServer().start()
    data_dir = server.data_dir
    assert data_dir.is_dir()
    server.cleanup()
    assert not data_dir.exists()


def test_a_taken_port_is_refused_with_redis_servers_reason(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = RedisServer(port=busy.getsockname()[1], data_dir=tmp_path)
        with pytest.raises(RuntimeError, match="redis-server exited"):
            server.start()


def test_the_server_goes_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    code = ("import sys, time\n"
            "from service.redis_server import RedisServer\n"
            f"server = RedisServer(data_dir={str(tmp_path)!r}).start()\n"
            "print(server.proc.pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)  # no cleanup runs: only the kernel's parent-death signal
        parent.wait(10)
        assert _gone(pid), "redis-server outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()
