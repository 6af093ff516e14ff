"""The webhook dispatcher: the loop that turns job events into deliveries and makes the attempts.

It runs in its own process (``service.webhooks.process``): ``ddpm webhooks``, which every ``ddpm worker`` starts
as its child (so it shares not even the GIL with the denoising thread), or started on its own. Any number of
them share the work through the outbox in Redis (``service.webhooks.outbox``): nothing is kept in a process, so
a worker killed between a job's end and its ``completed`` delivery loses nothing: the next dispatcher to come
round (the restarted worker's, another worker's, a ``ddpm webhooks``) reads the job's events from where the last
one stopped, and an attempt that was in flight when its process died comes due again when its lease ends.

A thread runs an asyncio loop, so the attempts in flight cost no threads and each has a hard deadline; Redis
calls go to a thread pool. Every ``POLL_SECONDS`` it:

    1. follows: reads the event streams of the jobs due (each job every ``FOLLOW_SECONDS``) and records the
       deliveries they call for (``start``, ``frame`` throttled, ``completed``);
    2. claims due deliveries while fewer than ``concurrency`` attempts are in flight (each leased for the
       attempt's timeout plus ``LEASE_MARGIN_SECONDS``) and attempts each (those of one job claimed together
       one after another, in the order they were created; deliveries are not held back for one another, so a
       ``completed`` may overtake a ``start`` that is being retried):
       render the job record now (a ``completed`` job's images are readable: they and the terminal state are
       one transaction), check the URL against the allow-list again, sign, POST, record the outcome.

This module knows the outbox, the job store's read methods and the HTTP client; it does not know the engine or
how its process was started.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from service import metrics
from service.queue import JobStore, StoreUnavailable, connect
from service.settings import Settings
from service.views import job_view
from service.webhooks.delivery import Result, RetryPolicy, attempt
from service.webhooks.outbox import Outbox, deliveries_for
from service.webhooks.signing import Signer
from service.webhooks.urls import AllowList, WebhookRefused, parse_url, resolve, vet

__all__ = ["Dispatcher", "count_outcome"]

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often the outbox is looked at
FOLLOW_SECONDS = 0.5  # how often one job's event stream is read
FOLLOW_BATCH = 256  # jobs followed per poll
FOLLOW_EVENTS = 500  # stream entries read per job and poll
LEASE_MARGIN_SECONDS = 5.0  # an attempt's lease: its timeout plus this


def count_outcome(event: str, result: str, ended: str | None) -> None:
    """Count an attempt (and the delivery, once it ``ended``: delivered or failed) in this process's metrics."""
    metrics.WEBHOOK_ATTEMPTS.labels(event, result).inc()
    if ended is not None:
        metrics.WEBHOOK_DELIVERIES.labels(event, ended).inc()


