"""The value format: plain Python data to msgpack bytes and back, never pickle.

Owns how a value is written inside an atom. Supported: None, bool, int (any
size), float, str, bytes, list, tuple, dict, set/frozenset, datetime, date,
Decimal, UUID, and dataclasses registered with `register_dataclass`. Anything
else raises `EncodingError` naming the type and where in the value it sits.

Byte format: a msgpack object (bin type for bytes, maps with any key) in which
the types msgpack lacks are extension types (code: payload):

    1 REF       u64 little-endian: atom kind << 60 | AtomPointer   (a value stored in its own atom)

    2 TUPLE     msgpack array of the elements
    3 SET       msgpack array of the elements
    4 DATETIME  UTF-8 ISO 8601 text (offset kept when aware)
    5 DATE      UTF-8 ISO 8601 text
    6 DECIMAL   UTF-8 text of str(value)
    7 UUID      16 raw bytes
    8 DATACLASS msgpack [registered name, {field: value}]
    9 BIGINT    two's complement little-endian bytes, for ints outside msgpack's 64-bit range
   10 FROZENSET msgpack array of the elements

Values nest at most `MAX_DEPTH` keys below the database root (a container at
root['a']['b'] is 2 deep) and may not contain themselves; text must be valid
Unicode. `validate` checks all of this where a value is assigned, so a bad
value fails on the line that stores it, never deeper in the encoder or in the
coordinator.

Decoding is bounded (buffer, array and map sizes) and every decode failure is
a `CorruptionError`: bytes from shared memory or disk are never trusted. A
dataclass this process has not registered is an `EncodingError` instead:
nothing is corrupt, the reader lacks a registration. Registered dataclasses
decode frozen as their read-only variant (frozen.read_only_dataclass).

Runs in every process: clients encode the values of their commits and decode
what they read, the coordinator encodes atoms, recovery decodes the WAL.
Only the coordinator's writer produces Refs; a client's commit holding one
is refused (coordinator/writer.py, `decode_ops`). `decode` can keep small
plain records as their canonical bytes (`Packed`, `PlainRecords`) for the
coordinator, which stores them without building a dict.

Two implementations of the packing: `pack_python` and `unpack_python` here,
the oracle and the fallback, and their compiled twins in ccodec.c (with a
compiled `Ref`), which `pack` and `unpack` are unless PROTOBASE_PURE_PYTHON=1
or the build lacked a compiler (protobase/native.py). They write the same
bytes; the C code calls this module's hooks for the rare types.

Invariant: `decode(encode(v))` equals `v` (NaN aside) for every value
`validate` accepts, and encoding is deterministic: the same object always
gives the same bytes, which KeyMemo's memo of node keys relies on.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import re
import struct
import threading
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NamedTuple, TypedDict

import msgpack

from protobase import native
from protobase.core.frozen import FrozenDict, FrozenList, FrozenSet, dataclass_fields, read_only_dataclass
from protobase.errors import CorruptionError, EncodingError, format_path
from protobase.keyorder import check_text

__all__ = [
    "Ref",
    "Packed",
    "SortedEntries",
    "PlainRecords",
    "encode",
    "decode",
    "register_dataclass",
    "validate",
    "may_hold_refs",
    "array_header",
    "bin_header",
    "KeyMemo",
    "pack",
    "unpack",
    "pack_python",
    "packed_get",
    "unpacked",
    "packed_get_python",
    "packed_payloads",
    "packed_payloads_python",
    "refs",
    "refs_python",
    "unpack_python",
    "COMPILED",
    "storable",
    "MAX_ATOM_BYTES",
    "MAX_DEPTH",
]

EXT_REF, EXT_TUPLE, EXT_SET, EXT_DATETIME, EXT_DATE = 1, 2, 3, 4, 5
EXT_DECIMAL, EXT_UUID, EXT_DATACLASS, EXT_BIGINT, EXT_FROZENSET = 6, 7, 8, 9, 10

#: The largest payload a single atom may hold; bigger containers become trees.
MAX_ATOM_BYTES = 1 << 30

#: How many keys below the database root a container may sit. Every layer that walks
#: a value recurses once or a few times per level (validation, the encoder's extension
#: types, the coordinator's writer, decoding), so this keeps all of them far below
#: Python's recursion limit (1000) and msgpack's nesting limit (511 per packer).
MAX_DEPTH = 100

_REF = struct.Struct("<Q")  # kind << 60 | AtomPointer: a fixext8, 10 bytes in a node
_REF_MARKER_PATTERN = re.compile(re.escape(bytes([0xD7, EXT_REF])))  # how every encoded Ref starts: fixext8, its type
_REF_KIND_SHIFT = 60
_REF_POINTER_MASK = (1 << _REF_KIND_SHIFT) - 1
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1

_dataclasses_by_name: dict[str, type] = {}  # {registered name -> class}
_names_by_class: dict[type, str] = {}  # {class -> registered name}


class Ref:
    """A reference to a value stored in its own atom: (AtomPointer, atom kind)."""

    __slots__ = ("ptr", "kind")

    def __init__(self, ptr: int, kind: int) -> None:
        self.ptr = ptr  # AtomPointer of the referenced atom
        self.kind = kind  # atom kind, so a reader knows the shape without a fetch

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return hash(self.ptr)

    def __repr__(self) -> str:
        return f"Ref({self.ptr:#x}, kind={self.kind})"


class Packed:
    """A small plain record kept as its encoding: the coordinator's working form of it (`decode` with records).

    Its `payload` is byte for byte what `pack` gives for the dict it encodes,
    so the writer stores it as it is, and `pack` of a container holding one
    writes those bytes. Not hashable, like the dict it stands for.
    """

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Packed) and other.payload == self.payload

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Packed({self.payload!r})"


class SortedEntries:
    """A large map of a commit's ops whose keys are text in increasing order, as two lists (`decode` with records).

    An op's argument (`RECORDS_FROM_DEPTH`) of more than `DATA_KEYS_ABOVE`
    entries, such as a bulk load's records, decodes to one: the writer builds
    its tree from the lists as they are (already in canonical order), and no
    dict of a million keys is built and torn down on the way. Stands for the
    dict `dict(zip(keys, values))`; not hashable, like it.
    """

    __slots__ = ("keys", "values")

    def __init__(self, keys: list[str], values: list[Any]) -> None:
        self.keys = keys
        self.values = values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SortedEntries) and other.keys == self.keys and other.values == self.values

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"SortedEntries(<{len(self.keys)} entries>)"


class PlainRecords(NamedTuple):
    """Which maps `decode` keeps as their bytes (a Packed): the small plain records the writer stores as one atom.

    A map qualifies when it sits `RECORDS_FROM_DEPTH` or more containers deep,
    reached through arrays and maps only, has at most `entries` entries
    (at most `MAX_RECORD_ENTRIES`), ASCII text keys, and values that are
    None, bools, ints of 64 bits, floats, ASCII text or bytes of at most
    `text` bytes, and when its encoding takes at most `size` bytes and is
    canonical (what `pack` writes for the dict it decodes to).
    """

    entries: int
    text: int
    size: int


#: In a commit's ops ([[code, path, argument], ...]), an op's argument and what it holds.
RECORDS_FROM_DEPTH = 3
#: The entries above which an op's map argument may decode to a SortedEntries (ccodec.c: DATA_KEYS_ABOVE).
DATA_KEYS_ABOVE = 256
#: The most entries of a record `decode` keeps as a Packed (the compiled core compares keys pairwise).
MAX_RECORD_ENTRIES = 64


def register_dataclass(cls: type, name: str | None = None) -> type:
    """Allow instances of dataclass `cls` in stored values; usable as a decorator.

    Every process that reads the value must register the class under the same
    `name` (default: module.qualname) before decoding it, so a class defined in
    the script being run (`__main__`) needs an explicit `name`: other
    processes, pool workers included, have another `__main__`. Snapshots hand
    out instances of a read-only subclass (see frozen.read_only_dataclass).

    Raises TypeError for a non-dataclass, EncodingError for a class of
    `__main__` registered without a `name`.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"register_dataclass() needs a dataclass, got {cls!r}")
    if name is None and cls.__module__ in _SCRIPT_MODULES:
        raise EncodingError(
            f"cannot register dataclass {cls.__qualname__} of the script being run ({cls.__module__}) under "
            f"its default name {cls.__module__ + '.' + cls.__qualname__!r}: other processes (pool workers, "
            f"other programs) have another {cls.__module__} and could not read it back. Define it in an "
            f"importable module, or register it with name='...' in every process"
        )
    name = name or f"{cls.__module__}.{cls.__qualname__}"
    _dataclasses_by_name[name] = cls
    _names_by_class[cls] = name
    _names_by_class[read_only_dataclass(cls)] = name  # how snapshots hand its instances out
    return cls


