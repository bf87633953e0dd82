"""Source addresses as the unit of per-sender budgets, for the service and for devices.

Pure: the standard library only."""

from __future__ import annotations

import functools
import ipaddress

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix


def authority(host: str, port: int) -> str:
    """`host:port` as a URI's authority has it (RFC 3986 §3.2.2) and as messages name an
    endpoint: an IPv6 literal in brackets (one already in brackets is kept)."""
    literal = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{literal}:{port}"


@functools.lru_cache(maxsize=65_536)  # parsing an address is ~10 µs; hosts repeat
def address_key(host: str) -> str:
    """The rate-limit key of a source address: an IPv4 address whole (also when it reaches an
    IPv6 socket IPv4-mapped), an IPv6 address by its /64. One subnet is a /64 (RFC 4291
    §2.5.4) and an end site gets at least one (RFC 6177), so counting each /128 would hand a
    single attacker 2^64 budgets."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address in _NAT64:
            # RFC 6052: IPv4 peers behind a NAT64 share its /96; the last 32 bits are theirs.
            return str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        subnet = str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
        if address.is_link_local and address.scope_id:
            # fe80::/64 is on every link: the interface tells the subnets apart.
            return f"{subnet}%{address.scope_id}"
        return subnet
    return str(address)


def network_list(text: str) -> tuple[str, ...]:
    """The CIDR prefixes of a comma-separated list ("" for none), as given: the
    `verified_networks` setting of the AS and of device_client's resource server. Raises
    ValueError for one that is not an IP network."""
    prefixes = tuple(p.strip() for p in text.split(",") if p.strip())
    for prefix in prefixes:
        ipaddress.ip_network(prefix, strict=False)
    return prefixes
