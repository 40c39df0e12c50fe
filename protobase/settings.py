"""The tunables of a ProtoBase coordinator, each with its default, its meaning and its valid range.

Owns every tunable the coordinator reads, in one frozen dataclass, `Settings`,
and their command-line flags (`add_arguments`, `from_arguments`), which
`python -m protobase.coordinator` and `protobase serve` take. A top-level leaf
module (rank 0): it imports nothing of protobase, so any layer may read it.
The coordinator process is built with one (`Coordinator(datadir, settings)`);
client processes read only the defaults (`DEFAULTS`), e.g. the size of their
object cache.

Two kinds of tunable:

* fields: chosen per coordinator when it starts, `Settings(flush_interval=0.05)`
  or `--flush-interval 0.05`; a running coordinator keeps its own.
* constants (`ClassVar`s, listed in `CONSTANTS`): the same for every instance,
  not constructor arguments. `btree_max_entries` is part of the data format:
  a node wider than it is refused as corrupt, so old data depends on it, and
  the B+tree keeps it as `MAX_ENTRIES` (protobase.core.btree).
  `wal_preallocate_bytes` is read by the persistence process as the WAL
  writer's `PREALLOCATE_BYTES` (protobase/persistence/wal/writer.py), which
  takes no per-instance value.

Module constants elsewhere whose value comes from `DEFAULTS` (kept for their
importers): core/store.py `DEFAULT_OBJECT_CACHE`, `DEFAULT_BYTES_CACHE`;
shm/control.py `DEFAULT_READER_SLOTS`.

Invariant: a `Settings` holds only valid values: constructing one with a
value of the wrong type or out of range raises ValueError naming the option,
the value, and what to pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

__all__ = ["Settings", "DEFAULTS", "CONSTANTS", "add_arguments", "from_arguments", "markdown_table"]

T = TypeVar("T")

MAX_READER_SLOTS = 2**32 - 1  # the control segment stores the slot count as a u32


def _tunable(
    default: T,
    doc: str,
    *,
    unit: str,
    minimum: float,
    maximum: int | None = None,
    above: bool = False,
    none: str | None = None,
    flags: tuple[str, ...] = (),
) -> T:
    """A Settings field: its default and how it is documented and checked.

    `unit` is "seconds" (an int or float) or what a whole number counts
    ("bytes", "entries", ...); the value must be >= `minimum` (> with `above`)
    and <= `maximum`; `none` says what None means where None is allowed;
    `flags` are more command-line names for it.
    """
    metadata = {
        "doc": doc,
        "unit": unit,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "none": none,
        "flags": flags,
    }
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Every tunable of one coordinator; `Settings()` holds the defaults.

    Raises ValueError for a value out of range or of the wrong type, e.g.
    `Settings(flush_interval=-1)`.
    """

    # -- durability and reclamation --
    flush_interval: float = _tunable(
        0.01, "longest time an async commit waits for its fsync", unit="seconds", minimum=0
    )
    checkpoint_bytes: int = _tunable(
        64 << 20, "WAL bytes after which a checkpoint is written (and on every clean stop)", unit="bytes", minimum=0
    )
    compact_min_bytes: int = _tunable(
        64 << 20, "bytes appended since the last compaction below which none runs", unit="bytes", minimum=0
    )
    compact_in_steps_above: int = _tunable(
        1 << 20,
        "live bytes above which an automatic compaction copies in steps of a few ms between commits "
        "(a copy at once would hold them up for as long as it takes)",
        unit="bytes",
        minimum=0,
    )
    reader_slots: int = _tunable(
        1024,
        "database handles that can be open at once, one per protobase.open() in each process",
        unit="slots",
        minimum=1,
        maximum=MAX_READER_SLOTS,
    )
    # -- the process's life --
    shutdown_grace: float | None = _tunable(
        2.0,
        "seconds the coordinator lingers once the last client left",
        unit="seconds",
        minimum=0,
        none="serve forever",
        flags=("--grace",),
    )
    tick: float = _tunable(
        0.2,
        "seconds between housekeeping passes (reaping dead readers, unlinking segments)",
        unit="seconds",
        minimum=0,
        above=True,
    )
    busy_poll: float = _tunable(
        0.0005,
        "longest a waiting process polls for a message before it sleeps, which spares the peer a wake-up "
        "(protobase/wire/busypoll.py; clients: protobase.open(busy_poll=)); 0 never polls",
        unit="seconds",
        minimum=0,
        maximum=1,
    )
    lock_wait: float = _tunable(
        30.0,
        "seconds a starting coordinator waits for a stopping one to let go of the directory",
        unit="seconds",
        minimum=0,
    )
    first_client_wait: float = _tunable(
        10.0, "seconds a new coordinator waits for its first client, whatever its grace", unit="seconds", minimum=0
    )
    stop_timeout: float = _tunable(
        120.0, "seconds a clean stop waits for its final checkpoint", unit="seconds", minimum=0
    )
    # -- what clients may make it hold --
    receive_bytes: int = _tunable(1 << 20, "bytes read from a client's socket at a time", unit="bytes", minimum=1)
    max_buffered_bytes: int = _tunable(
        512 << 20,
        "bytes of incomplete requests held for all clients together; a client over it is hung up on",
        unit="bytes",
        minimum=1,
    )
    partial_frame_timeout: float = _tunable(
        30.0, "seconds a client may leave a request half-sent before it is hung up on", unit="seconds", minimum=0
    )
    # -- how values are laid out in atoms (coordinator/writer.py) --
    flat_dict_entries: int = _tunable(
        64, "entries above which a dict is stored as a tree rather than one atom", unit="entries", minimum=1
    )
    flat_set_entries: int = _tunable(
        64, "elements above which a set is stored as a tree rather than one atom", unit="entries", minimum=1
    )
    flat_list_entries: int = _tunable(
        256, "items above which a list is stored as a tree rather than one atom", unit="entries", minimum=1
    )
    flat_max_bytes: int = _tunable(
        16 << 10,
        "bytes above which a container of several entries is stored as a tree, however few",
        unit="bytes",
        minimum=0,
    )
    inline_bytes: int = _tunable(
        512,
        "length above which a str or bytes value gets its own atom rather than sitting in its parent",
        unit="bytes",
        minimum=0,
    )
    # -- caches (core/store.py) --
    object_cache: int = _tunable(
        1 << 18, "entries of the decoded-object cache (clients: protobase.open(cache_size=))", unit="entries", minimum=1
    )
    bytes_cache: int = _tunable(1 << 16, "entries of the atom-bytes cache", unit="entries", minimum=1)

    # -- constants: the same for every instance (see the module docstring) --
    btree_max_entries: ClassVar[int] = 64
    wal_preallocate_bytes: ClassVar[int] = 1 << 20

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            problem = _check(getattr(self, spec.name), spec.metadata)
            if problem is not None:
                raise ValueError(
                    f"{spec.name} must be {problem}, got {getattr(self, spec.name)!r}; pass {_suggestion(spec)}"
                )


