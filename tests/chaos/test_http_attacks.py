"""Hostile clients against the real API (uvicorn configured as ``ddpm serve`` does, a real redis-server), on
loopback: spoofed X-Forwarded-For, API-key guessing, invented methods and paths, slow-loris connections,
out-of-range Last-Event-IDs, and one key reaching for another's jobs. Each test records
attack -> expected -> observed before it asserts.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import statistics
import string
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from service.web import HTTP_METHODS
from tests.chaos.conftest import Chaos
from tests.service.conftest import ApiServer

GENEROUS = 30.0  # bounds against hanging only


def _clear_of_window_edge(needed: float) -> None:
    """Per-minute counts live in fixed one-minute windows: start a test that needs ``needed`` s inside one."""
    into = time.time() % 60
    if into > 60 - needed:
        time.sleep(60.5 - into)


def _from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


# ---- X-Forwarded-For ---------------------------------------------------------------------------------------
def test_spoofed_forwarded_for_does_not_multiply_stream_slots(chaos: Chaos, make_api: Callable[..., ApiServer]
                                                               ) -> None:
    api = make_api(app_kwargs={"sse_block_ms": 100})  # defaults: 8 streams per client, no trusted proxy
    streams = chaos.n(12, 40)
    job_id = httpx.post(f"{api.url}/generate", json={"steps": 2}).json()["id"]  # stays queued: no worker
    codes: list[int] = []
    with httpx.Client(timeout=10, limits=httpx.Limits(max_connections=streams + 5)) as client, \
            contextlib.ExitStack() as held:
        for i in range(streams):
            r = held.enter_context(client.stream("GET", f"{api.url}/jobs/{job_id}/events",
                                                 headers={"X-Forwarded-For": f"203.0.113.{i + 1}"}))
            codes.append(r.status_code)
    opened, refused = codes.count(200), codes.count(429)
    limit = api.settings.max_sse_per_client
    chaos.record(f"{streams} SSE streams, each with its own spoofed X-Forwarded-For (limit {limit})",
                 f"{limit} open, {streams - limit} 429", f"{opened} open, {refused} 429",
                 opened == limit and refused == streams - limit)
    assert opened == limit and refused == streams - limit, codes


# ---- guessing API keys -------------------------------------------------------------------------------------
def test_guessing_api_keys_is_rate_limited_per_address(chaos: Chaos, make_api: Callable[..., ApiServer]) -> None:
    key = "right-key-" + "k" * 16
    api = make_api(api_keys=[key])  # the default budget: 30 refused keys per address and minute
    replica = make_api(api_keys=[key])  # a second API process on the same Redis
    budget, guesses = api.settings.auth_failures_per_minute, chaos.n(60, 300)
    _clear_of_window_edge(10)  # the attack takes 1-3 s
    with _from("127.0.0.1") as attacker, _from("127.0.0.2") as neighbour:
        codes = [attacker.get(f"{api.url}/models", headers={"x-api-key": f"guess-{i:06d}-{'g' * 10}"}).status_code
                 for i in range(guesses)]
        right_from_attacker = attacker.get(f"{api.url}/models", headers={"x-api-key": key})
        # The other replica learns of the block from the shared count at the address's next wrong key.
        on_replica = [attacker.get(f"{replica.url}/models", headers={"x-api-key": k}).status_code
                      for k in ("guess-replica-" + "g" * 10, key)]
        right_from_neighbour = neighbour.get(f"{api.url}/models", headers={"x-api-key": key}).status_code
        probe = attacker.get(f"{api.url}/healthz").status_code
    refused, limited = codes.count(403), codes.count(429)
    ok = (refused == budget and limited == guesses - budget and right_from_attacker.status_code == 429
          and on_replica == [403, 429] and right_from_neighbour == 200 and probe == 200)
    chaos.record(f"{guesses} wrong API keys from one address (budget {budget}/min), then the right key; then a "
                 "second API replica", f"{budget} 403, then 429 even for the right key; the replica: 1 more 403, "
                 "then 429; other addresses 200",
                 f"{refused} 403, {limited} 429; right key {right_from_attacker.status_code}; replica {on_replica}; "
                 f"elsewhere {right_from_neighbour}", ok)
    assert codes[:budget] == [403] * budget and set(codes[budget:]) == {429}
    assert right_from_attacker.status_code == 429 and 1 <= int(right_from_attacker.headers["retry-after"]) <= 61
    assert on_replica == [403, 429]
    assert right_from_neighbour == 200 and probe == 200


# ---- metric labels -----------------------------------------------------------------------------------------
def _series(text: str, name: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith(name + "{")]


def test_invented_methods_and_paths_add_no_metric_series(chaos: Chaos, make_api: Callable[..., ApiServer]) -> None:
    api = make_api()
    rng = random.Random(10)
    requests = chaos.n(300, 5500)
    paths = ["/nowhere", "/jobs/{}", "/jobs/{}/frames/0.png", "/static/{}", "/{}/{}", "/generate"]
    with httpx.Client(timeout=10) as client:
        before = client.get(f"{api.url}/metrics").text
        statuses: set[int] = set()
        for i in range(requests):
            method = "X" + "".join(rng.choices(string.ascii_uppercase, k=8)) if i % 4 else rng.choice(
                ["GET", "POST", "DELETE", "PATCH"])
            words = ["".join(rng.choices(string.ascii_lowercase + string.digits, k=12)) for _ in range(2)]
            statuses.add(client.request(method, api.url + rng.choice(paths).format(*words)).status_code)
        start = time.perf_counter()
        after = client.get(f"{api.url}/metrics").text
        scrape_s = time.perf_counter() - start
    added = len(_series(after, "ddpm_http_requests_total")) - len(_series(before, "ddpm_http_requests_total"))
    routes = set(httpx.get(f"{api.url}/openapi.json").json()["paths"]) | {
        "/", "/static", "/docs", "/redoc", "/openapi.json", "unmatched"}  # the routes outside the spec, and none
    labels = [dict(p.split("=", 1) for p in s[s.index("{") + 1:-1].replace('"', "").split(","))
              for s in _series(after, "ddpm_http_requests_total")]
    closed = all(lb["method"] in HTTP_METHODS | {"other"} and lb["route"] in routes for lb in labels)
    bound = (len(HTTP_METHODS) + 1) * len(routes) * len(statuses)  # whatever the number of requests
    ok = closed and added <= bound and scrape_s < 5
    chaos.record(f"{requests} requests with invented methods and random paths",
                 "labels from a closed set (method other, route unmatched or a template); /metrics stays small",
                 f"{added} new series, /metrics {len(before) // 1024} -> {len(after) // 1024} KB, "
                 f"scraped in {scrape_s * 1000:.0f} ms", ok)
    assert closed, [lb for lb in labels if lb["method"] not in HTTP_METHODS | {"other"} or lb["route"] not in routes]
    assert added <= bound, added
    assert scrape_s < 5


# ---- slow-loris --------------------------------------------------------------------------------------------
class SlowLoris:
    """``count`` connections that each start a request, then send one more byte every ``every`` seconds: half
    inside the headers, half inside a declared 9,000-byte body. One thread drips; records when the server closes
    each."""

    def __init__(self, port: int, count: int, every: float = 0.5):
        self.every, self.closed_after = every, [float("nan")] * count
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 9000\r\n"
        self.drips = [b"a" if i % 2 else b" " for i in range(count)]  # a header line that never ends | body
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
        for i, sock in enumerate(self.socks):
            sock.sendall(head + b"X-Slow: " if i % 2 else head + b"\r\n{")
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        open_now = set(range(len(self.socks)))
        while open_now and not self._stop.is_set():
            for i in list(open_now):
                try:
                    if select.select([self.socks[i]], [], [], 0)[0] and not self.socks[i].recv(65536):
                        raise ConnectionResetError  # the server closed it (after a 408)
                    self.socks[i].send(self.drips[i])
                except OSError:
                    self.closed_after[i] = time.monotonic() - self.started
                    open_now.discard(i)
            self._stop.wait(self.every)

    def open_count(self) -> int:
        return sum(1 for t in self.closed_after if t != t)  # NaN: still open

    def wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.open_count() and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks:
            s.close()


def _p50_ms(client: httpx.Client, url: str, n: int) -> float:
    took = []
    for _ in range(n):
        start = time.perf_counter()
        assert client.get(url).status_code == 200
        took.append(time.perf_counter() - start)
    return statistics.median(took) * 1000


def test_slow_loris_connections_are_closed_while_others_keep_their_latency(chaos: Chaos,
                                                                          make_api: Callable[..., ApiServer]) -> None:
    header_s, body_s = chaos.n(1, 10), chaos.n(2, 30)  # full scale: the defaults
    api = make_api(header_timeout_seconds=header_s, body_timeout_seconds=body_s)
    count, samples = chaos.n(10, 50), chaos.n(40, 200)
    job_url = f"{api.url}/jobs/{httpx.post(f'{api.url}/generate', json={'steps': 2}).json()['id']}"
    with httpx.Client(timeout=10) as client:
        before = _p50_ms(client, job_url, samples)
        loris = SlowLoris(api.port, count)
        try:
            time.sleep(min(header_s, body_s) / 2)  # all connected and dripping
            during = _p50_ms(client, job_url, samples)
            still_open = loris.open_count()
            loris.wait_closed(body_s + header_s + GENEROUS)
            closed = sorted(loris.closed_after)
        finally:
            loris.close()
    ok = loris.open_count() == 0 and still_open == count
    chaos.record(f"{count} slow-loris connections (byte every 0.5 s; headers / body deadline {header_s} / {body_s} s)",
                 "each closed at its deadline; GET /jobs/{id} p50 unchanged",
                 f"closed after {closed[0]:.1f}-{closed[-1]:.1f} s; p50 {before:.1f} ms before, {during:.1f} ms during",
                 ok)
    assert still_open == count  # the measurement ran while all of them were held
    assert loris.open_count() == 0
    assert max(closed) < body_s + header_s + GENEROUS


# ---- Last-Event-ID -----------------------------------------------------------------------------------------
def test_malformed_last_event_ids_are_422_never_a_traceback(chaos: Chaos, make_api: Callable[..., ApiServer],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    api = make_api()
    rng = random.Random(6)
    job_id = httpx.post(f"{api.url}/generate", json={"steps": 2}).json()["id"]
    url, n = f"{api.url}/jobs/{job_id}/events", chaos.n(40, 400)
    fixed = ["99999999999999999999-0", f"{2**64}-0", f"0-{2**64}", "1-2-3", "-", "1795000000000", "abc", "0x1-0"]
    values = fixed + [f"{rng.randrange(2**64, 10**20)}-{rng.randrange(10**3)}" for _ in range(n - len(fixed))]
    caplog.set_level(logging.WARNING)
    with httpx.Client(timeout=10) as client:
        codes = [client.get(url, headers={"Last-Event-ID": v}).status_code for v in values[: n // 2]]
        codes += [client.get(url, params={"last_event_id": v}).status_code for v in values[n // 2:]]
    tracebacks = sum(1 for r in caplog.records if r.exc_info)
    ok = set(codes) == {422} and tracebacks == 0
    chaos.record(f"{n} malformed or out-of-range Last-Event-IDs (header and query)", "422 naming it, no traceback",
                 f"statuses {sorted(set(codes))}, {tracebacks} tracebacks logged", ok)
    assert set(codes) == {422} and tracebacks == 0


# ---- another key's jobs ------------------------------------------------------------------------------------
def test_a_key_cannot_touch_another_keys_jobs(chaos: Chaos, make_api: Callable[..., ApiServer]) -> None:
    alice, mallory = {"x-api-key": "alice-" + "a" * 16}, {"x-api-key": "mallory-" + "m" * 16}
    api = make_api(api_keys=[alice["x-api-key"], mallory["x-api-key"]])
    jobs = [httpx.post(f"{api.url}/generate", json={"steps": 2}, headers=alice).json()["id"]
            for _ in range(chaos.n(3, 20))]
    codes = []
    with httpx.Client(timeout=10, headers=mallory) as client:
        for job_id in jobs:
            for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/frames/0.png"), ("DELETE", "")):
                codes.append(client.request(method, f"{api.url}/jobs/{job_id}{path}").status_code)
    states = {httpx.get(f"{api.url}/jobs/{j}", headers=alice).json()["status"] for j in jobs}
    ok = set(codes) == {404} and states == {"queued"}
    chaos.record(f"another key reads, streams and cancels {len(jobs)} jobs ({len(codes)} requests)",
                 "404 for each, jobs untouched", f"statuses {sorted(set(codes))}, jobs {sorted(states)}", ok)
    assert set(codes) == {404} and states == {"queued"}
