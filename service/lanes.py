"""Lanes: a small thread pool that runs one job's tasks strictly in order and different jobs' in parallel.

The worker's denoising loop hands every slow or blocking task of a job to the job's lane and never waits for it:
PNG encoding, frame writes, the terminal write and RQ's bookkeeping (``service.store_sink`` submits them). One
lane per job keeps its frames in order and its terminal state after its last frame.

This module knows threads only: not tensors, PNG, Redis or RQ.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["Lanes"]

log = logging.getLogger(__name__)


class Lanes:
    """A thread pool where tasks sharing a key run one after another, in the order they were submitted.

    A task that raises is logged and counted by ``on_error``; the lane carries on with its next task.
    ``drain(key)`` waits for a key's queued tasks; ``close()`` waits for everything and stops the pool.
    """

    def __init__(self, threads: int = 2, on_error: Callable[[BaseException], None] | None = None):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lanes")
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Callable[[], object]]] = {}
        self._idle: dict[str, threading.Event] = {}
        self._on_error = on_error

    def submit(self, key: str, task: Callable[[], object]) -> None:
        with self._lock:
            pending = self._queues.get(key)
            if pending is not None:  # the lane is running: its runner will pick the task up
                pending.append(task)
                return
            self._queues[key] = deque([task])
            self._idle.setdefault(key, threading.Event()).clear()
        self._pool.submit(self._run, key)

    def _run(self, key: str) -> None:
        while True:
            with self._lock:
                pending = self._queues[key]
                if not pending:
                    del self._queues[key]
                    self._idle.pop(key).set()
                    return
                task = pending.popleft()
            try:
                task()
            except BaseException as exc:  # a failed write must not kill the lane or the pool thread
                log.exception("background task for %s failed", key)
                if self._on_error is not None:
                    self._on_error(exc)

    def drain(self, key: str, timeout: float | None = None) -> bool:
        """Wait until the tasks queued for ``key`` have run; True unless ``timeout`` passed first."""
        with self._lock:
            idle = self._idle.get(key)
        return True if idle is None else idle.wait(timeout)

    def close(self) -> None:
        """Run every queued task, then stop the threads."""
        with self._lock:
            keys = list(self._idle)
        for key in keys:
            self.drain(key)
        self._pool.shutdown(wait=True)
