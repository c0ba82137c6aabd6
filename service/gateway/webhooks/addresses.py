"""Which webhook URLs the gateway may call: none that resolve into its own network (request forgery).

A URL is refused when its host resolves to any address that is not globally reachable: loopback,
private (RFC 1918, unique local), link-local (cloud metadata services live at 169.254.169.254), shared,
reserved, multicast or unspecified. An IPv4-mapped IPv6 address counts as its IPv4 address. The check
runs at submit and again before every delivery attempt (DNS can change in between), and an attempt
connects to the address it checked rather than resolving once more. ``webhook_allow_private`` lifts the
refusal, for a receiver on the same host or network (and the tests).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import httpx

DEFAULT_PORTS = {"http": 80, "https": 443}


class WebhookRefused(ValueError):
    """The URL is not one the gateway may call; the message says why."""


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is link-local anyway
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _checked(host: str, infos: list[tuple[Any, ...]], *, allow_private: bool) -> list[str]:
    """The addresses of ``getaddrinfo``'s answer, unless one is forbidden."""
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise WebhookRefused(f"the webhook host {host} has no address")
    forbidden = [address for address in addresses if _forbidden(address)]
    if forbidden and not allow_private:
        shown = host if forbidden[0] == host else f"{host} ({forbidden[0]})"
        raise WebhookRefused(
            f"the webhook URL points at {shown}, a loopback, private or link-local address; webhooks go "
            "to public addresses only (the server's UNIVIGU_WEBHOOK_ALLOW_PRIVATE allows others)"
        )
    return addresses


def _host_and_port(url: httpx.URL) -> tuple[str, int]:
    if url.scheme not in DEFAULT_PORTS or not url.host:
        raise WebhookRefused(f"a webhook must be an http or https URL with a host, got {url}")
    return url.raw_host.decode("ascii"), url.port or DEFAULT_PORTS[url.scheme]


def _unresolved(host: str, error: socket.gaierror) -> WebhookRefused:
    return WebhookRefused(f"the webhook host {host} does not resolve ({error.strerror})")


def resolve(url: httpx.URL, *, allow_private: bool) -> list[str]:
    """The addresses of ``url``'s host, or :class:`WebhookRefused`. Blocks on DNS (run it in a thread)."""
    host, port = _host_and_port(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _unresolved(host, exc) from exc
    return _checked(host, infos, allow_private=allow_private)


async def resolve_async(url: httpx.URL, *, allow_private: bool) -> list[str]:
    """:func:`resolve` without blocking the event loop."""
    host, port = _host_and_port(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _unresolved(host, exc) from exc
    return _checked(host, infos, allow_private=allow_private)
