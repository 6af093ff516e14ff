"""service.auth at its own level: keys kept as digests, callers and what they may see, and the count of refused
keys (blocking, forgetting, failing open). The HTTP answers are in test_deps.py and test_api.py."""

from __future__ import annotations

import hashlib
import time

import pytest

from service.auth import NOBODY, OPEN, ApiKeys, Caller, RefusedKeys
from service.queue import StoreUnavailable


def test_keys_match_to_their_digest_and_role_and_are_not_kept() -> None:
    keys = ApiKeys(["user-key-0123456789"], ["admin-key-012345678"])
    assert keys.enabled and not ApiKeys([], []).enabled
    assert keys.match("user-key-0123456789") == Caller(hashlib.sha256(b"user-key-0123456789").hexdigest(), False)
    admin = keys.match("admin-key-012345678")
    assert admin is not None and admin.admin
    assert keys.match("user-key-012345678") is None and keys.match("") is None
    assert "user-key" not in repr(vars(keys))


def test_callers_see_their_own_jobs_admins_all() -> None:
    alice, bob, admin = Caller("a" * 64, False), Caller("b" * 64, False), Caller("c" * 64, True)
    assert alice.may_see("a" * 64) and not bob.may_see("a" * 64) and admin.may_see("a" * 64)
    assert not alice.may_see(None) and admin.may_see(None)  # a job made while keys were off: admins only
    assert OPEN.may_see(None) and OPEN.may_see("a" * 64)  # keys off: everything is open
    assert not NOBODY.may_see(None) and not NOBODY.may_see("a" * 64)


class Counts:
    def __init__(self, window_left: int = 30) -> None:
        self.seen: list[str] = []
        self.window_left, self.down = window_left, False

    def count_request(self, client: str, window_seconds: int = 60) -> tuple[int, int]:
        if self.down:
            raise StoreUnavailable("TimeoutError")
        self.seen.append(client)
        return self.seen.count(client), self.window_left


def test_refusals_block_a_client_at_the_budget_until_its_window_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    counts, refused = Counts(window_left=30), RefusedKeys(budget=3)
    for _ in range(2):
        refused.refused(counts, "addr-1.2.3.4")
    assert refused.blocked_for("addr-1.2.3.4") == 0
    refused.refused(counts, "addr-1.2.3.4")
    assert refused.blocked_for("addr-1.2.3.4") == 30 and refused.blocked_for("addr-5.6.7.8") == 0
    assert counts.seen == ["authfail-addr-1.2.3.4"] * 3
    later = time.monotonic() + 31
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert refused.blocked_for("addr-1.2.3.4") == 0  # the window ended: forgotten


def test_refusals_are_not_counted_with_budget_zero_or_while_the_store_is_away() -> None:
    counts = Counts()
    RefusedKeys(budget=0).refused(counts, "addr-1.2.3.4")
    assert counts.seen == []
    counts.down, refused = True, RefusedKeys(budget=1)
    refused.refused(counts, "addr-1.2.3.4")  # fails open: the key is still checked, nobody is blocked
    assert refused.blocked_for("addr-1.2.3.4") == 0