#: {name -> (unit, doc)} of the constants of `Settings` (its ClassVars), which no instance changes.
CONSTANTS: Mapping[str, tuple[str, str]] = {
    "btree_max_entries": (
        "entries",
        "entries per B+tree leaf and children per branch; part of the data format (protobase.core.btree.MAX_ENTRIES)",
    ),
    "wal_preallocate_bytes": (
        "bytes",
        "bytes of zeros a WAL file grows by at a time, in the persistence process "
        "(protobase.persistence.wal.writer.PREALLOCATE_BYTES)",
    ),
}


def _check(value: object, meta: Mapping[str, Any]) -> str | None:
    """What `value` must be, if it is not a valid value of the tunable `meta` describes; else None."""
    if value is None and meta["none"] is not None:
        return None
    seconds = meta["unit"] == "seconds"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not seconds):
        return _range(meta)
    if isinstance(value, float) and not math.isfinite(value):
        return _range(meta)
    minimum, maximum = meta["minimum"], meta["maximum"]
    if (value <= minimum if meta["above"] else value < minimum) or (maximum is not None and value > maximum):
        return _range(meta)
    return None


def _range(meta: Mapping[str, Any]) -> str:
    """The valid values of a tunable in words: 'a number of seconds >= 0', 'a whole number from 1 to 9'."""
    minimum = meta["minimum"]
    if meta["unit"] == "seconds" and meta["maximum"] is not None:
        what = f"a number of seconds from {minimum} to {meta['maximum']}"
    elif meta["unit"] == "seconds":
        what = f"a number of seconds {'>' if meta['above'] else '>='} {minimum}"
    elif meta["maximum"] is not None:
        what = f"a whole number from {minimum} to {meta['maximum']}"
    else:
        what = f"a whole number of {meta['unit']} >= {minimum}"
    return what if meta["none"] is None else f"{what}, or None to {meta['none']}"


