"""Redis clients from ``DDPM_REDIS_URL``: a plain Redis, or the current primary behind Redis Sentinel.

Accepted URLs:

    redis://[[user]:password@]host[:port][/db]        rediss://... (TLS)        unix:///path/redis.sock?db=0
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]
    rediss+sentinel://...                              (TLS to the Sentinels and to Redis)

A Sentinel URL lists the Sentinels (port 26379 when omitted) and names the monitored service (``mymaster`` in
Redis' examples). The client asks the Sentinels for the current primary when it opens a connection and again after
a connection fails, so after a failover it reaches the promoted replica by itself; a command that was in flight
when the primary died fails (the caller sees ``redis.ConnectionError``) and the next one goes to the new primary.
The password (and user), when given, are used for both the Sentinels and Redis.

This module only builds clients: ``service.queue.connect`` is the one caller; it knows nothing about jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
from redis.sentinel import Sentinel

__all__ = ["SentinelURL", "client_from_url", "is_sentinel_url", "parse_sentinel_url"]

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def _host_port(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"{_redact(url)}: a Sentinel address has no host")
    if port and not port.isdigit():
        raise ValueError(f"{_redact(url)}: Sentinel port {port!r} is not a number")
    return host, int(port) if port else DEFAULT_SENTINEL_PORT


def _redact(url: str) -> str:
    scheme, _, rest = url.partition("://")
    _userinfo, at, hosts = rest.rpartition("@")
    return f"{scheme}://{'***@' if at else ''}{hosts}"


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` -> its parts.
    Raises ``ValueError`` naming what is wrong (the password is never echoed)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"{_redact(url)}: not a Sentinel URL (redis+sentinel:// or rediss+sentinel://)")
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    sentinels = tuple(_host_port(h.strip(), url) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ValueError(f"{_redact(url)}: no Sentinel host:port given")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"{_redact(url)}: the path must be /SERVICE_NAME or /SERVICE_NAME/DB")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"{_redact(url)}: database {parts[1]!r} is not a number")
    return SentinelURL(sentinels, unquote(parts[0]), int(parts[1]) if len(parts) == 2 else 0, username, password,
                       SENTINEL_SCHEMES[scheme.lower()])


def client_from_url(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url``; ``kwargs`` (timeouts, retries...) apply to Redis connections, and for a Sentinel URL
    its ``socket_*`` options also to the Sentinels."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel_url(url)
    auth = {"username": parsed.username, "password": parsed.password, "ssl": parsed.ssl}
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")} | auth
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(parsed.service_name, db=parsed.db, **auth, **kwargs)
