"""The webhook outbox in Redis: a job's subscription, its deliveries and their schedule.

=====================================  =================================================================
``ddpm:webhook:{job}``                 hash: ``url``, ``events`` (JSON list), ``cursor`` (the last id of the
                                       job's event stream already looked at), ``frame_at`` (when the last
                                       ``frame`` delivery was queued), ``seq``, and one ``d:{name}`` per
                                       delivery (JSON: id, event, seq, status, attempts, last_error,
                                       response_status, first_attempt_at, delivered_at); expires with the job
``ddpm:webhooks:follow``               sorted set: job id -> when its event stream is next read
``ddpm:webhooks:due``                  sorted set: ``{job}/{name}`` -> when its next attempt is due (while an
                                       attempt is in flight: when that attempt's lease ends)
=====================================  =================================================================

The job's own event stream (``service.queue``: ``running``, ``frame``, and the terminal event, each written in
the same transaction as the state it reports) is the source of truth: a *follower* reads it from ``cursor`` and
turns ``running`` into the ``start`` delivery, ``frame`` into ``frame_{index}`` (throttled) and the terminal
event into ``completed``. Each delivery is created once (``HSETNX``-like, in a script), so reading an event twice
(a follower that died, or two of them) never makes two deliveries, and a process that dies anywhere loses none:
the stream is re-read from the cursor, a claimed attempt whose process died comes due again when its lease ends.
Delivery names are stable, and so is the ``webhook-id`` made from them (``msg_{job}_{name}``).

Scripts keep each step atomic: claiming due entries (re-scoring them by a lease), starting an attempt (counting
it) and finishing it (delivered, failed, or pending with its next time; never undoing ``delivered``).
Redis errors surface as ``service.queue.StoreUnavailable``. This module knows Redis; it does not know HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from redis import Redis

from service.queue import TERMINAL_STATES, Event, StoreUnavailable

__all__ = ["DELIVERY_STATES", "EVENTS", "Outbox", "deliveries_for", "message_id", "webhook_view"]

EVENTS = ("start", "frame", "completed")
DELIVERY_STATES = ("pending", "delivered", "failed")
FOLLOW_KEY, DUE_KEY = "ddpm:webhooks:follow", "ddpm:webhooks:due"

# KEYS: a sorted set. ARGV: now, lease, limit. The members due by now, each re-scored to now + lease.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], string.format('%.6f', until_), m) end
return due
"""

# KEYS: hook, due, follow. ARGV: job, cursor, now, frame interval, done (0|1), then name, event pairs.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[3], ARGV[1]) return 0 end
local want = {}
for _, e in ipairs(cjson.decode(redis.call('HGET', KEYS[1], 'events'))) do want[e] = true end
local now, added = tonumber(ARGV[3]), 0
for i = 6, #ARGV, 2 do
  local name, event = ARGV[i], ARGV[i + 1]
  if want[event] and redis.call('HEXISTS', KEYS[1], 'd:' .. name) == 0 then
    local take = true
    if event == 'frame' then
      take = now - tonumber(redis.call('HGET', KEYS[1], 'frame_at') or '0') >= tonumber(ARGV[4])
      if take then redis.call('HSET', KEYS[1], 'frame_at', ARGV[3]) end
    end
    if take then
      local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
      redis.call('HSET', KEYS[1], 'd:' .. name, cjson.encode({id = 'msg_' .. ARGV[1] .. '_' .. name, event = event,
                                                             seq = seq, status = 'pending', attempts = 0}))
      redis.call('ZADD', KEYS[2], string.format('%.6f', now + seq * 0.001), ARGV[1] .. '/' .. name)  -- in order
      added = added + 1
    end
  end
