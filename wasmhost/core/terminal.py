"""Text a guest controls, made safe to print on an operator's terminal.

A guest chooses its error texts, log messages and keys, metadata and function names. Printed as they
are, a control character in them is obeyed by the terminal: ESC sequences set the window title, clear
the screen or move the cursor, CR and newlines paint lines that look like ours, bidirectional
formatting characters reorder what follows them. Every such character (C0, DEL, C1 and the bidi
controls) is shown as a visible escape instead: `\\n`, `\\r`, `\\t`, `\\xNN`, `\\uNNNN`. A backslash
is left as it is, so a guest can write text that *looks* like an escape, never one the terminal obeys.
"""

from __future__ import annotations

import json
from typing import Any

_CONTROLS = [*range(0x20), *range(0x7F, 0xA0)]  # C0, DEL, C1
# bidirectional formatting characters (a guest's text could read as something else: "Trojan Source")
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = ({code: f"\\x{code:02x}" for code in _CONTROLS} | {code: f"\\u{code:04x}" for code in _BIDI}
            | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_ESCAPES_BUT_NEWLINES = {code: text for code, text in _ESCAPES.items() if code != ord("\n")}
# json.dumps(ensure_ascii=False) escapes C0 itself; DEL, C1 and bidi controls are written raw unless asked.
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in [*range(0x7F, 0xA0), *_BIDI]}


def printable(text: str, newlines: bool = False) -> str:
    """`text` with every control character shown as an escape; `newlines=True` keeps line breaks, for
    text printed over several lines on purpose (a backtrace), never for one cell or one line."""
    return text.translate(_ESCAPES_BUT_NEWLINES if newlines else _ESCAPES)


def json_line(value: Any) -> str:
    """`value` as one line of JSON, non-ASCII text readable but no control character raw in it."""
    return json.dumps(value, ensure_ascii=False).translate(_JSON_ESCAPES)
