"""Text a guest chooses, bounded before the host keeps it: trap backtraces name the guest's functions
(a name section may hold megabytes per name) and its errors carry its own words. Such text is kept in
status rows, forensics records and log lines, so it is cut to a size the host can keep and answer with."""

from __future__ import annotations

MAX_LINE_CHARS = 512
"""Characters of one line kept (a long Rust or C++ function name still fits)."""
MAX_LINES = 32
"""Lines kept: the first and the last half (a trap's cause is its last line)."""


def bounded(text: str) -> str:
    """`text` with each line cut to MAX_LINE_CHARS and at most MAX_LINES lines, saying what was cut; `text`
    itself when it is within both."""
    if len(text) <= MAX_LINE_CHARS:
        return text  # the common case: one short line, or a few
    lines = [line if len(line) <= MAX_LINE_CHARS else f"{line[:MAX_LINE_CHARS]}... ({len(line) - MAX_LINE_CHARS} "
             "characters cut)" for line in text.split("\n")]
    if len(lines) > MAX_LINES:
        half = MAX_LINES // 2
        lines = [*lines[:half], f"... ({len(lines) - 2 * half} lines cut)", *lines[-half:]]
    return "\n".join(lines)
