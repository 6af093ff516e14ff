"""The stack a service benchmark runs against: ``ddpm up`` itself (``service.stack.Stack``: a private redis-server,
one ``ddpm worker`` and the API, supervised), started as ``make run`` starts it, one per benchmark run.

``Up`` runs ``python -m service.cli up`` as a child in its own session, on a free API port (and a free worker
metrics port when asked for), with a private data directory and the worker's torch threads set, and waits for the
one line ``ddpm up`` prints on stdout once its API answers and its worker has sent a heartbeat. That line also
gives the private Redis's URL. Its log (stderr) goes to a file beside the data directory and is quoted when the
stack fails to start. Stopping is SIGTERM, as a terminal's Ctrl-C: the API, then the worker, then Redis.

The children inherit this process's environment, ``DDPM_*`` settings included, plus what a benchmark passes in
``env`` (queue limits, webhook settings); the stack's settings are the service's business, not this module's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from benchmarks.common import ROOT
from service.redis_server import die_with_parent, free_port

__all__ = ["Up", "child_pids", "cli_child"]

READY_PREFIX = "DDPM service ready"
STOP_TIMEOUT = 90.0  # ddpm up's own budget: API 10 s, worker its stop grace (10 s) + 25 s, Redis


class Up:
    """``ddpm up`` serving ``checkpoint`` as model ``model``; a context manager (started on entry, stopped on exit)."""

    def __init__(self, checkpoint: Path, workdir: Path, *, model: str = "bench", device: str = "cpu",
                 threads: int = 1, env: Mapping[str, str] | None = None, worker_metrics: bool = False,
                 ready_timeout: float = 300.0) -> None:
        self.port = free_port()
        self.metrics_port = free_port() if worker_metrics else 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics" if worker_metrics else None
        self.redis_url = ""  # from the ready line
        self.log_path = workdir / "ddpm-up.log"
        self.argv = [sys.executable, "-m", "service.cli", "up", "--host", "127.0.0.1", "--port", str(self.port),
                     "--data-dir", str(workdir / "redis"), "--device", device,
                     "--worker-metrics-port", str(self.metrics_port), "--checkpoint", f"{model}={checkpoint}"]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DDPM_LOG_LEVEL": "WARNING", **(env or {})}
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Up:
        with self.log_path.open("w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, text=True, stdout=subprocess.PIPE,
                                         stderr=log, start_new_session=True, preexec_fn=die_with_parent)
        line, timed_out = self._first_line()
        if not line.startswith(READY_PREFIX):
            status = self.stop()
            why = (f"was not ready within {self.ready_timeout:g} s" if timed_out
                   else f"exited with status {status} before it was ready")
            raise RuntimeError(f"ddpm up {why} (stdout: {line.strip()!r}); its log {self.log_path} ends:\n"
                               f"{self._log_tail()}")
        found = re.search(r"Redis (redis://[^\s;)]+)", line)
        if found is None:
            self.stop()
            raise RuntimeError(f"no Redis URL in ddpm up's ready line: {line.strip()!r}")
        self.redis_url = found.group(1)
        return self

    def _first_line(self) -> tuple[str, bool]:
        """stdout's first line ("" once the process ends), and whether the ready timeout had to stop it."""
        assert self.proc is not None and self.proc.stdout is not None
        fired = threading.Event()

        def give_up() -> None:
            fired.set()
            self.proc.terminate()  # type: ignore[union-attr]

        timer = threading.Timer(self.ready_timeout, give_up)
        timer.start()
        try:
            return self.proc.stdout.readline(), fired.is_set()
        finally:
            timer.cancel()

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        """SIGTERM and wait (SIGKILL past ``STOP_TIMEOUT``); the exit status of ``ddpm up``."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its children get SIGTERM from the kernel (die_with_parent)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def worker_pid(self) -> int:
        """The pid of the stack's ``ddpm worker`` process now (it changes if the supervisor restarts it)."""
        pid = cli_child(self.pid, "worker")
        if pid is None:
            raise RuntimeError("ddpm up has no worker process")
        return pid

    def __enter__(self) -> Up:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def child_pids(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (Linux: from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def cli_child(parent: int, subcommand: str) -> int | None:
    """The pid of ``parent``'s child running ``python -m service.cli <subcommand>`` (the worker of ``ddpm up``, the
    webhook dispatcher of a worker), or None."""
    for pid in child_pids(parent):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        except OSError:
            continue
        if argv[1:4] == ["-m", "service.cli", subcommand]:
            return pid
    return None
