"""What one API app holds: made from its settings by ``service.api.create_app``, its Redis clients opened and
closed by the app's lifespan (never at import time). Routes never read it directly: each takes the parts it
needs as typed dependencies (``service.deps``), which tests can override.

    settings        the app's settings, with the API keys and webhook secrets removed
    keys            the API keys as digests (``service.auth``); refused_keys: the count of wrong keys
    webhook_policy  what webhooks may do (whether secrets are set, never the secrets)
    catalog         the served checkpoints' metadata and their live workers (``service.catalog``)
    limits          the bounds requests are resolved against (``service.schemas.Limits``)
    streams         the event streams each client holds (``service.sse``); stream_options: how they wait
    store           the job store of every route (a short Redis timeout and a circuit breaker)
    event_store     the job store of event streams: its reads block, so it has its own client and thread limiter

This module knows which objects exist and how they are made; it defines no routes and no HTTP behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from starlette.datastructures import State

from service.auth import ApiKeys, RefusedKeys
from service.catalog import ModelCatalog
from service.queue import CircuitBreaker, JobStore, connect
from service.schemas import Limits
from service.settings import Settings
from service.sse import StreamOptions, StreamSlots
from service.webhooks import WebhookPolicy

__all__ = ["SSE_THREADS", "ApiState"]

SSE_THREADS = 256  # event-stream reads in flight at once (each blocks a thread up to StreamOptions.block_ms)


@dataclass
class _Open:
    """The resources the lifespan opens."""

    store: JobStore
    event_store: JobStore
    stream_limiter: anyio.CapacityLimiter


class ApiState:
    """Everything one app holds (module docstring). ``open`` and ``close`` run in the app's lifespan; ``store``,
    ``event_store`` and ``stream_limiter`` exist only in between."""

    def __init__(self, settings: Settings, stream_options: StreamOptions | None = None):
        self.keys = ApiKeys(settings.api_keys, settings.admin_api_keys)  # the app keeps the keys' digests only
        self.refused_keys = RefusedKeys(settings.auth_failures_per_minute)
        self.settings = settings.model_copy(update={"api_keys": [], "admin_api_keys": [], "webhook_secret": []})
        self.webhook_policy = WebhookPolicy.from_settings(settings)  # whether secrets are set, not the secrets
        self.catalog = ModelCatalog(settings.checkpoints, worker_window_seconds=settings.worker_lease_seconds)
        self.limits = Limits(settings.max_num_images, settings.max_steps, settings.max_image_steps,
                             settings.max_frames_per_job, settings.max_input_pixels)
        self.streams = StreamSlots(settings.max_sse_per_client)
        self.stream_options = stream_options or StreamOptions()
        self._open: _Open | None = None

    @classmethod
    def of(cls, state: State) -> ApiState:
        """The ``ApiState`` an app made by ``create_app`` keeps in its ``app.state``."""
        found = getattr(state, "api", None)
        if not isinstance(found, cls):
            raise RuntimeError("this app was not made by service.api.create_app (no ApiState in app.state)")
        return found

    def open(self) -> None:
        """Connect the job stores (no Redis command is sent yet) and read the checkpoints' metadata."""
        timeout = self.settings.store_timeout_seconds
        # A hung Redis costs a request store_timeout_seconds, then calls fail fast (503) for as long.
        store = self._job_store(timeout, high_water=self.settings.store_high_water,
                                breaker=CircuitBreaker(open_seconds=timeout))
        # Event-stream reads block up to block_ms, so they get their own client and thread limiter.
        events = self._job_store(self.stream_options.block_ms / 1000 + 2.0)
        self._open = _Open(store, events, anyio.CapacityLimiter(SSE_THREADS))
        self.catalog.refresh()

    def _job_store(self, timeout: float, high_water: float | None = None, breaker: CircuitBreaker | None = None
                   ) -> JobStore:
        settings = self.settings
        return JobStore(connect(settings.redis_url, timeout=timeout), queue_name=settings.queue_name,
                        ttl_seconds=settings.job_ttl_seconds, job_timeout_seconds=settings.job_timeout_seconds,
                        high_water=high_water, breaker=breaker)

    def close(self) -> None:
        if self._open is not None:
            self._open.store.redis.close()
            self._open.event_store.redis.close()
            self._open = None

    def _opened(self) -> _Open:
        if self._open is None:
            raise RuntimeError("the app's lifespan has not started: its job store is not connected")
        return self._open

    @property
    def store(self) -> JobStore:
        return self._opened().store

    @property
    def event_store(self) -> JobStore:
        return self._opened().event_store

    @property
    def stream_limiter(self) -> anyio.CapacityLimiter:
        return self._opened().stream_limiter
