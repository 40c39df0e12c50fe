"""The cyclic garbage collector's policy in ProtoBase's own long-lived processes, and its pause recorder.

Owns the settings of Python's `gc` module in the two processes that call
`Collector.install`: the coordinator (coordinator/server.py, once recovery has
rebuilt its state) and the persistence process (persistence/process.py, once
its WAL is open). Client processes never call it: their collector belongs to
their application, and ProtoBase changes none of its settings there. A
top-level leaf module (rank 0): it imports only the standard library.

Why: a CPython collection of a generation visits every tracked container in
it. A coordinator serving a large database keeps hundreds of thousands of
decoded nodes in its caches, and CPython's own policy collected all of them
every 1,000-2,000 commits: pauses of 0.14-2.9 s, with every commit waiting.

The policy:

* `install`: one full collection, then `gc.freeze()`: what survived start-up
  and recovery moves to the permanent generation, which no collection visits
  again (reference counting still frees its objects when they die).
* Every collection stays automatic, so it also happens inside a long commit
  (a bulk load of 10,000 records), but with `THRESHOLDS` small enough that
  each one visits few objects: a collection of generation 0 about
  threshold0 of them, one of generation 1 about threshold0 * (threshold1 + 1).
* Right after each collection of generation 1 (or 2), what survived it is
  frozen too (`Collector.__call__`, a `gc.callbacks` hook). So the old
  generation is always empty, a collection of it costs what one of
  generation 1 does, and no collection ever visits the long-lived heap,
  however large it grows: an object is visited once or twice in its youth,
  then never again.

Invariant: only objects that a collection of every unfrozen generation just
found reachable are ever frozen (with the old generation empty, a collection
of generation 1 is one), so cyclic garbage, such as an exception whose
traceback holds the frame that holds it, is collected by the next young
collection and never frozen for good. What this cannot collect is a frozen
object that becomes part of an unreachable cycle later: a cycle still in use
at a freeze (an exception being handled), or a long-lived structure that
turns into one. The commit paths of the coordinator and of clients create no
cycles (tests/test_collector.py counts them), so that stays rare.
`Collector.audit` (unfreeze, collect) counts such objects for tests; it
pauses as long as the whole heap takes, so no server calls it.

Why freezing inside a callback is safe: CPython (3.10 to 3.13) runs the
"stop" callbacks once the collection is done with the generation lists, and
`gc.freeze()` only splices those lists onto the permanent one. From 3.14 on,
whose collector is incremental (it never visits the whole old generation at
once), the policy stays off and only records. (Freezing from
the process's loop instead would let one long commit promote its every
object into the old generation first, and its next collection visit them
all.)

Pauses: `PauseRecorder`, another `gc.callbacks` hook, counts every
collection, its total and its longest duration; the coordinator reports them
in its counters (`gc_pauses`, `gc_longest_pause_ms`, `gc_pause_total_ms`).

`PROTOBASE_GC=default` in the environment leaves CPython's own policy in place
(benchmarks measure before and after with it); pauses are recorded either way.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Collector", "PauseRecorder", "POLICY_ENV", "THRESHOLDS"]

POLICY_ENV = "PROTOBASE_GC"  # "default": keep CPython's collector policy (pauses are still recorded)
THRESHOLDS = (500, 4, 10)  # gc.set_threshold (CPython's: 700, 10, 10); see the module docstring
FREEZE_AFTER = 1  # a collection of this generation or an older one freezes what survived it


class PauseRecorder:
    """Counts the collector's pauses and keeps the longest: a `gc.callbacks` hook.

    Cheap enough to stay installed: two clock reads and a few additions per
    collection. Runs in the process that installed it, on whatever thread
    the collection ran.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.pauses = 0  # collections finished since installed
        self.total_seconds = 0.0  # their duration, together
        self.longest_seconds = 0.0  # the longest of them
        self.started: float | None = None  # clock() at the start of the collection under way

    def __call__(self, phase: str, info: Mapping[str, Any]) -> None:
        """The `gc.callbacks` protocol: `phase` is "start" or "stop"."""
        if phase == "start":
            self.started = self.clock()
        elif self.started is not None:
            pause = self.clock() - self.started
            self.started = None
            self.pauses += 1
            self.total_seconds += pause
            if pause > self.longest_seconds:
                self.longest_seconds = pause

    @property
    def longest_ms(self) -> float:
        """The longest pause, in milliseconds."""
        return self.longest_seconds * 1e3

    @property
    def total_ms(self) -> float:
        """Every pause together, in milliseconds."""
        return self.total_seconds * 1e3

    def install(self) -> None:
        """Start recording (idempotent)."""
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        """Stop recording (idempotent)."""
        while self in gc.callbacks:
            gc.callbacks.remove(self)


class Collector:
    """The collector policy of one long-lived ProtoBase process (see the module docstring)."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        # False: CPython's own policy, recorded (asked for, or an incremental collector: 3.14 on)
        self.enabled = environ.get(POLICY_ENV, "") != "default" and sys.version_info < (3, 14)
        self.recorder = PauseRecorder()
        # Times what survived a collection was frozen (start-up's included). Count them here:
        # gc.get_freeze_count() walks the whole permanent generation (46 ms for 2M objects).
        self.freezes = 0
        self.installed = False
        self.previous_thresholds: tuple[int, int, int] | None = None  # gc's, before `install`

    def install(self) -> None:
        """Record pauses; with the policy on, collect once, freeze what survived and set the thresholds.

        Call it once the process's long-lived state is built (after recovery
        in the coordinator): everything alive then is frozen.
        """
        if self.installed:
            return
        self.installed = True
        if self.enabled:
            self.previous_thresholds = gc.get_threshold()
            gc.collect()
            gc.freeze()
            self.freezes += 1
            gc.set_threshold(*THRESHOLDS)
            gc.callbacks.append(self)
        self.recorder.install()  # from here on: the start-up collection is not a pause of the service

    def __call__(self, phase: str, info: Mapping[str, Any]) -> None:
        """The `gc.callbacks` hook: freeze what a collection of generation 1 or 2 left."""
        if phase == "stop" and info["generation"] >= FREEZE_AFTER:
            gc.freeze()
            self.freezes += 1

    def uninstall(self) -> None:
        """Give the process CPython's policy back, frozen objects included (tests; a stopping process need not)."""
        self.recorder.uninstall()
        while self in gc.callbacks:
            gc.callbacks.remove(self)
        if self.previous_thresholds is not None:
            gc.set_threshold(*self.previous_thresholds)
            gc.unfreeze()
            self.previous_thresholds = None
        self.installed = False

    def audit(self) -> int:
        """The unreachable objects that stayed frozen: collect, then unfreeze and collect everything.

        Pauses for as long as a full collection of the whole heap takes: for
        tests and benchmarks, never a serving process. Freezes again after
        (the policy's own callback does, with the policy on).
        """
        gc.collect()  # the garbage the policy collects on its own
        gc.unfreeze()
        return gc.collect()
