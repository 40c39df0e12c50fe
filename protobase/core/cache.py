"""Per-process bounded caches keyed by AtomPointer.

`AtomObjectCache` maps a pointer to the object decoded from it (a tree node,
a frozen value, a tree view); `AtomBytesCache` maps a pointer to its atom's
(kind, payload view). Pointers are never reused, so an entry never goes stale
while its atom exists; after a compaction the old atoms are gone and the caches
are cleared.

Each cache is bounded twice: by entries (`capacity`) and by bytes
(`max_bytes`, optional). Every entry is put with a *charge*, the bytes of
Python heap it is estimated to hold (the Store knows: about the payload's
length plus a fixed overhead for a record, several times the payload for a
decoded node); `put` without one asks the cache's `estimate(value)`. The byte
bound is what keeps a reader's heap small whatever it reads: a decoded
64-entry leaf holds ~9 KB, a small record ~0.4 KB, so a bound by entries
alone lets the heap range over a factor of twenty.

Eviction is FIFO over dict insertion order: a hit does no bookkeeping at all,
which keeps the warm read path as short as a dict lookup. Hot entries evicted
by FIFO are decoded again from shared memory, which is cheap.

Each process's `Store` owns one cache of each kind (clients and the
coordinator alike); nothing here is shared between processes or locked, so
one cache serves the threads of its process under the GIL.

Invariant: a cache never holds more than `capacity` entries nor (with
`max_bytes`) entries charged more than `max_bytes` in all, `held_bytes` is the
sum of the charges of what it holds, and what it holds under a pointer is what
decoding that pointer's atom gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["AtomObjectCache", "AtomBytesCache", "CacheStats"]


@dataclass(frozen=True)
class CacheStats:
    """Counters of one cache."""

    name: str
    entries: int
    capacity: int
    hits: int
    misses: int
    held_bytes: int = 0  # the charges of the entries held (estimated bytes of Python heap)
    max_bytes: int | None = None  # the byte bound, None when bounded by entries only

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


V = TypeVar("V")


#: The charge of an entry put without one, when the cache has no `estimate`.
DEFAULT_CHARGE = 512


def _flat_charge(value: object) -> int:
    return DEFAULT_CHARGE


class _BoundedCache(Generic[V]):
    """At most `capacity` entries {int key -> V} (and `max_bytes` of charges), evicted oldest first."""

    __slots__ = ("data", "charges", "capacity", "max_bytes", "held_bytes", "estimate", "hits", "misses")

    def __init__(
        self, capacity: int, max_bytes: int | None = None, estimate: Callable[[V], int] = _flat_charge
    ) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"cache byte bound must be at least 1, got {max_bytes}")
        self.data: dict[int, V] = {}  # {pointer (or -pointer for views) -> cached object}
        self.charges: dict[int, int] = {}  # {key -> its charge}: the same keys as data, in the same order
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.held_bytes = 0  # sum of charges
        self.estimate = estimate  # value -> its charge, for a put without one
        self.hits = 0
        self.misses = 0  # every miss is followed by a put

    def get(self, key: int) -> V | None:
        """The entry under `key`, or None (a miss: the caller decodes and `put`s it)."""
        value = self.data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: int, value: V, charge: int | None = None) -> V:
        """Cache `value` under `key`, charged `charge` bytes (default: `estimate(value)`); return `value`.

        When the entry would overflow a bound, the oldest entries go first, a
        sixteenth of the bound at a time. An entry charged more than the whole
        byte bound is returned without being cached.
        """
        if charge is None:
            charge = self.estimate(value)
        data, charges, max_bytes = self.data, self.charges, self.max_bytes
        if max_bytes is None:
            if len(data) >= self.capacity:
                self._evict(charge)
        elif len(data) >= self.capacity or self.held_bytes + charge > max_bytes:
            if charge > max_bytes:
                return value
            self._evict(charge)
        replaced = charges.get(key)  # a key put again keeps its place (unless just evicted)
        if replaced is not None:
            self.held_bytes -= replaced
        data[key] = value
        charges[key] = charge
        self.held_bytes += charge
        return value

    def _evict(self, incoming: int) -> None:
        """Drop the oldest entries until a sixteenth of each bound is free for `incoming` and later puts."""
        # Evict in batches: amortised O(1). Take the victims from one iterator:
        # `next(iter(data))` per victim rescans the deleted slots at the front of
        # the dict each time, which made eviction quadratic.
        data, charges = self.data, self.charges
        keep_entries = self.capacity - max(1, self.capacity // 16)
        max_bytes = self.max_bytes
        keep_bytes = max_bytes - max_bytes // 16 - incoming if max_bytes is not None else None
        victims = []
        held, entries = self.held_bytes, len(data)
        for key, charge in charges.items():
            if entries <= keep_entries and (keep_bytes is None or held <= keep_bytes):
                break
            victims.append(key)
            held -= charge
            entries -= 1
        for key in victims:
            del data[key]
            del charges[key]
        self.held_bytes = held

    def discard(self, key: int) -> None:
        """Drop the entry under `key`, if there is one."""
        charge = self.charges.pop(key, None)
        if charge is not None:
            del self.data[key]
            self.held_bytes -= charge

    def clear(self) -> None:
        """Drop every entry (after a compaction unlinked the atoms they came from); counters stay."""
        self.data.clear()
        self.charges.clear()
        self.held_bytes = 0

    def stats(self) -> CacheStats:
        """The cache's counters as of now, frozen."""
        return CacheStats(
            type(self).__name__,
            len(self.data),
            self.capacity,
            self.hits,
            self.misses,
            self.held_bytes,
            self.max_bytes,
        )


# Any: the decoded objects are tree nodes, views, and frozen user values of any type.
class AtomObjectCache(_BoundedCache[Any]):
    """pointer -> decoded object (nodes, frozen values); views under the negated pointer."""


class AtomBytesCache(_BoundedCache[tuple[int, memoryview]]):
    """pointer -> (kind, payload memoryview) of an atom, skipping header checks on reuse."""
