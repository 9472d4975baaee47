"""What the operator lets organizations' integrations reach besides public addresses (RRC_PRIVATE_ENDPOINTS).

Pure parsing, no network: `config.py` checks the variable when a process starts, and
`services/source_policy.py` applies it to every address a tenant types. Kept out of both so the
settings module stays light (every CLI command loads it) and the policy has one reader.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

PRIVATE_ENDPOINTS_ENV = "RRC_PRIVATE_ENDPOINTS"
ANY_ENDPOINT = "any"
DNS_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PrivateEndpoints:
    """What RRC_PRIVATE_ENDPOINTS lets organizations reach besides public addresses."""

    anything: bool = False
    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    def allows(self, addresses: Iterable[IPAddress]) -> bool:
        """Every one of a host's non-public `addresses` (its name was not listed)."""
        return self.anything or all(any(ip in net for net in self.networks) for ip in addresses)


def normal_host(host: str) -> str:
    """A host as compared and shown: no brackets, no trailing dot, lower case."""
    return host.strip().strip("[]").rstrip(".").lower()


def parse_private_endpoints(raw: str) -> PrivateEndpoints:
    """Empty (the default) allows nothing; `any` alone allows everything; else comma-separated IP addresses, CIDR
    networks (strict: 10.0.0.1/8 is a typo, not 10.0.0.0/8) and host names. ValueError names the variable."""
    entries = [normal_host(part) for part in raw.split(",") if part.strip()]
    if entries == [ANY_ENDPOINT]:
        return PrivateEndpoints(anything=True)
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError:
            if entry == ANY_ENDPOINT or not _is_host_name(entry):
                raise ValueError(f"{PRIVATE_ENDPOINTS_ENV}: {entry!r} is not an IP address, a CIDR network or a "
                                 f"host name (comma-separated; or '{ANY_ENDPOINT}' alone)") from None
            names.add(entry)
    return PrivateEndpoints(False, frozenset(names), tuple(networks))


def _is_host_name(text: str) -> bool:
    """A DNS name (not a mistyped address such as 10.0.0.300: a last label is never all digits)."""
    labels = text.split(".")
    return len(text) <= 253 and all(DNS_LABEL.match(label) for label in labels) and not labels[-1].isdigit()
