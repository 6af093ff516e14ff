"""``ddpm webhooks``: the dispatcher (``service.webhooks.dispatcher``) as a process of its own, and the worker's
handle on the one it starts as its child.

Why a process: the dispatcher renders, signs and POSTs job records in Python; in the worker's process it would
take the GIL from the denoising thread (measured in ``benchmarks/README.md``), so ``ddpm worker`` runs it as a
child process instead (``DispatcherProcess``). The child gets the worker's environment (signing secrets,
allow-list, timeouts) with the worker's Redis URL and concurrency, logs to the worker's stderr, reports each
outcome to the worker on its stdout (one line per attempt: the worker counts it in its own metrics, so the
worker's ``/metrics`` shows its deliveries), and exits when the worker goes away, even by SIGKILL (it watches
its parent). Started on its own, ``ddpm webhooks`` serves its metrics with ``--metrics-port``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Any

from service.settings import Settings

__all__ = ["DispatcherProcess", "configure_parser", "main"]

log = logging.getLogger(__name__)
OUTCOME_PREFIX = "webhook-outcome"  # a stdout line: webhook-outcome EVENT RESULT ENDED|-


class DispatcherProcess:
    """The worker's child ``ddpm webhooks`` (see the module docstring)."""

    def __init__(self, settings: Settings, concurrency: int, stop_grace: float = 5.0):
        env = {**os.environ, "DDPM_REDIS_URL": settings.redis_url, "DDPM_WEBHOOK_CONCURRENCY": str(concurrency)}
        args = [sys.executable, "-m", "service.cli", "webhooks", "--parent-pid", str(os.getpid()),
                "--report-outcomes", "--stop-grace", str(stop_grace)]
        self.stop_grace = stop_grace
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self._relay = threading.Thread(target=self._count_outcomes, name="webhook-outcomes", daemon=True)
        self._relay.start()

    def _count_outcomes(self) -> None:
        from service.webhooks.dispatcher import count_outcome

        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 4 and parts[0] == OUTCOME_PREFIX:
                count_outcome(parts[1], parts[2], None if parts[3] == "-" else parts[3])

    def stop(self) -> None:
        """SIGTERM: the child finishes its attempts in flight (at most ``stop_grace`` s), then exits."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(self.stop_grace + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._relay.join(timeout=2)


def _report(event: str, result: str, ended: str | None) -> None:
    print(f"{OUTCOME_PREFIX} {event} {result} {ended or '-'}", flush=True)


def _watch_parent(parent: int, stop: threading.Event, on_gone: Any) -> None:
    while not stop.wait(0.5):
        if os.getppid() != parent:
            log.info("the worker that started this dispatcher is gone; stopping")
            on_gone()
            return


# ---- `ddpm webhooks` -----------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (env DDPM_REDIS_URL)")
    parser.add_argument("--concurrency", type=int, help="attempts in flight (env DDPM_WEBHOOK_CONCURRENCY; 8)")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics server")
    parser.add_argument("--stop-grace", type=float, default=5.0,
                        help="seconds attempts in flight may take after SIGTERM")
    parser.add_argument("--new-secret", action="store_true",
                        help="print a fresh signing secret for DDPM_WEBHOOK_SECRET and exit")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # a worker's child: exit with it
    parser.add_argument("--report-outcomes", action="store_true", help=argparse.SUPPRESS)  # ... and report to it


def main(args: argparse.Namespace) -> int:
    if args.new_secret:
        from service.webhooks.signing import new_secret

        print(new_secret())
        return 0
    overrides: dict[str, Any] = {"redis_url": args.redis_url} if args.redis_url else {}
    if args.concurrency is not None:
        overrides["webhook_concurrency"] = args.concurrency
    settings = Settings(**overrides)
    if not settings.webhook_secret:
        log.error("no DDPM_WEBHOOK_SECRET is set: there is nothing to sign deliveries with")
        return 2
    if args.metrics_port:
        from prometheus_client import start_http_server

        from service.metrics import DISPATCHER_REGISTRY

        start_http_server(args.metrics_port, addr=args.metrics_host, registry=DISPATCHER_REGISTRY)
    from service.webhooks.dispatcher import Dispatcher

    dispatcher = Dispatcher(settings, stop_grace=args.stop_grace,
                            on_outcome=_report if args.report_outcomes else None).start()

    def stop(signum: int, frame: FrameType | None = None) -> None:
        log.info("signal %d: stopping after the attempts in flight (at most %.0f s)", signum, dispatcher.stop_grace)
        dispatcher.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    done = threading.Event()
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, done, dispatcher.request_stop),
                         daemon=True).start()
    log.info("delivering webhooks from %s, %d attempts in flight at most", settings.redis_url, dispatcher.concurrency)
    started = time.monotonic()
    dispatcher.wait()
    done.set()
    dispatcher.stop()
    log.debug("dispatcher ran %.0f s", time.monotonic() - started)
    return 0
