"""The webhook package's pure parts: signatures (checked by the ``standardwebhooks`` package), secrets in
settings, the address check (loopback addresses only), response outcomes and the retry schedule."""

from __future__ import annotations

import base64
import random
import subprocess
import sys
import time
from email.utils import formatdate

import httpx
import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook

from service.settings import Settings
from service.webhooks.delivery import RetryPolicy, classify, retry_after
from service.webhooks.signing import Signer, new_secret, secret_bytes
from service.webhooks.urls import AllowList, WebhookRefused, parse_url, vet


def test_signatures_verify_with_standardwebhooks_for_every_secret() -> None:
    new, old = new_secret(), new_secret()
    body = b'{"id":"abc","status":"succeeded"}'
    headers = Signer([new, old]).headers("msg_abc_completed", int(time.time()), body)
    for secret in (new, old):
        assert Webhook(secret).verify(body, headers) == {"id": "abc", "status": "succeeded"}
    assert headers["webhook-id"] == "msg_abc_completed"


@pytest.mark.parametrize("secret", ["whsec_" + base64.b64encode(b"short").decode(), "whsec_not*base64!",
                                    "whsec_" + base64.b64encode(bytes(65)).decode()])
def test_bad_secrets_are_refused_without_showing_them(secret: str) -> None:
    with pytest.raises(ValueError) as info:
        secret_bytes(secret)
    assert secret not in str(info.value)
    with pytest.raises(ValidationError) as settings_error:
        Settings(webhook_secret=secret)
    assert secret.removeprefix("whsec_") not in str(settings_error.value)
    assert "DDPM_WEBHOOK_SECRET entry 1" in str(settings_error.value)


def test_settings_read_two_secrets_and_the_allow_list() -> None:
    a, b = new_secret(), new_secret()
    settings = Settings(webhook_secret=f"{a}, {b}", webhook_allow_hosts="127.0.0.1, hooks.internal, ::1/128")
    assert [s.get_secret_value() for s in settings.webhook_secret] == [a, b]
    assert a not in repr(settings)
    allow = AllowList.parse(settings.webhook_allow_hosts)
    assert allow.hosts == {"hooks.internal"} and len(allow.networks) == 2
    with pytest.raises(ValidationError, match="neither a host name nor an IP"):
        Settings(webhook_allow_hosts="not a host!")


def test_every_resolved_address_must_be_admitted() -> None:
    target = parse_url("http://name.test:8080/hook?x=1")
    allow = AllowList.parse(["127.0.0.1"])
    assert vet(target, ["127.0.0.1"], allow).connect_url == "http://127.0.0.1:8080/hook?x=1"
    with pytest.raises(WebhookRefused, match=r"name.test resolves to ::1 is a loopback address"):
        vet(target, ["127.0.0.1", "::1"], allow)  # one good answer does not launder a bad one
    with pytest.raises(WebhookRefused, match=r"127\.0\.0\.2 is a loopback"):
        vet(target, ["127.0.0.2"], allow)
    with pytest.raises(WebhookRefused, match=r"127.0.0.1 is a loopback address \(inside ::ffff:"):
        vet(target, ["::ffff:127.0.0.1"], AllowList())
    assert vet(target, ["127.0.0.2"], AllowList.parse(["name.test"])).address == "127.0.0.2"  # a named host
    assert vet(parse_url("https://[::1]/x"), ["::1"], AllowList.parse(["::1"])).host_header == "[::1]"


@pytest.mark.parametrize(("status", "kind"), [(200, "delivered"), (204, "delivered"), (301, "give_up"),
                                              (302, "give_up"), (400, "give_up"), (404, "give_up"),
                                              (410, "give_up"), (408, "retry"), (429, "retry"), (500, "retry"),
                                              (503, "retry")])
def test_outcomes_by_status(status: int, kind: str) -> None:
    assert classify(status, httpx.Headers({"location": "/x"}), b"no").kind == kind


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after("7") == 7.0
    assert retry_after(formatdate(1_000_030, usegmt=True), now=1_000_000) == pytest.approx(30)
    assert retry_after("soon") is None and retry_after(None) is None
    result = classify(503, httpx.Headers({"retry-after": "12"}), b"")
    assert result.kind == "retry" and result.retry_after == 12


def test_backoff_doubles_with_jitter_honours_retry_after_and_ends_with_the_window() -> None:
    policy, rng = RetryPolicy(backoff=2, backoff_max=60, window=300), random.Random(0)
    for attempts, full in ((1, 2), (2, 4), (3, 8), (6, 60), (30, 60)):
        delays = [policy.delay(attempts, rng) for _ in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full and max(delays) - min(delays) > full / 4
    assert policy.next_attempt_at(1, 0.0, 10.0, wait_at_least=45, rng=rng) == 55.0  # Retry-After beats backoff
    assert policy.next_attempt_at(1, 0.0, 299.0, rng=rng) is None  # past the window: give up


def test_ddpm_webhooks_new_secret_prints_a_usable_secret() -> None:
    out = subprocess.run([sys.executable, "-m", "service.cli", "webhooks", "--new-secret"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    assert out.startswith("whsec_") and len(secret_bytes(out)) == 32
    assert Settings(webhook_secret=out).webhook_secret[0].get_secret_value() == out
