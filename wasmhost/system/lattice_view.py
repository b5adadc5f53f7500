"""The answer to `wasmhost status --lattice`: every host of the lattice and where each component runs, as
this daemon's link sees it (`Link.snapshot()`: the connection, and the directory built from the other
hosts' heartbeats and inventories, so at most a heartbeat or two old) with this host's own components."""

from __future__ import annotations

from typing import Any

from wasmhost.system.protocol import LatticeComponentRow, LatticeHostRow, LatticeView


def lattice_view(snapshot: dict[str, Any], local: list[dict[str, Any]]) -> LatticeView:
    """The view of a link's snapshot and of `local`, this host's inventory entries as of now (what the link
    last published may be older, and is empty before the first connection): this host first, then the
    others by id; components by id, then host (a component with replicas has a row per host)."""
    own = snapshot["host"]
    hosts = [LatticeHostRow(own, True, None, len(local))]
    rows = [_row(entry, own) for entry in local]
    for other in snapshot["hosts"]:
        hosts.append(LatticeHostRow(other["host"], False, max(0.0, other["seen_s_ago"]), len(other["components"])))
        rows.extend(_row(entry, other["host"]) for entry in other["components"])
    rows.sort(key=lambda row: (row.id, row.host))
    return LatticeView(snapshot["lattice"], own, snapshot["connected"], snapshot["url"], snapshot["cause"],
                       hosts, rows, snapshot["remote_requests"])


def _row(entry: dict[str, Any], host: str) -> LatticeComponentRow:
    return LatticeComponentRow(entry["id"], host, entry["state"], entry["health"], entry["accepts_external"])
