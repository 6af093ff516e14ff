"""The checkpoints the API serves, read as metadata only (no weights, no torch), and how many live workers serve
each. Each app keeps one ``ModelCatalog`` (``service.app_state``); the job-creating routes resolve requests
against it. A worker is live while its last heartbeat is younger than ``DDPM_WORKER_LEASE_SECONDS``, the one
window the worker's heartbeat and job lease use too. This module knows checkpoint metadata and the job store's
worker heartbeats; it defines no routes.
"""

from __future__ import annotations

import logging
from typing import Any

from model.checkpoint_meta import CheckpointError, read_metadata
from service.queue import JobStore
from service.schemas import ModelInfo

__all__ = ["ModelCatalog"]

log = logging.getLogger(__name__)


class ModelCatalog:
    """Metadata of the configured checkpoints, read without loading weights. A file that cannot be read yet
    (e.g. still being trained) is retried on each look-up, so it becomes available without a restart. A worker
    counts as live for ``worker_window_seconds`` after its last heartbeat (``settings.worker_lease_seconds``)."""

    def __init__(self, checkpoints: dict[str, str], worker_window_seconds: float):
        self.files = dict(checkpoints)
        self.worker_window_seconds = worker_window_seconds
        self.default = next(iter(self.files))
        self._meta: dict[str, dict[str, Any]] = {}
        self._errors: dict[str, str] = {}

    def refresh(self) -> None:
        for name, path in self.files.items():
            if name in self._meta:
                continue
            try:
                self._meta[name] = read_metadata(path)
                self._errors.pop(name, None)
            except CheckpointError as exc:
                if self._errors.get(name) != str(exc):
                    log.warning("model %s unavailable: %s", name, exc)
                self._errors[name] = str(exc)

    def available(self) -> dict[str, dict[str, Any]]:
        self.refresh()
        return dict(self._meta)

    def info(self, workers: dict[str, int] | None) -> list[ModelInfo]:
        """Every configured model; ``workers``: live workers per model (None: unknown, the store is away)."""
        self.refresh()
        out = []
        for name in self.files:
            meta = self._meta.get(name)
            serving = None if workers is None else workers.get(name, 0)
            if meta is None:
                out.append(ModelInfo(name=name, default=name == self.default, available=False, workers=serving,
                                     error=self._errors.get(name)))
                continue
            diffusion = meta["diffusion_config"]
            out.append(ModelInfo(name=name, default=name == self.default, available=True, workers=serving,
                                 image_size=meta["image_size"], channels=meta["channels"],
                                 num_timesteps=diffusion["num_timesteps"], variance=diffusion["variance"],
                                 dataset=meta["dataset"], metadata=meta))
        return out

    def live_workers(self, store: JobStore, models: list[str] | None = None) -> dict[str, int]:
        """How many live workers serve each of ``models`` (default: every configured one); raises
        ``StoreUnavailable``."""
        counts = dict.fromkeys(self.files if models is None else models, 0)
        for worker in store.live_workers(self.worker_window_seconds):
            for model in set(worker.get("models") or []) & counts.keys():
                counts[model] += 1
        return counts
