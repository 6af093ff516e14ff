"""``ddpm up``: the whole stack on one machine, no Docker: a private Redis, one worker and the API, supervised.

Before anything starts, every port the stack will open is chosen or checked, and all conflicts are reported in
one message: the API's port (checked), the worker's metrics port (the one asked for, checked; by default the
first free one from 9100) and the private Redis's port (a free one). The private Redis keeps an append-only file
in a data directory of its own: by default one per checkout and API port (``default_data_dir``), locked while
the stack runs, so two stacks never share a Redis file. ``--redis-url`` uses an existing Redis instead.

Then Redis, the worker and the API start, each in its own session, so a terminal's Ctrl-C (SIGINT to the
foreground process group) reaches only this supervisor. "Ready" is printed once the API answers and *this
stack's* worker (by its name) has sent its heartbeat to this stack's Redis; another stack's worker never counts.

Supervision: a child that exits is restarted (backoff 1 s doubling to 30 s, reset after a minute up; logged);
after ``MAX_RESTARTS`` quick failures in a row the stack stops with status 1. A restarted worker's job is
retried once its lease runs out (``--lease-seconds``, which overrides the setting ``worker_lease_seconds``).
Stopping (Ctrl-C, SIGTERM, SIGHUP): the API first (no new requests), then the worker (it finishes its jobs for up
to ``--stop-grace`` seconds, then hands the rest back to the queue without using their retries), then Redis,
last; a second Ctrl-C makes the worker hand back at once.

This module knows process management only; the children own their work. The worker gets no API keys.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from pydantic import ValidationError

from model.checkpoint_meta import CheckpointError, read_metadata
from service.queue import JobStore, StoreUnavailable, connect
from service.redis_server import RedisServer, die_with_parent, free_port
from service.serve import SETTINGS_FLAGS, add_common_flags
from service.settings import DEMO_CHECKPOINT, Settings, describe_validation_error, settings_from_args

__all__ = ["Stack", "StackError", "configure_parser", "default_data_dir", "main"]

log = logging.getLogger(__name__)
CHECKOUT = Path(__file__).resolve().parent.parent
FIRST_METRICS_PORT = 9100  # the worker's metrics port when none is asked for: the first free one from here
RESTART_BACKOFF = (1.0, 30.0)  # first and longest wait before restarting a child that exited
STABLE_SECONDS = 60.0  # a child up this long has its backoff reset
MAX_RESTARTS = 5  # quick failures in a row before the stack gives up
# Beyond --stop-grace, a stopping worker's last writes may wait one lease for an unavailable Redis
# (service.worker); this much more is left for its exit before it is killed.
WORKER_EXIT_MARGIN = 10.0


class StackError(RuntimeError):
    """The stack could not start (message says why and what to do)."""


def default_data_dir(port: int) -> Path:
    """``~/.cache/ddpm/stacks/<checkout>-<hash of its path>-<port>/redis``: one per checkout and API port, so
    a fresh clone never sees another checkout's jobs and a second stack never shares the first one's files."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(CHECKOUT).encode()).hexdigest()[:8]
    return cache / "ddpm" / "stacks" / f"{CHECKOUT.name}-{digest}-{port}" / "redis"


def _bindable(host: str, port: int) -> str | None:
    """None if ``host:port`` can be listened on now, else the reason (SO_REUSEADDR as uvicorn: TIME_WAIT is
    no obstacle)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _first_free(host: str, start: int, *, skip: tuple[int, ...] = ()) -> int | None:
    return next((p for p in range(start, start + 100) if p not in skip and _bindable(host, p) is None), None)


def _without_api_keys(env: dict[str, str]) -> dict[str, str]:
    """The worker's environment: the API keys (and any other ``DDPM_*API_KEYS``) stay with the API."""
    return {k: v for k, v in env.items() if not (k.startswith("DDPM_") and k.endswith("API_KEYS"))}


