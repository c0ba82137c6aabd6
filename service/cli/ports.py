"""Ports `univigu up` is about to give its children, checked first so that a taken one is one clear line
instead of a child's traceback (or a crash loop)."""

from __future__ import annotations

import socket


class PortUnavailable(RuntimeError):
    pass


def check_port(host: str, port: int, *, what: str, setting: str, flag: str) -> None:
    """PortUnavailable naming the setting and the flag when ``port`` cannot be bound on ``host``.

    Binds the way uvicorn and prometheus_client's server do (SO_REUSEADDR), so a port that only has
    connections closing in TIME_WAIT counts as free, as it is for them."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortUnavailable(
                f"{what} port {port} on {host} is unavailable ({exc.strerror}): choose another with "
                f"`univigu up {flag} PORT` ({setting})"
            ) from None
