"""Slow clients against the real server (``server_config``: uvicorn with read deadlines) over raw sockets: headers
that trickle in, bodies that never end and idle connections are cut off at their deadline, while responses
(an event stream) are never timed. The deadlines here are short (0.5 s, 1 s) to keep the tests quick; the
chaos suite (tests/chaos/test_http_attacks.py) runs 50 such connections and measures normal requests meanwhile.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from .conftest import ApiServer

HEADER_S, BODY_S = 0.5, 1.0
GENEROUS = 10.0  # a bound against hanging only


@pytest.fixture
def api(make_api: Callable[..., ApiServer]) -> ApiServer:
    return make_api(header_timeout_seconds=HEADER_S, body_timeout_seconds=BODY_S,
                    app_kwargs={"sse_keepalive_s": 0.2, "sse_block_ms": 100})


@contextmanager
def _dripping(api: ApiServer, head: bytes, drip: bytes, every: float = 0.1) -> Iterator[socket.socket]:
    """A connection that sends ``head`` at once, then ``drip`` every ``every`` seconds until it is closed."""
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=GENEROUS)
    stop = threading.Event()

    def trickle() -> None:
        try:
            sock.sendall(head)
            while not stop.wait(every):
                sock.sendall(drip)
        except OSError:
            pass  # the server closed it

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield sock
    finally:
        stop.set()
        thread.join()
        sock.close()


def _until_closed(sock: socket.socket) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it sent before."""
    start, received = time.monotonic(), b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return time.monotonic() - start, received


def test_headers_that_trickle_in_get_408_at_the_deadline(api: ApiServer) -> None:
    with _dripping(api, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n") as sock:
        took, answer = _until_closed(sock)
    assert HEADER_S * 0.8 <= took < GENEROUS
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "request_timeout"' in answer


def test_a_connection_that_sends_nothing_is_closed(api: ApiServer) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=GENEROUS) as sock:
        took, answer = _until_closed(sock)
    assert HEADER_S * 0.8 <= took < GENEROUS and answer == b""  # nothing asked, nothing answered


def test_a_body_that_never_ends_gets_408_at_its_deadline(api: ApiServer) -> None:
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{"
    with _dripping(api, head, b" ", every=0.1) as sock:
        took, answer = _until_closed(sock)
    assert BODY_S * 0.8 <= took < GENEROUS
    assert answer.startswith(b"HTTP/1.1 408 ") and b"body" in answer


def test_a_body_the_app_did_not_wait_for_still_has_a_deadline(api: ApiServer) -> None:
    # The declared length is over the body limit (DDPM_MAX_UPLOAD_BYTES, 8 MiB, for POST /generate): 413 at once,
    # then the client keeps sending the body slowly.
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
    with _dripping(api, head, b"x" * 10, every=0.1) as sock:
        took, answer = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413 ")  # answered, so no 408 after it
    assert BODY_S * 0.8 <= took < GENEROUS


def test_the_next_request_on_a_kept_alive_connection_has_the_deadline_too(api: ApiServer) -> None:
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with _dripping(api, first + b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n") as sock:
        took, answer = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 2 and b" 408 " in answer
    assert took < GENEROUS


def test_requests_in_time_and_long_responses_are_never_cut(api: ApiServer) -> None:
    job_id = httpx.post(f"{api.url}/generate", json={"steps": 2}).json()["id"]  # queued: no worker here
    lines: list[str] = []
    start = time.monotonic()
    with httpx.stream("GET", f"{api.url}/jobs/{job_id}/events", timeout=GENEROUS) as r:
        for line in r.iter_lines():
            lines.append(line)
            if time.monotonic() - start > 2.5 * BODY_S and not any("canceled" in x for x in lines):
                httpx.delete(f"{api.url}/jobs/{job_id}")
    assert time.monotonic() - start > 2.5 * BODY_S  # streamed well past both deadlines
    assert lines.count(": keep-alive") >= 3 and any(line == "event: canceled" for line in lines)
    with httpx.Client() as client:  # one kept-alive connection, idle shorter than the deadline between requests
        for _ in range(3):
            assert client.get(f"{api.url}/healthz").status_code == 200
            time.sleep(HEADER_S / 2)