class Dispatcher:
    """Delivers webhooks for every job on the store of ``settings`` (see the module docstring)."""

    def __init__(self, settings: Settings, *, concurrency: int | None = None, stop_grace: float = 5.0,
                 on_outcome: Callable[[str, str, str | None], None] | None = None):
        self.store = JobStore(connect(settings.redis_url, timeout=5.0), queue_name=settings.queue_name,
                              ttl_seconds=settings.job_ttl_seconds)
        self.outbox = Outbox(self.store.redis)
        self.signer = Signer([s.get_secret_value() for s in settings.webhook_secret])
        self.allow = AllowList.parse(settings.webhook_allow_hosts)
        self.policy = RetryPolicy(settings.webhook_backoff_seconds, settings.webhook_backoff_max_seconds,
                                  settings.webhook_retry_window_seconds)
        self.timeout = settings.webhook_timeout_seconds
        self.lease = self.timeout + LEASE_MARGIN_SECONDS
        self.frame_interval = settings.webhook_frame_interval_seconds
        self.concurrency = settings.webhook_concurrency if concurrency is None else concurrency
        self.stop_grace = stop_grace
        self.on_outcome = on_outcome or count_outcome  # (event, attempt result, delivery status once it ended)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> Dispatcher:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="webhooks", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Claim nothing more; attempts in flight get up to ``stop_grace`` s (the rest come due again when their
        leases end). Safe to call from a signal handler."""
        self._stop.set()

    def stop(self, timeout: float | None = None) -> None:
        """``request_stop`` and wait for the thread (at most ``timeout`` s; default the grace and 2 s more)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.stop_grace + 2 if timeout is None else timeout)
        self.store.redis.close()

    def wait(self) -> None:
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    # ---- the loop ------------------------------------------------------------------------------------------
    async def _main(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)  # a connection per attempt: pinned addresses differ
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, limits=limits,
                                     timeout=httpx.Timeout(self.timeout)) as client:
            in_flight: set[asyncio.Task[None]] = set()
            pause = POLL_SECONDS
            while not self._stop.is_set():
                try:
                    await asyncio.to_thread(self.follow_once)
                    free = self.concurrency - len(in_flight)
                    if free > 0:
                        claimed = await asyncio.to_thread(self.outbox.claim, time.time(), self.lease, free)
                        by_job: dict[str, list[str]] = {}
                        for member in claimed:
                            by_job.setdefault(member.split("/", 1)[0], []).append(member)
                        for members in by_job.values():  # one job's deliveries one after another, in order
                            task = asyncio.create_task(self._deliver_in_order(client, members))
                            in_flight.add(task)
                            task.add_done_callback(in_flight.discard)
                    pause = POLL_SECONDS
                except StoreUnavailable as exc:
                    log.warning("webhooks: Redis unavailable (%s); retrying in %.1f s", exc, pause)
                    pause = min(pause * 2, 5.0)
                await asyncio.sleep(pause)
            if in_flight:
                _done, late = await asyncio.wait(in_flight, timeout=self.stop_grace)
                for task in late:
                    task.cancel()

    def follow_once(self) -> int:
        """Read the event streams of the jobs due and record the deliveries they call for; returns how many."""
        now = time.time()
        cursors = self.outbox.cursors(self.outbox.to_follow(now, FOLLOW_SECONDS, FOLLOW_BATCH))
        created = 0
        for job_id, cursor in cursors.items():
            events = self.store.events(job_id, cursor, block_ms=None, count=FOLLOW_EVENTS)
            if events:
                found, done = deliveries_for(events)
                created += self.outbox.record(job_id, events[-1].id, found, done, self.frame_interval, time.time())
        return created

    async def _deliver_in_order(self, client: httpx.AsyncClient, members: list[str]) -> None:
        for member in members:
            await self._deliver(client, member)

    async def _deliver(self, client: httpx.AsyncClient, member: str) -> None:
        try:
            started = await asyncio.to_thread(self.outbox.start_attempt, member, time.time())
            if started is None:
                return
            url, delivery = started
            result = await self._attempt(client, member.split("/", 1)[0], url, delivery["id"])
            await asyncio.to_thread(self._record, member, delivery, result)
        except StoreUnavailable as exc:  # the lease brings it back
            log.warning("webhooks: Redis unavailable during delivery %s: %s", member, exc)
        except Exception:
            log.exception("webhooks: delivery %s failed unexpectedly; it comes due again after its lease", member)

    async def _attempt(self, client: httpx.AsyncClient, job_id: str, url: str, msg_id: str) -> Result:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            return Result("give_up", "expired", "the job expired before this delivery")
        body = (await asyncio.to_thread(lambda: job_view(self.store, job).model_dump_json())).encode()
        try:
            target = parse_url(url)
            addresses = await asyncio.to_thread(resolve, target)
            target = vet(target, addresses, self.allow)
        except WebhookRefused as exc:
            return Result("give_up", "refused", f"refused: {exc}")
        except OSError as exc:
            return Result("retry", "dns_error", f"{exc}")
        return await attempt(client, target, body, self.signer.headers(msg_id, int(time.time()), body),
                             self.timeout)

    def _record(self, member: str, delivery: dict[str, Any], result: Result) -> None:
        now, attempts = time.time(), int(delivery["attempts"])
        next_at = None
        if result.kind == "retry":
            next_at = self.policy.next_attempt_at(attempts, float(delivery["first_attempt_at"]), now,
                                                  result.retry_after)
        status = "delivered" if result.kind == "delivered" else "pending" if next_at is not None else "failed"
        error = result.error
        if status == "failed" and result.kind == "retry":
            error = f"{error}; gave up after {attempts} attempts (retry window over)"
        self.outbox.finish(member, status, error=error, response_status=result.status, next_at=next_at, now=now)
        event = delivery["event"]
        self.on_outcome(event, result.label, None if status == "pending" else status)
        level = {"delivered": logging.DEBUG, "pending": logging.INFO}.get(status, logging.WARNING)
        log.log(level, "webhook %s %s: %s (attempt %d)%s",
                delivery["id"], event, status, attempts, f": {error}" if error and status != "delivered" else "")