end
redis.call('HSET', KEYS[1], 'cursor', ARGV[2])
if ARGV[5] == '1' then redis.call('ZREM', KEYS[3], ARGV[1]) end
return added
"""

# KEYS: hook, due. ARGV: member, name, now. Counts the attempt; {url, delivery} or nil when there is none to make.
_START = """
local raw = redis.call('HGET', KEYS[1], 'd:' .. ARGV[2])
local url = redis.call('HGET', KEYS[1], 'url')
if not raw or not url then redis.call('ZREM', KEYS[2], ARGV[1]) return false end
local d = cjson.decode(raw)
if d.status ~= 'pending' then redis.call('ZREM', KEYS[2], ARGV[1]) return false end
d.attempts = d.attempts + 1
if not d.first_attempt_at then d.first_attempt_at = tonumber(ARGV[3]) end
raw = cjson.encode(d)
redis.call('HSET', KEYS[1], 'd:' .. ARGV[2], raw)
return {url, raw}
"""

# KEYS: hook, due. ARGV: member, name, status, last_error, response_status, next_at ('' = none), now.
_FINISH = """
local raw = redis.call('HGET', KEYS[1], 'd:' .. ARGV[2])
if not raw then redis.call('ZREM', KEYS[2], ARGV[1]) return 0 end
local d = cjson.decode(raw)
if d.status == 'delivered' then redis.call('ZREM', KEYS[2], ARGV[1]) return 0 end
d.status = ARGV[3]
if ARGV[4] ~= '' then d.last_error = ARGV[4] end
if ARGV[5] ~= '' then d.response_status = tonumber(ARGV[5]) end
if ARGV[3] == 'delivered' then d.delivered_at = tonumber(ARGV[7]) end
redis.call('HSET', KEYS[1], 'd:' .. ARGV[2], cjson.encode(d))
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1]) else redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
"""


def _hook(job_id: str) -> str:
    return f"ddpm:webhook:{job_id}"


def message_id(job_id: str, name: str) -> str:
    """The ``webhook-id`` of delivery ``name`` (``start``, ``frame_{index}``, ``completed``) of a job."""
    return f"msg_{job_id}_{name}"


def deliveries_for(events: Sequence[Event]) -> tuple[list[tuple[str, str]], bool]:
    """The (delivery name, webhook event) pairs a job's stream events call for, and whether the job ended."""
    found: list[tuple[str, str]] = []
    done = False
    for ev in events:
        if ev.event == "running":
            found.append(("start", "start"))
        elif ev.event == "frame":
            found.append((f"frame_{int(ev.data.get('index', 0))}", "frame"))
        elif ev.event in TERMINAL_STATES:
            found.append(("completed", "completed"))
            done = True
    return found, done


@contextmanager
def _translate_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(str(exc)) from exc


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def webhook_view(client: Any, job_id: str) -> dict[str, Any] | None:
    """A job's ``{url, events, deliveries: [...]}`` (deliveries in the order they were created); None without a
    webhook. One read."""
    with _translate_errors():
        raw = client.hgetall(_hook(job_id))
    if not raw:
        return None
    fields = {_s(k): _s(v) for k, v in raw.items()}
    deliveries = sorted((json.loads(v) for k, v in fields.items() if k.startswith("d:")),
                        key=lambda d: int(d.get("seq", 0)))
    return {"url": fields.get("url", ""), "events": json.loads(fields.get("events") or "[]"),
            "deliveries": [{"id": d["id"], "event": d["event"], "status": d["status"],
                            "attempts": int(d.get("attempts", 0)), "last_error": d.get("last_error"),
                            "response_status": d.get("response_status")} for d in deliveries]}