@dataclass
class Child:
    """A supervised process: how to start it, and its restart state."""

    name: str
    argv: Callable[[int], list[str]]  # incarnation number -> arguments of `ddpm`
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    incarnation: int = 0
    failures: int = 0  # quick exits in a row
    restart_at: float | None = None

    def start(self) -> None:
        self.incarnation += 1
        cmd = [sys.executable, "-m", "service.cli", *self.argv(self.incarnation)]
        log.info("starting the %s: %s", self.name, " ".join(cmd))
        # Logs go to stderr, so stdout carries only the "ready" line (scripts can read the URL).
        self.proc = subprocess.Popen(cmd, start_new_session=True, env=self.env, stdout=sys.stderr,
                                     preexec_fn=die_with_parent)
        self.started_at, self.restart_at = time.monotonic(), None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace: float, again: threading.Event | None = None) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds (SIGTERM again when ``again`` is set), then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        log.info("stopping the %s (pid %d)", self.name, proc.pid)
        proc.send_signal(signal.SIGTERM)
        deadline, forwarded = time.monotonic() + grace, False
        while proc.poll() is None and time.monotonic() < deadline:
            if again is not None and again.is_set() and not forwarded:
                proc.send_signal(signal.SIGTERM)
                forwarded = True
            time.sleep(0.05)
        if proc.poll() is None:
            log.warning("the %s did not stop within %.0f s; killing it", self.name, grace)
            proc.kill()
        code = proc.wait()
        log.info("the %s stopped (status %d)", self.name, code)
        return code


