"""The systemd notification protocol (sd_notify) over the datagram socket in $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("wasmhost.systemd")


class Notifier:
    """Sends `KEY=value` datagrams to systemd; does nothing when NOTIFY_SOCKET is unset."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: str | None = None
        self._socket: socket.socket | None = None
        if address:
            # A leading '@' names a socket in the abstract namespace.
            self.address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, *fields: str) -> None:
        """Send the fields (e.g. "READY=1", "STATUS=...") in one datagram."""
        if self._socket is None or self.address is None:
            return
        try:
            # Never blocks the event loop: a receiver that stopped reading (its queue holds ~10 datagrams)
            # costs this notification (logged), not the daemon.
            self._socket.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), if systemd wants them."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