_SCRIPT_MODULES = ("__main__", "__mp_main__")  # what the running script is called (by multiprocessing's spawn, too)


_new_tuple = tuple.__new__


def _ext(code: int, data: bytes) -> msgpack.ExtType:
    # msgpack.ExtType checks its fields in Python on every construction (0.66 us, and an
    # index leaf holds hundreds of tuples); ours are valid by construction.
    return _new_tuple(msgpack.ExtType, (code, data))


def _default_for(pack_nested: Callable[[Any], bytes]) -> Callable[[Any], object]:
    """msgpack's `default` for the types it lacks, packing extension payloads with `pack_nested`."""

    def default(value: Any) -> object:
        """What msgpack encodes in place of `value`, a type it lacks: an ExtType, or a plain dict or list."""
        kind = type(value)
        if kind is tuple:
            return _ext(EXT_TUPLE, pack_nested(list(value)))
        if kind is set or kind is FrozenSet:
            return _ext(EXT_SET, pack_nested(list(value)))
        if kind is frozenset:
            return _ext(EXT_FROZENSET, pack_nested(list(value)))
        if kind is FrozenDict:
            return dict(value)
        if kind is FrozenList:
            return list(value)
        if kind is int:  # only reached when outside msgpack's range
            return _ext(EXT_BIGINT, value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True))
        if kind is _dt.datetime:
            return _ext(EXT_DATETIME, value.isoformat().encode())
        if kind is _dt.date:
            return _ext(EXT_DATE, value.isoformat().encode())
        if kind is Decimal:
            return _ext(EXT_DECIMAL, str(value).encode())
        if kind is uuid.UUID:
            return _ext(EXT_UUID, value.bytes)
        if kind is Ref:
            return _ext(EXT_REF, _REF.pack(value.kind << _REF_KIND_SHIFT | value.ptr))
        if kind is Packed:  # the dict it stands for, which packs to its payload
            return unpack_python(value.payload, False, None, False)
        name = _names_by_class.get(kind)
        if name is not None:
            return _ext(EXT_DATACLASS, pack_nested([name, dataclass_fields(value)]))
        plain = getattr(value, "_protobase_plain_", None)  # transaction wrappers
        if plain is not None:
            value = plain()
            # msgpack does not call `default` again on what it returns: a set or dataclass still needs its
            # extension type
            kind = type(value)
            return default(value) if kind in (set, frozenset, tuple) or kind in _names_by_class else value
        raise TypeError(kind.__name__)

    return default


