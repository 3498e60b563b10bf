"""Which queued jobs may start: at most `limit` running, the rest by priority (higher first), then age.

Pure, so the order is tested without an API server; the handlers feed it the
operator's index of every CompressionJob it watches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from krunch.operator.lifecycle import Phase

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Entry:
    key: Key
    phase: Phase
    priority: int
    created: str  # creationTimestamp, RFC 3339: sorts as text

    @property
    def order(self) -> tuple[int, str, Key]:
        return (-self.priority, self.created, self.key)


# Pending jobs queue too: at start-up every job is Pending in the index until its create handler admits
# it, and the first job admitted must not take a slot ahead of a higher-priority one admitted a moment later.
# An invalid Pending job leaves the queue within one handler call (Failed/InvalidSpec).
WAITING = (Phase.PENDING, Phase.QUEUED)


def queue_order(entries: Iterable[Entry]) -> list[Entry]:
    return sorted((e for e in entries if e.phase in WAITING), key=lambda e: e.order)


def may_start(key: Key, entries: Iterable[Entry], claimed: Iterable[Key], limit: int) -> bool:
    """True when `key` is among the first free slots of the queue. `claimed` are jobs this operator has
    just started whose Running status has not come back through the watch yet; they hold a slot."""
    entries = list(entries)
    claimed = set(claimed)
    running = {e.key for e in entries if e.phase is Phase.RUNNING} | claimed
    free = limit - len(running)
    if free <= 0:
        return False
    waiting = [e.key for e in queue_order(entries) if e.key not in claimed]
    return key in waiting[:free]


def queue_position(key: Key, entries: Iterable[Entry]) -> int | None:
    """1-based place in the queue, for the status message."""
    order = [e.key for e in queue_order(entries)]
    return order.index(key) + 1 if key in order else None