@dataclass
class Stack:
    """Redis (unless external) + one worker + the API, as processes supervised by this one."""

    settings: Settings
    external_redis: bool
    data_dir: Path | None
    device: str
    worker_metrics_port: int | None  # None: the first free one from 9100; 0: off
    stop_grace: float = 10.0
    redis: RedisServer | None = None
    children: dict[str, Child] = field(default_factory=dict)
    redis_url: str = ""
    _lock: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def worker_name(self) -> str:
        return self._worker_name(self.children["worker"].incarnation)

    def _worker_name(self, incarnation: int) -> str:
        return f"{socket.gethostname()}-up{os.getpid()}-{incarnation}"

    # ---- before anything starts ----------------------------------------------------------------------------
    def check(self) -> None:
        """Checkpoints readable, every port free (or chosen), the data directory ours; one message for all
        problems, nothing started."""
        problems = []
        for name, path in self.settings.checkpoints.items():
            try:
                read_metadata(path)
            except CheckpointError as exc:
                hint = (" Train the demo model with `ddpm train --preset digits` (see docs/TRAINING.md) or pass "
                        "--checkpoint NAME=FILE." if Path(path) == DEMO_CHECKPOINT else "")
                problems.append(f"model {name!r}: {exc}.{hint}")
        host, port = self.settings.host, self.settings.port
        suggestions = []
        if (why := _bindable(host, port)) is not None:
            free = _first_free(host, port + 1)
            problems.append(f"cannot listen on {host}:{port} for the API ({why})")
            suggestions.append(f"PORT={free}" if free else "PORT=...")
        if self.worker_metrics_port is None:
            self.worker_metrics_port = _first_free(host, FIRST_METRICS_PORT, skip=(port,))
            if self.worker_metrics_port is None:
                problems.append(f"no free port for the worker's metrics in {FIRST_METRICS_PORT}-"
                                f"{FIRST_METRICS_PORT + 99}")
                suggestions.append("WORKER_METRICS_PORT=0")
        elif self.worker_metrics_port and (why := _bindable(host, self.worker_metrics_port)) is not None:
            free = _first_free(host, self.worker_metrics_port + 1, skip=(port,))
            problems.append(f"cannot listen on {host}:{self.worker_metrics_port} for the worker's metrics ({why})")
            suggestions.append(f"WORKER_METRICS_PORT={free or 0}")
        if suggestions:
            flags = " ".join(f"--{s.split('=')[0].lower().replace('_', '-')} {s.split('=')[1]}" for s in suggestions)
            problems.append(f"choose others: `make run {' '.join(suggestions)}` or `ddpm up {flags}`")
        if problems:
            raise StackError("; ".join(problems))

    def _take_data_dir(self) -> None:
        """Lock the data directory for this stack's lifetime: a second stack on it is refused."""
        assert self.data_dir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.data_dir / "stack.lock", "a+")  # noqa: SIM115 (held until the stack stops)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            raise StackError(f"the data directory {self.data_dir} is in use by another `ddpm up` (pid {owner}); "
                             "stop it, or give this stack its own: `make run REDIS_DATA_DIR=...` or "
                             "`ddpm up --data-dir DIR`") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    # ---- start ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.check()
        self.redis_url = self.settings.redis_url
        if not self.external_redis:
            self._take_data_dir()
            try:
                self.redis = RedisServer(port=free_port(), data_dir=self.data_dir, appendonly=True).start()
            except (OSError, RuntimeError) as exc:  # no binary, or it would not start
                raise StackError(f"could not start a private redis-server: {exc}; or pass --redis-url") from None
            self.redis_url = self.redis.url
        env = os.environ.copy()
        self.children["worker"] = Child("worker", self.worker_argv, _without_api_keys(env))
        self.children["api"] = Child("api", lambda n: ["serve", *self._common_argv(), "--host", self.settings.host,
                                                       "--port", str(self.settings.port)], env)
        for child in self.children.values():
            child.start()

    def _common_argv(self) -> list[str]:
        return ["--redis-url", self.redis_url,
                *(f"--checkpoint={n}={p}" for n, p in self.settings.checkpoints.items())]

    def worker_argv(self, incarnation: int) -> list[str]:
        """The arguments of the worker's ``incarnation``-th start (``ddpm worker ...``)."""
        return ["worker", *self._common_argv(), "--device", self.device, "--name", self._worker_name(incarnation),
                "--metrics-host", self.settings.host, "--metrics-port", str(self.worker_metrics_port),
                "--stop-grace", str(self.stop_grace), "--lease-seconds", str(self.settings.worker_lease_seconds)]

    def wait_ready(self, timeout: float, stop: threading.Event) -> None:
        """Until the API answers and this stack's own worker has sent a heartbeat to this stack's Redis."""
        deadline = time.monotonic() + timeout
        store = JobStore(connect(self.redis_url, timeout=2.0))
        try:
            while not stop.is_set():
                for child in self.children.values():
                    if (code := child.exited()) is not None:
                        raise StackError(f"the {child.name} exited with status {code} while starting")
                if self._api_up() and self._worker_up(store):
                    return
                if time.monotonic() > deadline:
                    raise StackError(f"not ready after {timeout:.0f} s (API {self.url}/healthz, worker "
                                     f"{self.worker_name}'s heartbeat in {self.redis_url})")
                stop.wait(0.25)
        finally:
            store.redis.close()

    def _api_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _worker_up(self, store: JobStore) -> bool:
        try:
            live = store.live_workers(self.settings.worker_lease_seconds)
            return any(w.get("name") == self.worker_name for w in live)
        except StoreUnavailable:
            return False

    def describe(self) -> str:
        parts = [f"API docs {self.url}/docs"]
        if self.worker_metrics_port:
            parts.append(f"worker metrics http://{self.settings.host}:{self.worker_metrics_port}/metrics")
        parts.append(f"Redis {self.redis_url}" + (f" (data in {self.data_dir})" if self.redis else ""))
        return "; ".join(parts)

    # ---- supervise -----------------------------------------------------------------------------------------
    def supervise(self) -> bool:
        """Restart what exited (with backoff); False when a child keeps failing and the stack must stop."""
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is not None:
            log.error("the private redis-server exited with status %s; restarting it (same port and data)",
                      self.redis.proc.returncode)
            try:
                self.redis.start()
            except (OSError, RuntimeError) as exc:
                log.error("could not restart redis-server: %s", exc)
                return False
        now = time.monotonic()
        for child in self.children.values():
            code = child.exited()
            if code is None:
                continue
            if child.restart_at is None:
                up = now - child.started_at
                child.failures = 0 if up >= STABLE_SECONDS else child.failures + 1
                if child.failures > MAX_RESTARTS:
                    log.error("the %s exited with status %s %d times in a row within %.0f s of starting; "
                              "giving up", child.name, _status(code), child.failures, STABLE_SECONDS)
                    return False
                wait = min(RESTART_BACKOFF[0] * 2 ** max(child.failures - 1, 0), RESTART_BACKOFF[1])
                child.restart_at = now + wait
                log.error("the %s (pid %d) exited with status %s after %.1f s; restarting it in %.0f s "
                          "(restart %d)", child.name, child.proc.pid if child.proc else -1, _status(code), up,
                          wait, child.incarnation)
            elif now >= child.restart_at:
                child.start()
        return True

    # ---- stop ----------------------------------------------------------------------------------------------
    def stop(self, again: threading.Event | None = None) -> None:
        """The API first (no new requests), then the worker (it finishes or hands back its jobs), Redis last."""
        if "api" in self.children:
            self.children["api"].stop(10.0)
        if "worker" in self.children:
            grace = self.stop_grace + self.settings.worker_lease_seconds + WORKER_EXIT_MARGIN
            self.children["worker"].stop(grace, again)
        if self.redis is not None:
            log.info("stopping redis-server (pid %s)", self.redis.proc.pid if self.redis.proc else "-")
            self.redis.stop()
            log.info("redis-server stopped")
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self.children or self.redis is not None:
            log.info("stopped")