class _Packers(threading.local):
    """One msgpack Packer per nesting depth of extension payloads, per thread."""

    def __init__(self) -> None:
        self.stack: list[msgpack.Packer] = []
        self.depth = 0


_packers = _Packers()


def pack_python(value: Any) -> bytes:
    """The msgpack bytes of `value` with ProtoBase's extension types: the pure-Python oracle of ccodec.pack.

    Raises TypeError, ValueError, OverflowError or UnicodeEncodeError for what
    it cannot encode (`encode` turns them into an EncodingError).
    """
    # msgpack.packb builds a new Packer per call, and extension payloads (a tuple's
    # items, say) are packed inside the packing of their parent: an index leaf of 64
    # nested tuples made hundreds of Packers. Reuse one Packer per depth instead
    # (a Packer is not re-entrant, hence the stack; not shared, hence per thread).
    packers = _packers
    depth = packers.depth
    if depth == len(packers.stack):
        packers.stack.append(msgpack.Packer(default=_python_default, use_bin_type=True, strict_types=True))
    packers.depth = depth + 1
    try:
        return packers.stack[depth].pack(value)
    finally:
        packers.depth = depth


_python_default = _default_for(pack_python)


def array_header(length: int) -> bytes:
    """The msgpack header of an array of `length` items (their encodings follow it)."""
    if length < 16:
        return bytes((0x90 | length,))
    if length < 1 << 16:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


