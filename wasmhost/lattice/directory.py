"""Who runs what in the lattice, from heartbeats and inventories; and the guest-facing directory.

Changed on the event loop only; read from guest threads too (single dict reads, safe under the GIL: a
reader sees the directory before or after a change, never half of it, because a host's components are
replaced by one assignment).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from wasmhost.core.errors import ComponentError
from wasmhost.core.ids import ComponentId, InvalidComponentId
from wasmhost.core.metadata import ComponentInfo
from wasmhost.core.protocols import DirectoryPort, new_listing_version
from wasmhost.lattice.wire import Heartbeat, Inventory, InventoryEntry

MISSED_HEARTBEATS = 3
"""A host not heard from for this many of its heartbeat intervals has left the lattice."""


@dataclass
class HostRecord:
    """One other host as last heard of."""

    host: str
    heartbeat: Heartbeat
    last_seen: float
    components: dict[ComponentId, InventoryEntry] = field(default_factory=dict)
    inventory_version: int = -1  # the version `components` is of; -1: not fetched yet


class Directory:
    """The other hosts of the lattice and the components each runs."""

    def __init__(self, own_host: str) -> None:
        self.own_host = own_host
        self.hosts: dict[str, HostRecord] = {}
        self._index: dict[ComponentId, tuple[str, ...]] = {}  # component -> hosts running it
        self.version = new_listing_version()
        """Renewed whenever `components()` answers otherwise (see DirectoryPort.listing_version)."""

    def heard(self, beat: Heartbeat, now: float | None = None) -> tuple[bool, bool]:
        """Record a heartbeat; returns (fetch, restarted): whether the host's inventory must be fetched (new
        host or new version), and whether it is a new run of a host known before (what the old run held is lost)."""
        if beat.host == self.own_host:
            return False, False
        now = time.monotonic() if now is None else now
        record = self.hosts.get(beat.host)
        if record is not None and _sent_before(beat, record.heartbeat):
            # Delivered late: a server that stalled hands on what it held when it resumes, however old. An earlier
            # run's heartbeat was taken for a restart, ending the requests the host's current run held (and its
            # old inventory version fetched). Ignored, as long as the newer run is heard of (a host whose clock
            # was set back across its restart is taken in once its earlier run has left, three heartbeats later).
            return False, False
        restarted = record is not None and record.heartbeat.started_at != beat.started_at
        if record is None or restarted:
            record = self.hosts[beat.host] = HostRecord(beat.host, beat, now)
        record.heartbeat, record.last_seen = beat, now
        return record.inventory_version != beat.inventory_version, restarted

    def update(self, inventory: Inventory) -> None:
        """Replace what a (known) host runs with its fetched `inventory`."""
        record = self.hosts.get(inventory.host)
        if record is None:
            return
        components = {}
        for entry in inventory.components:
            try:
                components[ComponentId.parse(entry.id)] = entry
            except InvalidComponentId:
                continue  # another host's bug: its other components stay reachable
        record.components, record.inventory_version = components, inventory.version
        self._reindex()

    def expire(self, now: float | None = None) -> list[str]:
        """Remove the hosts silent for MISSED_HEARTBEATS of their intervals; returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [h for h, r in self.hosts.items() if now - r.last_seen > MISSED_HEARTBEATS * r.heartbeat.heartbeat_s]
        for host in gone:
            del self.hosts[host]
        if gone:
            self._reindex()
        return gone

    def next_expiry(self) -> float | None:
        """When (time.monotonic()) the first host leaves unless heard from before; None without hosts."""
        return min((r.last_seen + MISSED_HEARTBEATS * r.heartbeat.heartbeat_s for r in self.hosts.values()),
                   default=None)

    def _reindex(self) -> None:
        index: dict[ComponentId, list[str]] = {}
        for host, record in sorted(self.hosts.items()):
            for cid in record.components:
                index.setdefault(cid, []).append(host)
        listed = list(self._index)
        self._index = {cid: tuple(hosts) for cid, hosts in index.items()}
        if list(self._index) != listed:  # not for a new health or state alone, which inventories also carry
            self.version = new_listing_version()  # after the change: see DirectoryPort.listing_version

    def hosts_of(self, component: ComponentId) -> tuple[str, ...]:
        """The other hosts running `component` (empty when none)."""
        return self._index.get(component, ())

    def entry(self, component: ComponentId) -> InventoryEntry | None:
        """What one host running `component` says of it, or None."""
        hosts = self._index.get(component)
        if not hosts:
            return None
        record = self.hosts.get(hosts[0])
        return record.components.get(component) if record is not None else None

    def components(self) -> list[ComponentId]:
        """Every component some other host runs."""
        return list(self._index)


def _sent_before(beat: Heartbeat, known: Heartbeat) -> bool:
    """Whether `beat` was sent before `known` by the same host: by an earlier run, or earlier in the same run."""
    if beat.started_at != known.started_at:
        return beat.started_at < known.started_at
    return beat.seq <= known.seq


class LatticeDirectory:
    """`list-components` / `get-component-metadata` across the lattice: local components as the local
    directory says, then those only other hosts run (DirectoryPort)."""

    def __init__(self, local: DirectoryPort, directory: Directory) -> None:
        self.local = local
        self.directory = directory

    @property
    def listing_version(self) -> tuple[Hashable, int]:
        """Changes whenever the local directory's or the other hosts' components do."""
        return self.local.listing_version, self.directory.version

    def list_components(self) -> list[ComponentId]:
        """Local ids first, then remote-only ones."""
        ids = self.local.list_components()
        seen = set(ids)
        return ids + [cid for cid in self.directory.components() if cid not in seen]

    def component_info(self, component: ComponentId) -> ComponentInfo:
        """The local component's information, else a remote host's inventory entry."""
        try:
            return self.local.component_info(component)
        except ComponentError:
            entry = self.directory.entry(component)
            if entry is None:
                raise
            return ComponentInfo(component, entry.name, entry.version, entry.health)
