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
  each one visits few objects: generation 0 about threshold0, generation 1
  about threshold0 * (threshold1 + 1), and the old generation only what the
  young ones promoted into it since its last collection, about threshold2
  times that. The old generation never holds more, because right after each
  of its collections its survivors are frozen (`Collector.__call__`, a
  `gc.callbacks` hook). So no collection visits the long-lived heap, however
  large it grows, and an object is visited a few times in its youth, then
  never again.

Invariant: only objects that a collection of every unfrozen generation just
found reachable are ever frozen, so cyclic garbage, such as an exception whose
traceback holds the frame that holds it, is collected by a young collection
or by the next old one, and never frozen for good. What this cannot collect is
a frozen object that becomes part of an unreachable cycle later; the commit
paths of the coordinator and of clients create no cycles
(tests/test_collector.py counts them), so that stays rare. `Collector.audit`
(unfreeze, collect) counts such objects for tests; it pauses as long as the
whole heap takes, so no server calls it.

Why freezing inside a callback is safe: CPython (3.11, 3.12) runs the "stop"
callbacks once the collection is done with the generation lists, and
`gc.freeze()` only splices those lists onto the permanent one. (A collection
cannot be started from a callback: that is why the old generation's is
automatic, and its threshold bounds it.)

Pauses: `PauseRecorder`, another `gc.callbacks` hook, counts every
collection, its total and its longest duration; the coordinator reports them
in its counters (`gc_pauses`, `gc_longest_pause_ms`, `gc_pause_total_ms`).

`PROTOBASE_GC=default` in the environment leaves CPython's own policy in place
(benchmarks measure before and after with it); pauses are recorded either way.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Collector", "PauseRecorder", "POLICY_ENV", "THRESHOLDS"]

POLICY_ENV = "PROTOBASE_GC"  # "default": keep CPython's collector policy (pauses are still recorded)
THRESHOLDS = (1000, 4, 1)  # gc.set_threshold (CPython's: 700, 10, 10); see the module docstring
OLDEST = 2  # the generation whose survivors are frozen


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
        self.enabled = environ.get(POLICY_ENV, "") != "default"  # False: CPython's own policy, recorded
        self.recorder = PauseRecorder()
        self.freezes = 0  # collections of the old generation whose survivors were frozen
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
            # A collection of the now empty old generation: CPython collects it automatically only once
            # it took in a quarter of what its last collection left, which was the whole start-up heap.
            gc.collect(OLDEST)
            gc.set_threshold(*THRESHOLDS)
            gc.callbacks.append(self)
        self.recorder.install()  # from here on: the start-up collection is not a pause of the service

    def __call__(self, phase: str, info: Mapping[str, Any]) -> None:
        """The `gc.callbacks` hook: freeze what a collection of the old generation left."""
        if phase == "stop" and info["generation"] == OLDEST:
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