def bin_header(length: int) -> bytes:
    """The msgpack header of `length` bytes (use_bin_type): what `pack` writes before them."""
    if length < 1 << 8:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


class KeyMemo:
    """Encodes lists of keys, remembering the encodings of the tuple keys it has seen.

    For the coordinator: a copied tree node re-encodes every key it holds, and
    index entries such as (0, ("Paris", 7), "user1") cost microseconds each
    (every tuple is an extension type encoded through Python). A copy shares
    its keys with the original, so the memo is keyed by the key object itself
    (its id, the object kept alive in the memo): the very same object has the
    very same bytes, whereas merely equal keys may not (1 == 1.0 == True).
    Bounded: the memo starts afresh once it holds `limit` keys. Only for the
    pure-Python packer: the compiled one encodes a tuple faster than this finds it.
    """

    def __init__(self, limit: int = 1 << 16) -> None:
        self.limit = limit
        self.encoded: dict[int, tuple[tuple[Any, ...], bytes]] = {}  # {id(key) -> (key, its encoding)}

    def __call__(self, keys: list[Any]) -> bytes:
        """The encoding of the list `keys`, byte for byte what `encode(keys)` returns."""
        if not keys or type(keys[0]) is not tuple:
            return pack(keys)  # plain keys: one call encodes them all faster than any memo
        memo = self.encoded
        parts: list[bytes] = []
        for key in keys:
            entry = memo.get(id(key))
            if entry is not None and entry[0] is key:
                parts.append(entry[1])
                continue
            encoded = pack(key)
            if type(key) is tuple:
                if len(memo) >= self.limit:
                    memo.clear()
                memo[id(key)] = (key, encoded)
            parts.append(encoded)
        return array_header(len(keys)) + b"".join(parts)


def encode(value: Any) -> bytes:
    """Encode a value to bytes; raise EncodingError naming the bad type and its path."""
    try:
        return pack(value)
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError, RecursionError):
        validate(value)
        raise  # validate found nothing: a bug in this module, not in the value


_SCALARS = frozenset((type(None), bool, int, float, bytes, bytearray, Decimal, uuid.UUID, Ref, _dt.datetime, _dt.date))


def validate(value: Any, path: tuple[Any, ...] = ()) -> None:
    """Raise EncodingError if `value`, to be stored at key path `path`, holds anything the codec cannot store.

    That is: a type it does not know, text that is not valid Unicode, a
    container more than MAX_DEPTH keys below the root, or a value containing
    itself (which also holds for a transaction's wrapper of root['a'] stored
    at or below root['a'][...]: its contents would then hold it).
    """
    _validate(value, path, set())


def _validate(value: Any, path: tuple[Any, ...], enclosing: set[int]) -> None:
    """validate(), with the ids of the containers being walked that hold `value`."""
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is str:
        check_text(value, path)
        return
    if len(path) > MAX_DEPTH:
        raise EncodingError(
            f"cannot store a {kind.__qualname__} nested {len(path)} keys deep at {format_path(path)}: values "
            f"may nest at most {MAX_DEPTH} keys below the root; flatten it, e.g. store the deep part under "
            f"its own top-level key and refer to that key"
        )
    if id(value) in enclosing or _encloses(value, path):
        raise EncodingError(
            f"cannot store a value that contains itself: a {kind.__qualname__} reappears inside itself at "
            f"{format_path(path)}; stored values are trees of plain data, so store a key that refers to it instead"
        )
    enclosing.add(id(value))
    try:
        _validate_parts(value, kind, path, enclosing)
    finally:
        enclosing.discard(id(value))


def _encloses(value: Any, path: tuple[Any, ...]) -> bool:
    """True if `value` wraps (for a transaction) a container above `path`: stored at `path`, it would hold itself.

    Such a wrapper builds its contents when asked, so it is not yet among them
    when assigned: its path tells.
    """
    own = getattr(value, "_protobase_path_", None)
    return own is not None and len(own) < len(path) and path[: len(own)] == own


