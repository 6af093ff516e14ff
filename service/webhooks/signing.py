"""Signatures of webhook deliveries, per the Standard Webhooks specification (standardwebhooks.com).

Each delivery carries three headers: ``webhook-id`` (stable per event: retries and re-deliveries repeat it, so
receivers de-duplicate on it), ``webhook-timestamp`` (integer seconds of this attempt; receivers refuse stale
ones) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``, one per secret,
separated by spaces. A secret is written ``whsec_`` + base64 of its key (24 to 64 random bytes). Rotation: list
the new secret and the old one (``DDPM_WEBHOOK_SECRET=whsec_new,whsec_old``); every delivery is signed with
both, so receivers holding either verify it; drop the old one once they all hold the new one.

This module knows HMAC and base64; it does not know HTTP, Redis or jobs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

__all__ = ["PREFIX", "Signer", "new_secret", "secret_bytes"]

PREFIX = "whsec_"
MIN_KEY_BYTES, MAX_KEY_BYTES = 24, 64


def secret_bytes(secret: str, what: str = "the webhook secret") -> bytes:
    """The key of ``whsec_<base64>`` (the prefix is optional); ``ValueError`` naming ``what``, never the value."""
    encoded = secret.strip().removeprefix(PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not whsec_ followed by base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"{what} must hold {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes (it holds {len(key)}); "
                         "make one with `ddpm webhooks --new-secret`")
    return key


def new_secret(nbytes: int = 32) -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode()


class Signer:
    """Signs deliveries with every configured secret (the first is the current one)."""

    def __init__(self, secrets_: Sequence[str]):
        if not secrets_:
            raise ValueError("no webhook secret is configured (DDPM_WEBHOOK_SECRET)")
        self._keys = [secret_bytes(s) for s in secrets_]

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        signed = f"{msg_id}.{timestamp}.".encode() + body
        return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
                        for key in self._keys)

    def headers(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
                "webhook-signature": self.signature(msg_id, timestamp, body)}
