"""How large a message payload may be, and the check every boundary applies.

wasmtime meters the data a guest hands to the host in one crossing (an export's result, an
import's arguments): 128 MiB of "hostcall fuel", charged 48 bytes (one `Val`) per list element, so
a `list<u8>` longer than 2,796,202 bytes traps the guest ("too much data is being copied between
the host and the guest"). Measured with the echo fixture on wasmtime 50.0.1: 2,796,200 bytes come
back, 2,796,201 trap. The host-to-guest direction is not metered, but a guest must be able to pass
a message on (echo it, forward it), so one limit covers both directions.
"""

from __future__ import annotations

from wasmhost.core.errors import MessagingError

WASMTIME_LIST_U8_CEILING = 2_796_200
"""Largest `list<u8>` a guest can return through wasmtime 50 (measured with the echo fixture)."""

MAX_MESSAGE_BYTES_CEILING = 2_560 * 1024
"""Largest `max_message_bytes` a configuration may set (2.5 MiB): below the wasmtime ceiling with
about 170 KiB of hostcall fuel left for the rest of the call (ids, metadata, broadcast targets)."""

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
"""`max_message_bytes` when the configuration does not set it (1 MiB)."""


def too_large(size: int, limit: int, whose: object) -> str:
    """The text naming a payload's size and the limit it exceeds."""
    return f"payload of {size} bytes exceeds the limit of {limit} bytes (max_message_bytes of {whose})"


def check_message_size(size: int, limit: int, whose: object) -> None:
    """Raise `invalid-message` when a payload of `size` bytes exceeds `whose` limit."""
    if size > limit:
        raise MessagingError("invalid-message", too_large(size, limit, whose))
