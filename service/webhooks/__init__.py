"""Signed webhooks: apps are told about their jobs instead of asking.

A job submitted with ``webhook`` (an http/https URL) and ``webhook_events_filter`` (``start``, ``frame``,
``completed``; default ``start`` and ``completed``) gets a POST of its record, as ``GET /jobs/{id}`` returns it,
on each of those events, signed per the Standard Webhooks specification. The package, one job per module:

    urls        where a webhook may go: URL syntax, the SSRF check against the operator's allow-list
    signing     webhook-id / webhook-timestamp / webhook-signature (HMAC-SHA256, several secrets for rotation)
    outbox      the subscriptions, deliveries and their schedule in Redis (at least once, survives restarts)
    delivery    one HTTP attempt (timeout, no redirects, bounded read) and the retry policy
    dispatcher  the loop that follows job events and makes the attempts
    process     ``ddpm webhooks``: the dispatcher as a process (every worker starts one as its child)

This module is the API's side: ``WebhookPolicy`` (from the settings) and ``requested_subscription``, which checks
a request's webhook fields and raises ``RequestInvalid`` naming the field (a 422). It knows no HTTP framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.schemas import RequestInvalid
from service.settings import Settings
from service.webhooks.outbox import EVENTS
from service.webhooks.urls import AllowList, WebhookRefused, check

__all__ = ["DEFAULT_EVENTS", "Subscription", "WebhookPolicy", "requested_subscription"]

DEFAULT_EVENTS = ("start", "completed")


@dataclass(frozen=True)
class WebhookPolicy:
    """What the API needs to accept a webhook: whether signing secrets are configured, and the allow-list.
    Holds no secret."""

    enabled: bool
    allow: AllowList

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        return cls(bool(settings.webhook_secret), AllowList.parse(settings.webhook_allow_hosts))


@dataclass(frozen=True)
class Subscription:
    url: str
    events: tuple[str, ...]


def requested_subscription(url: str | None, events: Sequence[str] | None, policy: WebhookPolicy
                           ) -> Subscription | None:
    """The subscription a request asks for (None without ``webhook``); ``RequestInvalid`` when the URL is
    refused (syntax, or an address the allow-list does not admit: resolved now, checked again on delivery)."""
    if url is None:
        if events is not None:
            raise RequestInvalid("webhook_events_filter", "only means something with a webhook URL")
        return None
    if not policy.enabled:
        raise RequestInvalid("webhook", "webhooks are off on this server (no DDPM_WEBHOOK_SECRET is set)")
    try:
        check(url, policy.allow)
    except WebhookRefused as exc:
        raise RequestInvalid("webhook", f"refused: {exc}") from None
    chosen = set(events or DEFAULT_EVENTS)
    return Subscription(url, tuple(e for e in EVENTS if e in chosen))