def _status(code: int) -> str:
    return f"{code} ({signal.Signals(-code).name})" if code < 0 else str(code)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser)
    parser.add_argument("--data-dir", type=Path,
                        help="the private Redis's append-only files (default: one directory per checkout and "
                             "API port under ~/.cache/ddpm/stacks/); locked while the stack runs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="the worker's device (DDPM_DEVICE)")
    parser.add_argument("--worker-metrics-port", type=int,
                        help="the worker's Prometheus port, 0 = off (DDPM_WORKER_METRICS_PORT; default: the "
                             f"first free one from {FIRST_METRICS_PORT})")
    parser.add_argument("--stop-grace", type=float, default=10.0,
                        help="on Ctrl-C, seconds the worker keeps running its jobs before handing them back")
    parser.add_argument("--lease-seconds", type=int,
                        help="a job whose worker died is retried after this long (the worker's lease; "
                             "DDPM_WORKER_LEASE_SECONDS, 15)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")


def _stack_from_args(args: argparse.Namespace, settings: Settings) -> Stack:
    external = args.redis_url is not None  # DDPM_REDIS_URL alone does not stop `ddpm up` running its own
    metrics_port = args.worker_metrics_port
    if metrics_port is None and "worker_metrics_port" in settings.model_fields_set:
        metrics_port = settings.worker_metrics_port  # DDPM_WORKER_METRICS_PORT: asked for, so checked
    return Stack(settings, external_redis=external,
                 data_dir=None if external else (args.data_dir or default_data_dir(settings.port)),
                 device=args.device or settings.device, worker_metrics_port=metrics_port,
                 stop_grace=args.stop_grace)


def _settings(args: argparse.Namespace) -> Settings:
    """The environment with the flags that were given on top: the API's, and ``--lease-seconds``."""
    return settings_from_args(args, {**SETTINGS_FLAGS, "lease_seconds": "worker_lease_seconds"})


def main(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"ddpm up: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    stack = _stack_from_args(args, settings)
    stop, again = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.info("received %s again: the worker hands its jobs back now", signal.Signals(signum).name)
            again.set()
            return
        log.info("received %s; stopping: the API, then the worker (up to %.0f s for its jobs), then Redis",
                 signal.Signals(signum).name, stack.stop_grace)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    status = 0
    try:
        stack.start()
        stack.wait_ready(args.ready_timeout, stop)
        if not stop.is_set():
            print(f"DDPM service ready: {stack.url}/  ({stack.describe()}; Ctrl-C stops it)", flush=True)
        while not stop.wait(0.5):
            if not stack.supervise():
                status = 1
                break
    except StackError as exc:
        print(f"ddpm up: {exc}", file=sys.stderr)
        status = 2 if not stack.children else 1
    finally:
        stack.stop(again)
    return status
