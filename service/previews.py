"""Work done off the denoising thread: PNG encoding of frames and final images, and per-job ordered writes.

``Lanes`` runs small tasks on a thread pool while keeping the tasks of one job strictly in submission order (a
job's frames are stored in order and its terminal state is written after its last frame), and tasks of
different jobs in parallel. The denoising loop only submits; it never waits for an encoder or for Redis.

This module knows tensors and PNG bytes; it does not know Redis, RQ or the sampler.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from model.images import png_bytes

__all__ = ["Lanes", "encode_frame", "encode_images"]

log = logging.getLogger(__name__)


def encode_frame(x0_hat: torch.Tensor) -> bytes:
    """One preview frame: the x0-hat of all of a job's images (B, C, H, W) in [-1, 1], a grid when B > 1."""
    return png_bytes(x0_hat.detach().cpu())


def encode_images(images: torch.Tensor) -> list[bytes]:
    """Final images (B, C, H, W) in [-1, 1] -> one PNG each."""
    images = images.detach().cpu()
    return [png_bytes(images[i]) for i in range(images.shape[0])]


class Lanes:
    """A thread pool where tasks sharing a key run one after another, in the order they were submitted.

    A task that raises is logged and counted by ``on_error``; the lane carries on with its next task.
    ``drain(key)`` waits for a key's queued tasks; ``close()`` waits for everything and stops the pool.
    """

    def __init__(self, threads: int = 2, on_error: Callable[[BaseException], None] | None = None):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="previews")
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
