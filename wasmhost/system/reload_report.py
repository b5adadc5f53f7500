"""What one reload did, as the daemon answers it and the CLI prints it."""

from __future__ import annotations

from typing import Literal

import msgspec

Outcome = Literal["reloaded", "rolled-back", "rejected", "refused", "failed"]

MAX_REASON_CHARS = 400
"""Characters of one component's rollback reason or load problem in a report (see `cut`)."""


def cut(text: str, whole_in: str) -> str:
    """`text` (one component's reason: a backtrace on one line, some 11 KB at most) cut to MAX_REASON_CHARS,
    saying where it is whole. A reload can roll back thousands of components of one binary at once: whole,
    their reasons made a 35 MB answer, over the control socket's frame limit, and a log line the log dropped."""
    if len(text) <= MAX_REASON_CHARS:
        return text
    return f"{text[:MAX_REASON_CHARS]}... (cut; whole in {whole_in})"


class ReloadReport(msgspec.Struct, forbid_unknown_fields=True):
    """The result of one reload: what was added, removed, changed (handed over to a new version) and kept,
    which changed components were rolled back to their previous version and why, the configuration's
    warnings, and, when nothing changed, the lines saying what stopped it (`outcome` rejected, refused or
    failed)."""

    outcome: Outcome = "reloaded"
    added: list[str] = msgspec.field(default_factory=list)
    removed: list[str] = msgspec.field(default_factory=list)
    changed: list[str] = msgspec.field(default_factory=list)
    kept: list[str] = msgspec.field(default_factory=list)
    what_changed: dict[str, list[str]] = msgspec.field(default_factory=dict)
    """Component id -> what differs in each changed component (rolled back or not): `binary` (its file's
    bytes) and the config keys whose values differ (`limits`, `mailbox_capacity`, ...)."""
    rolled_back: dict[str, str] = msgspec.field(default_factory=dict)
    """Component id -> why its new version was not kept (the previous version runs again)."""
    problems: list[str] = msgspec.field(default_factory=list)
    warnings: list[str] = msgspec.field(default_factory=list)
    """What `wasmhost check` warns about in the configuration applied (a pattern matching no component...)."""

    @property
    def ok(self) -> bool:
        """Whether everything the configuration asked for was applied."""
        return self.outcome == "reloaded"

    def lines(self) -> list[str]:
        """The report in words, one line each (the CLI prints them)."""
        if self.outcome in ("rejected", "refused", "failed"):
            return list(self.problems)  # they say that nothing changed, and why
        head = "reload: ok" if self.ok else \
            f"reload: {len(self.rolled_back)} component(s) rolled back to their previous version"
        out = [head]
        for label, ids in (("added", self.added), ("removed", self.removed), ("changed", self.changed)):
            if ids:
                out.append(f"  {label}: {', '.join(self._with_what(cid) for cid in ids)}")
        out.append(f"  kept: {len(self.kept)} unchanged")
        out.extend(f"  rolled back: {cid}: {reason}" for cid, reason in self.rolled_back.items())
        out.extend(f"  warning: {warning}" for warning in self.warnings)
        return out

    def _with_what(self, cid: str) -> str:
        """`cid`, followed by what changed in it when it changed: `t/a/0 (binary, limits)`."""
        what = self.what_changed.get(cid)
        return f"{cid} ({', '.join(what)})" if what else cid
