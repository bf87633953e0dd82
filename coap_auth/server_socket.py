"""Server sockets bound as aiocoap's udp6 transport binds them, but shared with other
processes only when asked, and failing with one line that names address:port and why.

aiocoap sets SO_REUSEPORT on every server socket (udp6.py `create_server_transport_endpoint`;
AIOCOAP_REUSE_PORT can force it): a second server on a port in use then joins the first, and
the kernel splits the traffic between them. Without SO_REUSEPORT (and without SO_REUSEADDR)
Linux refuses any other bind of the port, whether or not the newcomer asks for SO_REUSEPORT;
with it, only sockets of the same effective user that also set it may join.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncGenerator, Callable
from typing import Any

from coap_auth.addresses import authority

__all__ = ["BindError", "Resolver", "bind_server_socket"]

# (host, port) -> the socket addresses it may be bound as, best first: coap_auth.udp passes
# aiocoap's own resolution (IPv6, IPv4 mapped), so that nothing here imports aiocoap.
Resolver = Callable[[str, int], AsyncGenerator[Any, None]]

# Why a server socket could not be bound, as an operator reads it.
BIND_FAILURES = {
    errno.EADDRINUSE: "another process is serving that port",
    errno.EADDRNOTAVAIL: "that address is not one of this host's",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# Below it, binding needs root or CAP_NET_BIND_SERVICE (unless the sysctl
# net.ipv4.ip_unprivileged_port_start says otherwise).
PRIVILEGED_PORTS = 1024


class BindError(OSError):
    """A server socket that could not be opened. Its text (`strerror`, and str()) is one line
    naming the address and port and why, e.g. "cannot serve on [::]:5683: another process is
    serving that port"."""

    def __str__(self) -> str:
        return str(self.strerror)


async def bind_server_socket(
    bind: tuple[str, int], log: logging.Logger, resolve: Resolver, *, reuse_port: bool = False
) -> socket.socket:
    """A UDP socket bound to `bind` as aiocoap's udp6 server binds it (the first address
    `resolve` gives, IPv6 with IPv4 mapped), with SO_REUSEPORT only if `reuse_port`.
    Raises BindError."""
    host, port = bind
    where = authority(host, port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        # getaddrinfo would take 99999 for 34463 (modulo 65536), and 65536 for 0.
        raise BindError(errno.EINVAL, f"cannot serve on {where}: the port must be 0 to 65535")
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise BindError(errno.ENOPROTOOPT, "this system cannot share a port between processes")
    sockaddr = await _first_address(resolve, host, port, where, log)
    sock = socket.socket(family=socket.AF_INET6, type=socket.SOCK_DGRAM)
    try:
        # Never SO_REUSEADDR either: on UDP it lets two sockets with it share a port, for any
        # user.
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        reason = BIND_FAILURES.get(exc.errno or 0, exc.strerror or str(exc))
        if exc.errno in (errno.EACCES, errno.EPERM) and 0 < port < PRIVILEGED_PORTS:
            reason += f" (a port below {PRIVILEGED_PORTS} needs root or CAP_NET_BIND_SERVICE)"
        raise BindError(exc.errno, f"cannot serve on {where}: {reason}") from None
    return sock


async def _first_address(
    resolve: Resolver, host: str, port: int, where: str, log: logging.Logger
) -> Any:
    """The socket address aiocoap's udp6 server would bind for `host`; raises BindError."""
    addresses = resolve(host, port)
    try:
        sockaddr = await addresses.__anext__()
    except socket.gaierror as exc:
        raise BindError(
            errno.EADDRNOTAVAIL,
            f"cannot serve on {where}: the address does not resolve ({exc.strerror or exc})",
        ) from None
    except StopAsyncIteration:
        raise BindError(
            errno.EADDRNOTAVAIL, f"cannot serve on {where}: the address resolves to nothing usable"
        ) from None
    try:
        additional = await addresses.__anext__()
    except (StopAsyncIteration, OSError):
        pass
    else:
        # The one kept, and the first one left out (aiocoap's udp6 does the same).
        log.warning(
            "%s resolves to several addresses: serving on %s only, not on %s",
            host,
            sockaddr[0],
            additional[0],
        )
    finally:
        await addresses.aclose()
    return sockaddr