def _suggestion(spec: dataclasses.Field[Any]) -> str:
    return f"e.g. {spec.name}={spec.default!r} (the default)"


DEFAULTS = Settings()  # the defaults, for the modules whose constants come from them


# -- command-line flags ---------------------------------------------------------------


def _flags(spec: dataclasses.Field[Any]) -> list[str]:
    return ["--" + spec.name.replace("_", "-"), *spec.metadata["flags"]]


def _parser_of(spec: dataclasses.Field[Any]) -> Callable[[str], float | None]:
    """The `type=` of a tunable's flag: text to a valid value, or ArgumentTypeError saying what it takes."""
    meta = spec.metadata
    seconds = meta["unit"] == "seconds"
    negative = f" (negative: {meta['none']})" if meta["none"] is not None else ""
    refusal = f"{_flags(spec)[0]} takes {_range({**meta, 'none': None})}{negative}, got {{text!r}}"

    def parse(text: str) -> float | None:
        try:
            value: float = float(text) if seconds else int(text) if text.isdigit() else math.nan
        except ValueError:
            value = math.nan  # refused below
        if meta["none"] is not None and value < 0:
            return None
        if _check(value, meta) is not None:
            raise argparse.ArgumentTypeError(refusal.format(text=text))
        return value

    parse.__name__ = spec.name  # argparse names the type in some errors
    return parse


def add_arguments(parser: argparse.ArgumentParser, *, exclude: Collection[str] = ()) -> None:
    """Add a flag for each Settings field (but those named in `exclude`) to `parser`.

    `--flush-interval SECONDS`, `--checkpoint-bytes BYTES`, ...: one per field,
    named after it, with its doc and default as help; `--grace` is
    `--shutdown-grace`, negative for None (serve forever). A flag not given
    leaves no attribute on the parsed namespace, so `from_arguments` keeps the
    base's value. Bad values are argparse errors ("--reader-slots takes a
    whole number from 1 to 4294967295, got '0'").
    """
    unknown = set(exclude) - {spec.name for spec in dataclasses.fields(Settings)}
    if unknown:
        raise ValueError(f"exclude names no Settings field: {sorted(unknown)}")
    group = parser.add_argument_group("coordinator settings", "tunables of the coordinator (protobase.settings)")
    for spec in dataclasses.fields(Settings):
        if spec.name in exclude:
            continue
        meta = spec.metadata
        none = f"; negative: {meta['none']}" if meta["none"] is not None else ""
        group.add_argument(
            *_flags(spec),
            dest=spec.name,
            type=_parser_of(spec),
            default=argparse.SUPPRESS,
            metavar=meta["unit"].upper(),
            help=f"{meta['doc']} (default {_shown(spec.default, meta['unit'])}{none})",
        )


def from_arguments(args: argparse.Namespace, base: Settings = DEFAULTS) -> Settings:
    """`base` with the value of every flag of `add_arguments` that `args` holds (those given)."""
    given = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(Settings) if hasattr(args, spec.name)}
    return dataclasses.replace(base, **given)


# -- documentation --------------------------------------------------------------------


def _shown(value: object, unit: str) -> str:
    """A default as the docs show it: '0.01 s', '64 MiB', '1024'."""
    if unit == "seconds":
        return f"{value} s"
    if unit == "bytes" and isinstance(value, int) and value >= 1024:
        for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value % size == 0:
                return f"{value // size} {name}"
    return str(value)


def markdown_table() -> str:
    """The table of every tunable, as docs/operations.md shows it (tests/test_settings.py keeps them equal)."""
    lines = ["| setting | flag | default | meaning |", "|---|---|---|---|"]
    for spec in dataclasses.fields(Settings):
        flags = ", ".join(f"`{flag}`" for flag in _flags(spec))
        lines.append(
            f"| `{spec.name}` | {flags} | {_shown(spec.default, spec.metadata['unit'])} | {spec.metadata['doc']} |"
        )
    for name, (unit, doc) in CONSTANTS.items():
        lines.append(f"| `{name}` | (constant) | {_shown(getattr(Settings, name), unit)} | {doc} |")
    return "\n".join(lines) + "\n"
