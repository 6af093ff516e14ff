"""Where a webhook may go: URL syntax, and the address check against server-side request forgery (SSRF).

A webhook URL is checked twice: when the job is submitted (the API answers 422 naming ``webhook``) and before
every delivery attempt (a refused URL is given up, never retried), because what a name resolves to can change.
Every address the host resolves to must be admitted, and the delivery then connects to the address that was
checked (``Target.address``), so a second, different DNS answer cannot slip past the check (DNS rebinding).

An address is refused unless it is globally routable: loopback, private, link-local (cloud metadata services
live at 169.254.169.254 and fd00:ec2::254), carrier-grade NAT, multicast, reserved and unspecified (0.0.0.0)
addresses, and IPv6 forms that embed such an IPv4 address (``::ffff:127.0.0.1``, 6to4, Teredo). The operator's
allow-list (``DDPM_WEBHOOK_ALLOW_HOSTS``) admits named hosts (the URL's host, exactly) and CIDRs (the resolved
addresses) anyway; it is empty by default.

This module knows URLs and IP addresses; it does not know HTTP clients, Redis or jobs.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

__all__ = ["MAX_URL_LENGTH", "AllowList", "Target", "WebhookRefused", "check", "parse_url", "refusal", "resolve", "vet"]

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_SECONDS = 3.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")


class WebhookRefused(ValueError):
    """A webhook URL that may not be used; the message says why, for the person who gave it."""


@dataclass(frozen=True)
class AllowList:
    """Hosts (matched against the URL's host, case-insensitively) and networks (matched against the resolved
    addresses) that are admitted even though they are not globally routable."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """``["hooks.internal", "127.0.0.1", "10.1.0.0/16", "::1"]``; raises ``ValueError`` naming a bad entry."""
        hosts, networks = set(), []
        for raw in entries:
            entry = raw.strip().lower()
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            labels = entry.rstrip(".").split(".")
            if not entry or not all(lab and len(lab) <= 63 and lab.replace("-", "").isalnum() for lab in labels):
                raise ValueError(f"webhook allow-list entry {raw!r} is neither a host name nor an IP address or CIDR")
            hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def admits_address(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)


@dataclass(frozen=True)
class Target:
    """A checked webhook URL: where to connect (``address``, once vetted) and what to ask for there."""

    url: str
    scheme: str
    host: str  # lower case, no brackets
    port: int
    path: str  # path and query, at least "/"
    address: str | None = None

    @property
    def connect_url(self) -> str:
        """The URL with the vetted address in place of the host (the Host header and TLS name stay ``host``)."""
        assert self.address is not None, "vet() the target first"
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{addr}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}[self.scheme]
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """Syntax only: an absolute http(s) URL with a host, no user name or password, no fragment."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url) or not url.isascii():
        raise WebhookRefused("the URL may hold only printable ASCII, no spaces (percent-encode the rest)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused(f"the scheme must be http or https (got {parts.scheme or 'none'!r})")
    if not parts.hostname:
        raise WebhookRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("the URL may not hold a user name or password")
    if parts.fragment:
        raise WebhookRefused("the URL may not hold a fragment (#...)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, parts.scheme, parts.hostname.lower(), port or {"http": 80, "https": 443}[parts.scheme], path)


def _embedded_v4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
    return None


def refusal(address: IPAddress) -> str | None:
    """Why ``address`` may not be reached without the allow-list's word, or None when it is public."""
    inner = _embedded_v4(address)
    if inner is not None and (why := refusal(inner)):
        return f"{why} (inside {address})"
    for test, what in ((address.is_loopback, "loopback"), (address.is_unspecified, "unspecified (this host)"),
                       (address.is_link_local, "link-local (cloud metadata lives here)"),
                       (address.is_multicast, "multicast"), (address.is_private, "private"),
                       (address.is_reserved, "reserved")):
        if test:
            return f"{address} is a {what} address"
    if not address.is_global:
        return f"{address} is not a globally routable address"
    return None


def vet(target: Target, addresses: Sequence[str], allow: AllowList) -> Target:
    """``target`` with the address to connect to, when every resolved address is admitted; else
    ``WebhookRefused`` naming the first refused address."""
    if not addresses:
        raise WebhookRefused(f"{target.host} resolves to no address")
    if target.host in allow.hosts:
        return replace(target, address=addresses[0])
    for raw in addresses:
        address = ipaddress.ip_address(raw.split("%", 1)[0])  # drop an IPv6 zone id
        why = refusal(address)
        if why and not allow.admits_address(address):
            name = "" if target.host == str(address) else f"{target.host} resolves to "
            raise WebhookRefused(f"{name}{why}; the server's DDPM_WEBHOOK_ALLOW_HOSTS does not admit it")
    return replace(target, address=addresses[0])


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def resolve(target: Target, timeout: float = RESOLVE_TIMEOUT_SECONDS) -> list[str]:
    """Every address ``target.host`` resolves to (blocking, at most ``timeout`` seconds). A name that does not
    resolve is an ``OSError`` (the caller decides whether that is final)."""
    literal = _literal(target.host)
    if literal is not None:
        return [literal]
    future = _resolver.submit(socket.getaddrinfo, target.host, target.port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout)
    except FutureTimeout:
        raise OSError(f"resolving {target.host} took longer than {timeout:.0f} s") from None
    except UnicodeError:
        raise OSError(f"{target.host} is not a valid host name") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check(url: str, allow: AllowList, timeout: float = RESOLVE_TIMEOUT_SECONDS) -> Target:
    """``parse_url``, ``resolve`` and ``vet`` in one: a ``WebhookRefused`` for anything that stops delivery."""
    target = parse_url(url)
    try:
        addresses = resolve(target, timeout)
    except OSError as exc:
        raise WebhookRefused(f"{target.host} does not resolve ({exc})") from None
    return vet(target, addresses, allow)
