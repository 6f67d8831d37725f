"""This host's IPv4 interfaces, as discovery and the doctor see them (ifaddr: zeroconf's own
dependency).
"""

from __future__ import annotations

import ipaddress

import ifaddr

from ..errors import ConfigError


def usable_ipv4_addresses(interface: str | None = None) -> list[str]:
    """IPv4 addresses discovery should use on this host.

    Args:
        interface: None for every interface except loopback (loopback only when it is
            all there is); otherwise an interface name ("eth0") or one of the host's
            IPv4 addresses, which pins discovery to it (loopback included).

    Returns:
        The addresses as text, in interface order.

    Raises:
        ConfigError: ``interface`` names no interface or address of this host.
    """
    adapters = ifaddr.get_adapters()
    by_adapter = [
        (adapter.nice_name, [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)])
        for adapter in adapters
    ]
    if interface is not None:
        for name, ips in by_adapter:
            if interface == name and ips:
                return ips
            if interface in ips:
                return [interface]
        known = ", ".join(f"{name} {ips}" for name, ips in by_adapter if ips)
        raise ConfigError(f"no IPv4 interface or address {interface!r} on this host; "
                          f"have: {known}")
    every = [ip for _, ips in by_adapter for ip in ips]
    usable = [ip for ip in every if not ipaddress.IPv4Address(ip).is_loopback]
    return usable or [ip for ip in every if ipaddress.IPv4Address(ip).is_loopback]



def interface_networks(addresses: list[str]) -> list[ipaddress.IPv4Network]:
    """The networks (address and prefix) of this host's interfaces holding ``addresses``."""
    return [
        ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False)
        for adapter in ifaddr.get_adapters() for ip in adapter.ips
        if isinstance(ip.ip, str) and ip.ip in addresses
    ]


def interface_table() -> list[tuple[str, list[str]]]:
    """(interface name, its IPv4 addresses) for every interface of this host with one."""
    table = [(adapter.nice_name, [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)])
             for adapter in ifaddr.get_adapters()]
    return [(name, ips) for name, ips in table if ips]
