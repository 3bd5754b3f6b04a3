"""What a run's namespace grants beyond its schemes: the `uds` scope and the network.

`--uds-scope` puts a private or named scope of the uds scheme in place of the
system's; the `--allow-*` options put, in place of tcp and udp, grants of
exactly the peers and ports they name (any one of them narrows both: the
scheme no option names gets a grant of nothing).
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import rt
from redoxcap.exits import EXIT_FAILED, EXIT_USAGE, Failure


@dataclass(frozen=True)
class NetGrant:
    """What one network scheme of a run reaches: the `--allow-*` options for it.

    Attributes:
        connect: (host, port) peers.
        listen: ports (on loopback) or (host, port) endpoints to listen on or bind to.
        options: the options that asked for it, for messages.
    """

    connect: tuple[tuple[str, int], ...] = ()
    listen: tuple[int | tuple[str, int], ...] = ()
    options: tuple[str, ...] = ()


def parse_net_address(option: str, text: str, *, listen: bool) -> int | tuple[str, int]:
    """`HOST:PORT`, `[IPV6]:PORT` or (listen) a bare `PORT` -> (host, port) or port.

    HOST is a numeric address (nothing is resolved), written back in the
    canonical form the schemes take; PORT is 1-65535 (listen: 0 picks one).

    Raises:
        Failure: EXIT_USAGE, naming option and text.
    """
    def bad(why: str) -> Failure:
        return Failure(f"{option} {text}: {why}", EXIT_USAGE)

    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise bad("expected [IPV6]:PORT")
        port_text = rest[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise bad("write an IPv6 address in brackets: [ADDR]:PORT")
    elif listen:
        host, port_text = None, text
    else:
        raise bad("expected HOST:PORT")
    if not (port_text.isascii() and port_text.isdigit()) or not (0 if listen else 1) <= int(port_text) <= 65535:
        raise bad(f"PORT is a number {0 if listen else 1}-65535")
    port = int(port_text)
    if host is None:
        return port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise bad("HOST is a numeric IPv4 or IPv6 address (names are not resolved)") from None
    if getattr(ip, "scope_id", None) is not None:
        raise bad("an address with a zone id (%...) is not allowed")
    if text.startswith("[") and ip.version != 6:
        raise bad("brackets are for IPv6 addresses")
    return (str(ip), port)


def net_grants(tcp_connect: Sequence[str] = (), tcp_listen: Sequence[str] = (),
               udp_connect: Sequence[str] = (), udp_listen: Sequence[str] = ()) -> dict[str, NetGrant] | None:
    """The grants the `--allow-*` options of `run` ask for.

    Any of them narrows both tcp and udp: the scheme no option names gets a
    grant of nothing, so that a program granted one port reaches no other
    way out.

    Returns:
        None without any option (the run gets the whole schemes), else a
        NetGrant for tcp and one for udp.

    Raises:
        Failure: EXIT_USAGE for a malformed address.
    """
    if not (tcp_connect or tcp_listen or udp_connect or udp_listen):
        return None
    grants = {}
    for scheme, connect, listen, prefix in [("tcp", tcp_connect, tcp_listen, "--allow-"),
                                            ("udp", udp_connect, udp_listen, "--allow-udp-")]:
        grants[scheme] = NetGrant(
            connect=tuple(parse_net_address(f"{prefix}connect", t, listen=False) for t in connect),
            listen=tuple(parse_net_address(f"{prefix}listen", t, listen=True) for t in listen),
            options=(f"{prefix}connect",) * bool(connect) + (f"{prefix}listen",) * bool(listen))
    return grants


def entries_for(choice: str, grants: dict[str, NetGrant] | None, names: set[str]) -> dict[str, int]:
    """The capabilities a run's namespace holds in place of the system's entries, made on
    rt's namespace (the root one), for `rt.mkns(put=...)`: `uds` the scope --uds-scope
    chose ("private" a new empty scope, NAME the shared scope NAME; nothing for
    "system"), and tcp and udp grants of what --allow-* named (grants; None: the system's
    schemes themselves). A name the fork does not hold (names: what it holds, by `--ns`)
    gets nothing, unless an option names it: that is an error. The caller closes them.

    Raises:
        Failure: EXIT_USAGE for a bad NAME, an option naming a scheme the namespace lacks
            or an address the daemon's policy refuses; EXIT_FAILED when a scheme refused
            otherwise.
    """
    made: dict[str, int] = {}
    try:
        if choice != "system" and "uds" in names:
            try:
                made["uds"] = rt.uds_scope(None if choice == "private" else choice)
            except OSError as exc:
                usage = exc.errno == errno.EINVAL  # a bad NAME
                raise Failure(f"--uds-scope {choice}: {exc.strerror}",
                              EXIT_USAGE if usage else EXIT_FAILED) from None
        for scheme, grant in (grants or {}).items():
            what = "/".join(grant.options) or f"--allow-* (nothing of {scheme})"
            if scheme not in names:
                if grant.options:
                    raise Failure(f"{what}: the namespace has no {scheme} (see --ns)", EXIT_USAGE)
                continue
            try:
                made[scheme] = rt.net_grant(grant.connect, grant.listen, scheme=scheme)
            except OSError as exc:
                usage = exc.errno in (errno.EINVAL, errno.EACCES)  # an address, or beyond the policy
                raise Failure(f"{what}: {exc.strerror}", EXIT_USAGE if usage else EXIT_FAILED) from None
    except BaseException:
        for cap in made.values():
            rt.close(cap)
        raise
    return made


