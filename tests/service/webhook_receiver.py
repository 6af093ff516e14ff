"""A webhook receiver for tests: a real HTTP server on a loopback address that records every delivery and verifies
its signature with the ``standardwebhooks`` package (the reference implementation a receiver would use).

Each path answers 200 unless a script says otherwise: ``receiver.script("/flaky", [Reply(500), Reply(500)])``
answers the next two requests to ``/flaky`` with 500, then 200 again. ``Reply(hang=s)`` waits ``s`` seconds before
answering (no byte sent), ``Reply(drip=s)`` sends the status line and then one header byte every 0.2 s for ``s``
seconds, ``Reply(302, location=...)`` redirects.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

from service.redis_server import free_port


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: float = 0.0
    drip: float = 0.0
    location: str | None = None


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: list[bool]  # one per secret the receiver knows: does that secret alone verify it?
    received_at: float
    answered: int | None = None  # the status sent back (None: hung up or dripped)

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def record(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class Receiver:
    def __init__(self, secrets: list[str], host: str = "127.0.0.1"):
        self.secrets, self.host, self.port = secrets, host, free_port()
        self.deliveries: list[Delivery] = []
        self.on_receive: dict[str, Callable[[Delivery], None]] = {}
        self._scripts: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, self.port), Handler)
        self.server.daemon_threads = True

    def start(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def script(self, path: str, replies: list[Reply]) -> None:
        with self._lock:
            self._scripts[path] = list(replies)

    def at(self, path: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.path == path]

    def wait_for(self, path: str, done: Callable[[list[Delivery]], bool], timeout: float = 60.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while not done(got := self.at(path)):
            assert time.monotonic() < deadline, f"deliveries to {path} so far: {[(d.id, d.answered) for d in got]}"
            time.sleep(0.05)
        return got

    def _verify(self, body: bytes, headers: dict[str, str]) -> list[bool]:
        out = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
                out.append(True)
            except WebhookVerificationError:
                out.append(False)
        return out

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path
        body = request.rfile.read(int(request.headers.get("content-length") or 0))
        headers = {k.lower(): v for k, v in request.headers.items()}
        delivery = Delivery(path, headers, body, self._verify(body, headers), time.time())
        with self._lock:
            self.deliveries.append(delivery)
            script = self._scripts.get(path)
            reply = script.pop(0) if script else Reply()
        if path in self.on_receive:
            self.on_receive[path](delivery)
        if reply.hang:
            self._closing.wait(reply.hang)
            return
        if reply.drip:
            request.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            end = time.monotonic() + reply.drip
            try:
                while time.monotonic() < end and not self._closing.is_set():
                    request.wfile.write(b"a")
                    request.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        delivery.answered = reply.status
        request.send_response(reply.status)
        for name, value in reply.headers.items():
            request.send_header(name, value)
        if reply.location:
            request.send_header("Location", reply.location)
        request.send_header("Content-Length", "2")
        request.end_headers()
        request.wfile.write(b"ok")
