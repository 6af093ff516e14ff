"""API keys: the configured keys kept as digests, whom a request acts for, and the count of refused keys.

    ApiKeys       DDPM_API_KEYS and DDPM_ADMIN_API_KEYS as SHA-256 digests only; ``match`` compares in constant time
    Caller        whom a request acts for: its key's digest (the owner recorded on its jobs) and whether it is admin
    RefusedKeys   401/403 answers per client and minute, counted in the job store; blocks a client at its budget

The FastAPI dependencies that use these (``require_key``, ``caller``) are ``service.deps``'; this module knows
no HTTP and reaches the store only through ``count_request``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Protocol

from service.queue import StoreUnavailable

__all__ = ["NOBODY", "OPEN", "ApiKeys", "Caller", "RefusedKeys", "RequestCounter"]


@dataclass(frozen=True)
class Caller:
    """Whom a request acts for: ``key`` is its API key's SHA-256 digest (hex; None while keys are off), the
    owner recorded on the jobs it submits; ``admin`` sees every job."""

    key: str | None
    admin: bool

    def may_see(self, owner: str | None) -> bool:
        """A job is seen by the key that created it and by admin keys (every caller while keys are off)."""
        return self.admin or (owner is not None and owner == self.key)


OPEN = Caller(key=None, admin=True)  # keys are off: everything is open
NOBODY = Caller(key=None, admin=False)  # keys are on and none was checked: sees no job


class ApiKeys:
    """The configured API keys (``DDPM_API_KEYS``) and admin keys (``DDPM_ADMIN_API_KEYS``), kept as SHA-256
    digests only."""

    def __init__(self, keys: list[str], admin_keys: list[str]):
        self._digests = [(hashlib.sha256(k.encode()).digest(), False) for k in keys]
        self._digests += [(hashlib.sha256(k.encode()).digest(), True) for k in admin_keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def match(self, given: str) -> Caller | None:
        """The caller for key ``given``, or None. Compares against every key (``hmac.compare_digest``, no early
        exit): the time taken does not depend on which key matched."""
        digest = hashlib.sha256(given.encode()).digest()
        found: Caller | None = None
        for known, admin in self._digests:
            if hmac.compare_digest(digest, known) and found is None:
                found = Caller(key=digest.hex(), admin=admin)
        return found


class RequestCounter(Protocol):
    """What ``RefusedKeys`` needs of the job store (``service.queue.JobStore.count_request``)."""

    def count_request(self, client: str, window_seconds: int = 60) -> tuple[int, int]: ...


class RefusedKeys:
    """Requests refused for a missing or wrong key (401/403), per client address and one-minute window: counted
    in Redis (shared by every API replica); an address that reaches ``budget`` in a window is remembered in this
    process as blocked until the window ends. So accepted keys cost no extra Redis round-trip, and across N
    replicas an address gets at most ``budget + N - 1`` answers per minute that tell a right key from a wrong one.
    Counting fails open while Redis is unreachable (the key is still checked). ``budget`` 0: nothing is counted."""

    def __init__(self, budget: int):
        self.budget = budget
        self._blocked: dict[str, float] = {}  # client id -> monotonic end of its blocked window

    def blocked_for(self, who: str) -> int:
        """Seconds ``who`` stays blocked (0: not blocked)."""
        until = self._blocked.get(who)
        if until is None:
            return 0
        left = until - time.monotonic()
        if left <= 0:
            del self._blocked[who]
            return 0
        return max(1, round(left))

    def refused(self, store: RequestCounter, who: str) -> None:
        """Count one refusal of ``who``; block it when it reaches the budget."""
        if self.budget <= 0:
            return
        try:
            count, left = store.count_request("authfail-" + who)
        except StoreUnavailable:
            return
        if count >= self.budget:
            now = time.monotonic()
            self._blocked = {w: t for w, t in self._blocked.items() if t > now}  # forget finished windows
            self._blocked[who] = now + left