class Outbox:
    """Subscriptions (API side: ``subscribe``, ``discard``, ``view``) and the delivery schedule (dispatcher side:
    ``to_follow``, ``cursors``, ``record``, ``claim``, ``start_attempt``, ``finish``)."""

    def __init__(self, client: Redis):
        self.redis: Any = client
        self._claim = self.redis.register_script(_CLAIM)
        self._record = self.redis.register_script(_RECORD)
        self._start = self.redis.register_script(_START)
        self._finish = self.redis.register_script(_FINISH)

    # ---- API side ------------------------------------------------------------------------------------------
    def subscribe(self, job_id: str, url: str, events: Sequence[str], ttl: int, now: float) -> None:
        """Deliver ``events`` of job ``job_id`` to ``url`` (written before the job is queued)."""
        with _translate_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(_hook(job_id), mapping={"url": url, "events": json.dumps(list(events)), "cursor": "0",
                                              "seq": 0, "frame_at": 0})
            pipe.expire(_hook(job_id), ttl)
            pipe.zadd(FOLLOW_KEY, {job_id: now})
            pipe.execute()

    def discard(self, job_id: str) -> None:
        """Forget a subscription whose job was never created (e.g. the queue was full)."""
        with _translate_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(_hook(job_id))
            pipe.zrem(FOLLOW_KEY, job_id)
            pipe.execute()

    def view(self, job_id: str) -> dict[str, Any] | None:
        return webhook_view(self.redis, job_id)

    # ---- dispatcher side -----------------------------------------------------------------------------------
    def to_follow(self, now: float, lease: float, limit: int) -> list[str]:
        """Job ids whose event streams are due to be read (each leased to the caller for ``lease`` seconds)."""
        with _translate_errors():
            return [_s(m) for m in self._claim(keys=[FOLLOW_KEY], args=[now, lease, limit])]

    def cursors(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The stream cursor of each job that still has a subscription; the others are no longer followed."""
        with _translate_errors():
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(_hook(job_id), "cursor")
            replies = pipe.execute()
            gone = [j for j, c in zip(job_ids, replies, strict=True) if c is None]
            if gone:
                self.redis.zrem(FOLLOW_KEY, *gone)
        return {j: _s(c) for j, c in zip(job_ids, replies, strict=True) if c is not None}

    def record(self, job_id: str, cursor: str, found: Sequence[tuple[str, str]], done: bool,
               frame_interval: float, now: float) -> int:
        """Create the deliveries ``found`` calls for (those the filter wants, each once; frames throttled), due
        now; move the cursor; stop following a job that ended. Returns how many were created."""
        args: list[Any] = [job_id, cursor, now, frame_interval, int(done)]
        for name, event in found:
            args += [name, event]
        with _translate_errors():
            return int(self._record(keys=[_hook(job_id), DUE_KEY, FOLLOW_KEY], args=args))

    def claim(self, now: float, lease: float, limit: int) -> list[str]:
        """Up to ``limit`` due deliveries (``{job}/{name}``) in the order they came due (a job's in the order they
        were created), leased to the caller for ``lease`` seconds."""
        with _translate_errors():
            return [_s(m) for m in self._claim(keys=[DUE_KEY], args=[now, lease, limit])]

    def start_attempt(self, member: str, now: float) -> tuple[str, dict[str, Any]] | None:
        """Count an attempt of a claimed delivery: (url, delivery), or None when there is nothing to deliver
        (subscription expired, or the delivery already ended)."""
        job_id, name = member.split("/", 1)
        with _translate_errors():
            reply = self._start(keys=[_hook(job_id), DUE_KEY], args=[member, name, now])
        if not reply:
            return None
        return _s(reply[0]), json.loads(reply[1])

    def finish(self, member: str, status: str, *, error: str | None, response_status: int | None,
               next_at: float | None, now: float) -> None:
        """Record an attempt's outcome: ``delivered``, ``failed`` (given up) or ``pending`` (due at ``next_at``)."""
        job_id, name = member.split("/", 1)
        args = [member, name, status, error or "", "" if response_status is None else response_status,
                "" if next_at is None else next_at, now]
        with _translate_errors():
            self._finish(keys=[_hook(job_id), DUE_KEY], args=args)

    def pending(self) -> int:
        """Deliveries waiting for an attempt or in flight, across all jobs."""
        with _translate_errors():
            return int(self.redis.zcard(DUE_KEY))