def _validate_parts(value: Any, kind: type, path: tuple[Any, ...], enclosing: set[int]) -> None:
    """Validate the parts of a container, dataclass or transaction wrapper; EncodingError for anything else."""
    if kind is dict or kind is FrozenDict:
        for key, item in value.items():
            _validate(key, path + (key,), enclosing)
            _validate(item, path + (key,), enclosing)
        return
    if kind in (list, tuple, FrozenList, set, frozenset, FrozenSet):
        for index, item in enumerate(value):
            _validate(item, path + (index,), enclosing)
        return
    if kind in _names_by_class:
        for name, item in dataclass_fields(value).items():
            _validate(item, path + (name,), enclosing)
        return
    plain = getattr(value, "_protobase_plain_", None)
    if plain is not None:
        _validate(plain(), path, enclosing)
        return
    hint = (
        "register it with protobase.register_dataclass()"
        if dataclasses.is_dataclass(value)
        else "store plain data (None, bool, int, float, str, bytes, list, tuple, dict, set, "
        "datetime, date, Decimal, UUID) or a registered dataclass"
    )
    raise EncodingError(f"cannot store a value of type {kind.__qualname__} at {format_path(path)}: {hint}")


class _RequiredOptions(TypedDict):
    raw: bool
    strict_map_key: bool
    ext_hook: Callable[[int, bytes], Any]


class _UnpackOptions(_RequiredOptions, total=False):
    """The keyword arguments `decode` passes to msgpack.unpackb."""

    object_hook: Callable[[dict[Any, Any]], Any]
    list_hook: Callable[[list[Any]], Any]


#: `decode`'s opaque_dataclasses: False, True, or a check called with each dataclass payload kept opaque.
Opaque = bool | Callable[[bytes], None]


@functools.lru_cache(maxsize=64)
def _options(frozen: bool, ref: Callable[[int, int], Any] | None, opaque_dataclasses: Opaque) -> _UnpackOptions:
    """unpackb options for one way of decoding, built once: decoding is on the cold read path."""

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == EXT_REF:
            (word,) = _REF.unpack(payload)
            ptr, kind = word & _REF_POINTER_MASK, word >> _REF_KIND_SHIFT
            return ref(ptr, kind) if ref is not None else Ref(ptr, kind)
        if code == EXT_TUPLE:
            return tuple(msgpack.unpackb(payload, **options))
        if code == EXT_SET:
            items = msgpack.unpackb(payload, **options)
            return FrozenSet(items) if frozen else set(items)
        if code == EXT_FROZENSET:
            items = msgpack.unpackb(payload, **options)
            return FrozenSet(items) if frozen else frozenset(items)
        if code == EXT_DATETIME:
            return _dt.datetime.fromisoformat(payload.decode())
        if code == EXT_DATE:
            return _dt.date.fromisoformat(payload.decode())
        if code == EXT_DECIMAL:
            return Decimal(payload.decode())
        if code == EXT_UUID:
            return uuid.UUID(bytes=payload)
        if code == EXT_BIGINT:
            value = int.from_bytes(payload, "little", signed=True)
            if _INT_MIN <= value <= _INT_MAX:  # encode only uses BIGINT outside msgpack's range
                raise CorruptionError(f"BIGINT extension holds {value}, which msgpack stores natively")
            return value

        if code == EXT_DATACLASS and opaque_dataclasses:
            if opaque_dataclasses is not True:
                opaque_dataclasses(bytes(payload))  # the caller's check of every dataclass it keeps opaque
            return msgpack.ExtType(code, bytes(payload))
        if code == EXT_DATACLASS:
            name, fields = msgpack.unpackb(payload, **options)
            cls = _dataclasses_by_name.get(name)
            if cls is None:  # the reader's omission: nothing is corrupt
                raise EncodingError(
                    f"stored value holds dataclass {name!r}, which this process has not registered; "
                    f"call protobase.register_dataclass() for it (under that name) before reading"
                )
            instance = cls(**fields)
            variant = read_only_dataclass(cls) if frozen else cls
            if variant is not cls:  # built by the class's own __init__, then made read-only
                object.__setattr__(instance, "__class__", variant)
            return instance
        raise CorruptionError(f"unknown msgpack extension type {code}")

    # unpackb bounds every string, array and map by the buffer length, which caps
    # the memory amplification of crafted input.
    options: _UnpackOptions = {"raw": False, "strict_map_key": False, "ext_hook": ext_hook}
    if frozen:
        options["object_hook"] = FrozenDict
        options["list_hook"] = FrozenList
    return options


