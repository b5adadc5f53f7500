"""The answer to `wasmhost status --lattice`: every host of the lattice and where each component runs, as
this daemon's link knows it (its own inventory, and the directory built from the others' heartbeats and
inventories, so at most a heartbeat or two old)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from wasmhost.system.protocol import LatticeComponentRow, LatticeHostRow, LatticeView

if TYPE_CHECKING:
    from wasmhost.lattice.link import Link


def lattice_view(link: Link, now: float | None = None) -> LatticeView:
    """This host first, then the others by id; components by id, then host (a component with replicas
    has a row per host)."""
    now = time.monotonic() if now is None else now
    own = link.inventory_source()
    hosts = [LatticeHostRow(link.host, True, None, len(own))]
    components = [LatticeComponentRow(e.id, link.host, e.state, e.health, e.accepts_external) for e in own]
    for host, record in sorted(link.directory.hosts.items()):
        hosts.append(LatticeHostRow(host, False, round(max(0.0, now - record.last_seen), 3), len(record.components)))
        components.extend(LatticeComponentRow(e.id, host, e.state, e.health, e.accepts_external)
                          for e in record.components.values())
    components.sort(key=lambda row: (row.id, row.host))
    return LatticeView(link.settings.name, link.host, link.connected, hosts, components)
