"""Network helpers for tests of network clients and of `--allow-connect`/`--allow-listen`."""

from __future__ import annotations

import errno
import socket


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port of host (IPv4 or IPv6) that nothing of kind uses right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]

def nobody_listens(port: int) -> bool:
    """Whether a plain TCP connect to 127.0.0.1:port is refused."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