def unpack_python(
    data: bytes | memoryview,
    frozen: bool,
    ref: Callable[[int, int], Any] | None,
    opaque_dataclasses: Opaque,
    records: PlainRecords | None = None,
) -> Any:
    """The value `pack_python` encoded as `data`: the pure-Python oracle of ccodec.unpack.

    Raises ValueError, TypeError and the like for bytes it did not make
    (`decode` turns them into a CorruptionError). With `records` (and not
    `frozen`), the plain records it describes come back as Packed: here by
    encoding the dicts decoded, in C by keeping their bytes, never decoded;
    and an op's large map of text keys in order as SortedEntries.
    """
    if records is not None and min(records) < 0:
        raise ValueError("unpack: the limits of records are counts of entries and bytes, >= 0")
    value = msgpack.unpackb(data, **_options(frozen, ref, opaque_dataclasses))
    if records is None or frozen:
        return value
    return _packed_records(value, records, 1)


def unpacked(value: Any) -> Any:
    """A Packed or a SortedEntries as the plain dict it stands for (a fresh one each time); anything else as it is."""
    if type(value) is Packed:
        return decode(value.payload, frozen=False)
    if type(value) is SortedEntries:
        return dict(zip(value.keys, value.values))
    return value


def packed_get_python(payload: bytes, key: str, default: Any, unknown: Any) -> Any:
    """The value for `key` of the record a Packed's `payload` encodes, else `default`.

    `unknown` when the payload is not a map of the shape decode keeps (the
    caller then decodes it whole); the compiled twin reads the one field,
    decoding nothing else: an index build over a million Packed records.
    """
    record = unpack_python(payload, False, None, False)
    return record.get(key, default) if type(record) is dict else unknown


def packed_payloads_python(values: list[Any]) -> list[bytes] | None:
    """The payloads of `values` if every one is a Packed (a bulk load's leaf of records), else None."""
    if all(type(value) is Packed for value in values):
        return [value.payload for value in values]
    return None


def refs_python(pointers: list[int], kind: int) -> list[Ref]:
    """A Ref of `kind` to each of `pointers`, in order."""
    return [Ref(ptr, kind) for ptr in pointers]


def _packed_records(value: Any, records: PlainRecords, depth: int) -> Any:
    """`value` (decoded `depth` containers deep) with every plain record in it a Packed."""
    kind = type(value)
    if kind is dict:
        if depth >= RECORDS_FROM_DEPTH and _is_plain_record(value, records):
            payload = pack_python(value)
            if len(payload) <= records.size:
                return Packed(payload)
        for key, item in value.items():
            if type(item) is dict or type(item) is list:
                value[key] = _packed_records(item, records, depth + 1)
        if depth == RECORDS_FROM_DEPTH and len(value) > DATA_KEYS_ABOVE and _in_text_order(value):
            return SortedEntries(list(value), list(value.values()))
    elif kind is list:
        for position, item in enumerate(value):
            if type(item) is dict or type(item) is list:
                value[position] = _packed_records(item, records, depth + 1)
    return value


def _in_text_order(mapping: dict[Any, Any]) -> bool:
    """Whether every key of `mapping` is a str, each greater than the one before it."""
    previous: str | None = None
    for key in mapping:
        if type(key) is not str or (previous is not None and not previous < key):
            return False
        previous = key
    return True


def _is_plain_record(record: dict[Any, Any], records: PlainRecords) -> bool:
    if len(record) > min(records.entries, MAX_RECORD_ENTRIES):
        return False
    for key, item in record.items():
        if type(key) is not str or not key.isascii():
            return False
        kind = type(item)
        if kind is str:
            if not item.isascii() or len(item) > records.text:
                return False
        elif kind is bytes:
            if len(item) > records.text:
                return False
        elif kind is int:
            if not _INT_MIN <= item <= _INT_MAX:
                return False
        elif kind is not float and kind is not bool and item is not None:
            return False
    return True


