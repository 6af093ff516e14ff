"""``ddpm up``: the whole stack on one machine, no Docker: a private Redis, one worker and the API.

Starts a real redis-server (``service.redis_server``, append-only persistence in a data directory) unless
``--redis-url`` names an existing one, then ``ddpm worker`` and ``ddpm serve`` as child processes, waits until
``/readyz`` says a worker serves the default model, and prints the URL. Ctrl-C or SIGTERM stops the API, then the
worker (SIGTERM: it finishes or hands back its job), then Redis. If a child dies, everything is stopped and the
exit status is 1. Children run in their own sessions, so a terminal's Ctrl-C reaches only this supervisor,
which then stops them in order. This module knows process management only; the children own their work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from model.checkpoint import CheckpointError, read_metadata
from service.api import add_common_flags, settings_from_args
from service.redis_server import RedisServer, die_with_parent
from service.settings import DEMO_CHECKPOINT, Settings

__all__ = ["Stack", "StackError", "configure_parser", "main"]

log = logging.getLogger(__name__)
DEFAULT_DATA_DIR = Path.home() / ".cache" / "ddpm" / "redis"


class StackError(RuntimeError):
    """The stack could not start (message says why and what to do)."""


class Stack:
    """Redis (unless external) + one worker + the API, as processes supervised by this one."""

    def __init__(self, settings: Settings, *, external_redis: bool, data_dir: Path, device: str,
                 worker_metrics_port: int):
        self.settings = settings
        self.external_redis = external_redis
        self.data_dir = data_dir
        self.device = device
        self.worker_metrics_port = worker_metrics_port
        self.redis: RedisServer | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def check(self) -> None:
        """Refuse to start with an unreadable checkpoint or a busy API port (clear messages, nothing started)."""
        for name, path in self.settings.checkpoints.items():
            try:
                read_metadata(path)
            except CheckpointError as exc:
                hint = (" Train the demo model with `ddpm train --preset digits` (see README) or pass "
                        "--checkpoint NAME=FILE." if Path(path) == DEMO_CHECKPOINT else "")
                raise StackError(f"model {name!r}: {exc}.{hint}") from None
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
            try:
                s.bind((self.settings.host, self.settings.port))
            except OSError as exc:
                raise StackError(f"cannot listen on {self.settings.host}:{self.settings.port} ({exc}); "
                                 "pass --port") from None

    def start(self) -> None:
        self.check()
        redis_url = self.settings.redis_url
        if not self.external_redis:
            try:
                self.redis = RedisServer(data_dir=self.data_dir, appendonly=True).start()
            except (OSError, RuntimeError) as exc:  # no binary, or it would not start
                raise StackError(f"could not start a private redis-server: {exc}; or pass --redis-url") from None
            redis_url = self.redis.url
        checkpoints = [f"--checkpoint={n}={p}" for n, p in self.settings.checkpoints.items()]
        common = ["--redis-url", redis_url, *checkpoints]
        self._spawn("worker", ["worker", *common, "--device", self.device,
                               "--metrics-port", str(self.worker_metrics_port)])
        self._spawn("api", ["serve", *common, "--host", self.settings.host, "--port", str(self.settings.port)])

    def _spawn(self, name: str, argv: list[str]) -> None:
        cmd = [sys.executable, "-m", "service.cli", *argv]
        log.info("starting %s: %s", name, " ".join(cmd))
        # The children's logs go to stderr, so stdout carries only the "ready" line (scripts can read the URL).
        self.children[name] = subprocess.Popen(cmd, start_new_session=True, env=os.environ.copy(), stdout=sys.stderr,
                                               preexec_fn=die_with_parent)

    def dead_child(self) -> str | None:
        """The name of a child that exited, if any."""
        return next((n for n, p in self.children.items() if p.poll() is not None), None)

    def wait_ready(self, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            dead = self.dead_child()
            if dead:
                raise StackError(f"the {dead} exited with status {self.children[dead].returncode} while starting")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                    if r.status == 200 and json.load(r).get("worker") == "serving":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise StackError(f"not ready after {timeout:.0f} s (see {self.url}/readyz)")
            stop.wait(0.25)

    def stop(self) -> None:
        """API first (no new jobs), then the worker (it finishes or hands back its job), then Redis."""
        for name, grace in (("api", 10.0), ("worker", 30.0)):
            proc = self.children.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", name, grace)
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.stop()
        log.info("stopped")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"the private Redis's append-only files (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="the worker's device (DDPM_DEVICE)")
    parser.add_argument("--worker-metrics-port", type=int,
                        help="the worker's Prometheus port, 0 = off (DDPM_WORKER_METRICS_PORT)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"ddpm up: invalid settings: {exc}", file=sys.stderr)
        return 2
    stack = Stack(settings, external_redis=args.redis_url is not None, data_dir=args.data_dir,
                  device=args.device or settings.device,
                  worker_metrics_port=(settings.worker_metrics_port if args.worker_metrics_port is None
                                       else args.worker_metrics_port))
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    try:
        stack.start()
        stack.wait_ready(args.ready_timeout, stop)
        if not stop.is_set():
            print(f"DDPM service ready: {stack.url}/  (API docs {stack.url}/docs; Ctrl-C stops it)", flush=True)
        while not stop.wait(0.5):
            dead = stack.dead_child()
            if dead:
                log.error("the %s exited with status %s; stopping", dead, stack.children[dead].returncode)
                status = 1
                break
    except StackError as exc:
        print(f"ddpm up: {exc}", file=sys.stderr)
        status = 2 if not stack.children else 1
    finally:
        stack.stop()
    return status
