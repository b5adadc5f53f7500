"""What one stored entry costs against its owner's quota: the bytes it really takes in SQLite.

An entry is one row (owner, key, value) of a WITHOUT ROWID table, i.e. one cell of an index B-tree
in 4 KiB pages. Its cost is the key and value plus a per-entry overhead made of:

- the owner's component id, which SQLite stores in every row, and the record header (a few bytes);
- the cell's size prefix and its 2-byte pointer in the page;
- half again of all that on the leaf page, for B-tree pages that are not full (page splits and the
  divider copies in interior pages; measured 1.1x - 1.35x, charged 1.5x);
- for a row too large for one cell (over about 1 KB), the rest goes to overflow pages, charged as
  whole 4 KiB pages: the unused tail of the last one is disk in use too.

Measured against `page_count * page_size` after a checkpoint, this is never below what the file
grew by, for any mix of key and value sizes (tests/test_storage.py checks many small keys).
"""

from __future__ import annotations

import functools

PAGE_SIZE = 4096
"""The database page size (set when the file is created; SQLite's default)."""
_USABLE = PAGE_SIZE
# SQLite's spill thresholds for index B-tree cells (btreeInt.h: maxLocal / minLocal).
MAX_LOCAL = (_USABLE - 12) * 64 // 255 - 23
MIN_LOCAL = (_USABLE - 12) * 32 // 255 - 23
_OVERFLOW_DATA = _USABLE - 4  # each overflow page starts with the next page's number
_CELL_POINTER = 2
_OVERFLOW_POINTER = 4


def _varint_len(n: int) -> int:
    """Bytes of SQLite's varint encoding of n >= 0."""
    length = 1
    while n >= 1 << (7 * length) and length < 9:
        length += 1
    return length


def entry_cost(owner: str, key: str, value_len: int) -> int:
    """Bytes charged for `key` holding a value of `value_len` bytes in `owner`'s namespace."""
    return _cost(len(owner.encode("utf-8", "surrogatepass")), len(key.encode("utf-8", "surrogatepass")), value_len)


@functools.lru_cache(maxsize=4096)
def _cost(owner_len: int, key_len: int, value_len: int) -> int:
    """entry_cost by sizes: the same few sizes recur (it is computed twice per write, on hot paths)."""
    types = (2 * owner_len + 13, 2 * key_len + 13, 2 * value_len + 12)  # text, text, blob serial types
    header = sum(_varint_len(t) for t in types)
    header += _varint_len(header + 1)
    payload = header + owner_len + key_len + value_len
    if payload <= MAX_LOCAL:
        local, overflow_pages, pointer = payload, 0, 0
    else:
        local = MIN_LOCAL + (payload - MIN_LOCAL) % _OVERFLOW_DATA
        if local > MAX_LOCAL:
            local = MIN_LOCAL
        overflow_pages = -(-(payload - local) // _OVERFLOW_DATA)
        pointer = _OVERFLOW_POINTER
    cell = _varint_len(payload) + local + pointer + _CELL_POINTER
    return -(-cell * 3 // 2) + overflow_pages * PAGE_SIZE