def _rare_extension(
    code: int, payload: bytes, frozen: bool, ref: Callable[[int, int], Any] | None, opaque_dataclasses: Opaque
) -> Any:
    """What the compiled unpacker leaves to Python (datetime, Decimal, UUID, dataclasses, big ints): decoded here."""
    return _options(frozen, ref, opaque_dataclasses)["ext_hook"](code, payload)


_compiled = native.load("protobase.core.ccodec")
if _compiled is not None:
    Ref = _compiled.Ref  # type: ignore[misc]  # the same class, compiled: decoding builds it without a call
    Packed = _compiled.Packed  # type: ignore[misc]  # the same, compiled
    SortedEntries = _compiled.SortedEntries  # type: ignore[misc]  # the same, compiled
    _compiled.configure(
        msgpack.ExtType, _default_for(_compiled.pack), _rare_extension, Decimal, uuid.UUID, _dt.datetime, _dt.date
    )
    pack: Callable[[Any], bytes] = _compiled.pack
    unpack: Callable[[bytes | memoryview, bool, Callable[[int, int], Any] | None, Opaque, PlainRecords | None], Any] = (
        _compiled.unpack
    )
    storable: Callable[[Any, int], bool] = _compiled.storable
    packed_get: Callable[[bytes, str, Any, Any], Any] = _compiled.packed_get
    packed_payloads: Callable[[list[Any]], list[bytes] | None] = _compiled.packed_payloads
    refs: Callable[[list[int], int], list[Ref]] = _compiled.refs
else:
    pack = pack_python
    unpack = unpack_python
    packed_get = packed_get_python
    packed_payloads = packed_payloads_python
    refs = refs_python

    def storable(value: Any, depth: int) -> bool:
        """True only if `value`, to be stored `depth` keys below the root, is plain data that `validate`
        and keyorder.check_key (on its dict keys and set elements) accept; False: ask them.

        The compiled core answers in one walk in C; without it there is no fast path, and
        validate() decides every value.
        """
        return False


#: Whether this process encodes and decodes with the compiled core (protobase.native).
COMPILED = _compiled is not None


def may_hold_refs(data: bytes | memoryview) -> bool:
    """False only if `data` (an encoded value) certainly holds no Ref; True may be a false alarm.

    A byte search, no decoding: every encoded Ref, however deeply nested
    (ext payloads embed their items' encodings), starts with the same two
    bytes. Those bytes inside a string or a number only cost a decode.
    """
    return _REF_MARKER_PATTERN.search(data) is not None  # a pattern searches a memoryview in place


def decode(
    data: bytes | memoryview,
    *,
    frozen: bool = True,
    ref: Callable[[int, int], Any] | None = None,
    opaque_dataclasses: Opaque = False,
    records: PlainRecords | None = None,
) -> Any:
    """Decode bytes made by `encode`.

    With `frozen`, containers come back as FrozenDict/FrozenList/FrozenSet
    and dataclasses as their read-only variants; otherwise as plain
    dict/list/set and the registered classes. `ref(ptr, kind)` turns an
    embedded Ref into the object to return in its place (default: the Ref).
    With `opaque_dataclasses` a dataclass comes back as the msgpack ExtType it
    was stored as, which `encode` writes back unchanged: the coordinator stores
    user dataclasses without ever importing or registering them. A callable
    `opaque_dataclasses` does so too, called first with each such payload (at
    any depth), so a caller checks them in the same pass (the coordinator
    refuses malformed ones and Refs hidden inside). `records` (with frozen
    False) keeps the small plain records it describes as Packed, never
    decoded: a bulk commit's million records cost the coordinator their bytes;
    and an op's large map of text keys in order comes back as SortedEntries.
    """

    try:
        return unpack(data, frozen, ref, opaque_dataclasses, records)
    except (CorruptionError, EncodingError):
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        UnicodeDecodeError,
        OverflowError,
        struct.error,
        ArithmeticError,
        msgpack.UnpackException,
    ) as error:  # ArithmeticError: decimal.InvalidOperation
        raise CorruptionError(f"cannot decode a stored value ({type(error).__name__}: {error})") from error
