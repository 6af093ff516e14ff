"""One delivery attempt over HTTP, and when to try again.

``attempt`` POSTs a signed body to a vetted ``Target``: it connects to the checked address (the ``Host`` header
and the TLS server name stay the URL's host), follows no redirect, gives the whole attempt ``timeout`` seconds
(connecting, sending, and the response's status line and headers; a receiver that sends a byte now and then
cannot stretch it), and reads at most ``MAX_RESPONSE_BYTES`` of the response body, for the error message.

The outcome decides what happens next (``Result.kind``):

    2xx                                   delivered
    timeout, connection error, 408, 429, 5xx   retry (429/503: after Retry-After when given)
    3xx (not followed), other 4xx         give up

``RetryPolicy`` spaces retries exponentially (``backoff`` x 2^(attempt-1), at most ``backoff_max``) with jitter
(each delay is drawn from its upper half, so receivers that failed together are not retried together), waits
at least what a ``Retry-After`` asks, and gives up once the next attempt would fall more than ``window`` seconds
after the first. This module knows HTTP; it does not know Redis or jobs.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

import httpx

from service.webhooks.urls import Target

__all__ = ["MAX_RESPONSE_BYTES", "USER_AGENT", "Result", "RetryPolicy", "attempt", "classify", "retry_after"]

MAX_RESPONSE_BYTES = 1024
USER_AGENT = "ddpm-service-webhooks/0.1"
RETRY_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class Result:
    """What one attempt came to. ``label`` is the metrics' ``result``: 2xx, 3xx, 4xx, 5xx, timeout,
    connect_error, dns_error, refused or expired."""

    kind: Literal["delivered", "retry", "give_up"]
    label: str
    error: str | None = None
    status: int | None = None
    retry_after: float | None = None


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _snippet(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return f": {text}" if text else ""


def classify(status: int, headers: httpx.Headers, body: bytes) -> Result:
    """The outcome of a response (see the module docstring)."""
    family = f"{status // 100}xx"
    if 200 <= status < 300:
        return Result("delivered", family, status=status)
    if 300 <= status < 400:
        location = headers.get("location", "")[:200]
        return Result("give_up", family, f"HTTP {status}: redirect to {location or '(no location)'} not followed",
                      status)
    error = f"HTTP {status}{_snippet(body)}"
    if status in RETRY_STATUSES or status >= 500:
        return Result("retry", family, error, status, retry_after(headers.get("retry-after")))
    return Result("give_up", family, error, status)


async def attempt(client: httpx.AsyncClient, target: Target, body: bytes, headers: dict[str, str],
                  timeout: float) -> Result:
    """POST ``body`` to ``target`` once (``client`` must not follow redirects nor keep connections alive)."""
    sent = {**headers, "host": target.host_header, "content-type": "application/json", "user-agent": USER_AGENT}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", target.connect_url, content=body, headers=sent,
                                     extensions=extensions) as response:
                received = b""
                async for chunk in response.aiter_raw():
                    received += chunk
                    if len(received) >= MAX_RESPONSE_BYTES:
                        break  # the rest is never read: closing the response drops the connection
                return classify(response.status_code, response.headers, received[:MAX_RESPONSE_BYTES])
    except (TimeoutError, httpx.TimeoutException):
        return Result("retry", "timeout", f"no complete response within {timeout:g} s")
    except httpx.HTTPError as exc:
        return Result("retry", "connect_error", f"{type(exc).__name__}: {exc}"[:300])


@dataclass(frozen=True)
class RetryPolicy:
    backoff: float = 2.0
    backoff_max: float = 600.0
    window: float = 3600.0

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """The jittered wait after the ``attempts``-th failed attempt: in [d/2, d], d = backoff x 2^(attempts-1)."""
        d = min(self.backoff_max, self.backoff * 2 ** min(max(attempts - 1, 0), 30))
        return d / 2 + (rng or random).uniform(0, d / 2)

    def next_attempt_at(self, attempts: int, first_attempt_at: float, now: float, wait_at_least: float | None = None,
                        rng: random.Random | None = None) -> float | None:
        """When to try again after ``attempts`` attempts, or None to give up (past the retry window)."""
        delay = self.delay(attempts, rng)
        if wait_at_least is not None:
            delay = max(delay, wait_at_least)
        at = now + delay
        return None if at > first_attempt_at + self.window else at
