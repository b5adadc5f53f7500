"""`[host] metrics`: where the Prometheus endpoint listens, checked with the rest of the config."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

OFF = "off"


@dataclass(frozen=True)
class ListenAddress:
    """An IP address and TCP port to serve on (port 0: any free port, logged at start)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(where: str, text: str) -> ListenAddress | None:
    """`"off"` -> None; `"HOST:PORT"` (an IPv4 or bracketed IPv6 address, port 0-65535) -> ListenAddress.
    Raises ValueError naming `where` and what was expected."""
    if text == OFF:
        return None
    expected = (f'{where}: expected "off" or "ADDRESS:PORT" with an IP address and a port 0-65535 '
                f'(like "127.0.0.1:9464" or "[::1]:9464"), got {text!r}')
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(expected) from None
    if address.version == 6 and not text.startswith("["):
        raise ValueError(expected)
    port = int(port_text)
    if port > 65535:
        raise ValueError(expected)
    return ListenAddress(str(address), port)
