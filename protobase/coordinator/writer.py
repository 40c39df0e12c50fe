"""Applying a commit's operations to the current root (coordinator only).

Owns how logical writes become atoms. A commit is a list of operations at key
paths (`root['users']['alice']['city'] = 'Paris'` is `SET ('users', 'alice',
'city')`). Each is applied to an in-memory working copy of the root by path
copying: containers on the path are copied (tree nodes through TreeWriter,
small values by decoding their atom), nothing else is touched. `flush` then
writes the dirty nodes and values bottom-up and returns the new root pointer.
The commonest op, a SET of one key at a path of dict trees under a clean
root, skips the decoded nodes: the nodes on its path are written at once,
with the one entry set in their bytes (`_spliced`); into an indexed
collection, the record's index entries are spliced into its index trees too.

Storage rule for a value: scalars sit inline in their parent; a container
small enough (`flat_dict_entries`, `flat_set_entries`, `flat_list_entries`
and `flat_max_bytes` of the Settings, protobase/settings.py) is one VALUE
atom holding its nested containers inline; a larger dict, set or list becomes
a tree whose entries follow the same rule. Strings and bytes longer than
`inline_bytes` get their own atom so leaves stay small. These limits only
choose a layout: a reader reads either, so a database written with other
limits reads the same.

Operations arrive from clients as bytes and are data: `decode_ops` refuses
any internal reference in them (the Ref extension type, which only this
module writes), so a client can never make the coordinator store a pointer.
It keeps their small plain records as their bytes (codec.Packed), which
become atoms as they are, and are decoded only where a later op of the
commit reads or changes them; an op's large map of text keys in order
arrives as two lists (codec.SortedEntries), from which its tree is built
without a dict.

Invariant: nothing here mutates a clean node or a decoded value another
commit could see; an operation that fails leaves the published root as it
was, since the working copy is simply dropped.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Generator, Iterable
from decimal import Decimal
from typing import Any

import msgpack

from protobase.coordinator.conflicts import KeyPath
from protobase.core import codec
from protobase.core.arena import DICT_BRANCH, DICT_LEAF, INDEXED, LIST_LEAF, SET_LEAF, VALUE, ArenaWriter, atom_size
from protobase.core.btree import (
    BRANCHES,
    LEAF_OF,
    TREE_KINDS,
    Node,
    TreeWriter,
    decode_node,
    empty,
    encode_node,
    merge_entries,
    sorted_keys,
)
from protobase.core.codec import Packed, PlainRecords, Ref, SortedEntries
from protobase.core.index import IndexedColl, collect_entries, index_entries, sorted_entries
from protobase.core.store import Store
from protobase.errors import CorruptionError, EncodingError, PathError
from protobase.keyorder import KEY_TYPES
from protobase.query.fields import MISSING
from protobase.query.source import IndexName
from protobase.settings import DEFAULTS, Settings
from protobase.wire.opcodes import (
    LIST_APPEND,
    LIST_INSERT,
    LIST_SET,
    OP_CREATE_INDEX,
    OP_DELETE,
    OP_DROP_INDEX,
    OP_INCR,
    OP_LIST,
    OP_SET,
    OP_SET_ADD,
)

__all__ = ["Writer", "decode_ops", "MERGE_AT_LEAST", "WRITE_THROUGH_AT_MOST"]

# Consecutive SETs of keys of one container from which `apply_all` merges them in one pass,
# bottom-up; fewer are applied one by one (a path copy each costs less than a merge's set-up).
MERGE_AT_LEAST = 16
# One-atom values a flush names for the committing client's write-through (`flat_pointer`). A bulk
# load writes millions: caching them all would only churn the client's cache, at ~1 us each.
WRITE_THROUGH_AT_MOST = 4096

Op = tuple[int, KeyPath, Any]  # (op code, key path, argument): one operation, as `apply` takes it


_DICT_TREE_KINDS = frozenset({DICT_LEAF, DICT_BRANCH})  # a Ref of these kinds holds a dict tree
# Leaf values that are already in their stored form (the common case on every flush).
_STORED_AS_IS = frozenset({Ref, int, float, bool, type(None), Decimal, datetime.datetime, datetime.date, uuid.UUID})
# Values a record may hold and still be written by `_flat_record`'s fast path (str and bytes: when short).
_FLAT_SCALARS = frozenset({int, float, bool, type(None)})
# What the packer raises for a value it cannot encode as it is (a Node inside; codec.encode's list).
_PACK_ERRORS = (TypeError, ValueError, OverflowError, UnicodeEncodeError, RecursionError)


def _sum(current: Any, n: int | float, key: Any) -> int | float:
    """An increment's result: the number stored at `key` plus `n`; anything else there is refused."""
    if type(current) is not int and type(current) is not float:
        shown = "a container" if type(current) in (Ref, Node, IndexedColl, Packed) else f"{type(current).__name__}"
        raise PathError(f"cannot increment {shown} at key {key!r}: incr() adds to a number (or a missing key)")
    return current + n


class _Declined(Exception):
    """A splice's entry cannot be written in the nodes' bytes: path copying applies the op (Writer._spliced)."""


class _ReferenceFromClient(Exception):
    """Raised inside decoding when a client's bytes hold a Ref; `decode_ops` turns it into EncodingError."""


def decode_ops(ops_bytes: bytes, records: PlainRecords | None = None) -> object:
    """A commit's operations as a client sent them, [[code, path, argument], ...]: data only, of any shape.

    With `records` (a Writer's `records`), the small plain records in them
    come back as codec.Packed, their bytes, which the writer stores as they
    are: a bulk load's records are never decoded. An op's map of more than
    codec.DATA_KEYS_ABOVE text keys in order comes back as a
    codec.SortedEntries (`Writer._working` turns it into its tree).

    The coordinator stores what comes back, so a Ref in it would be a pointer
    the coordinator never wrote: dangling after a compaction, or into any
    atom at all. A Ref however encoded (msgpack has several encodings for one
    extension) and wherever nested, inside the bytes of a dataclass (which
    the coordinator keeps opaque) too, fails the whole commit here, before
    anything is applied. Raises EncodingError for that and for a malformed
    dataclass, CorruptionError for bytes that are not msgpack at all.
    """
    try:
        # One pass: every dataclass payload met is checked by _check_dataclass as it is decoded.
        ops = codec.decode(
            ops_bytes, frozen=False, opaque_dataclasses=_check_dataclass, ref=_refuse_reference, records=records
        )
    except _ReferenceFromClient:
        raise EncodingError(
            f"commit refused, nothing was applied: a value in it holds an internal reference (msgpack extension "
            f"type {codec.EXT_REF}, which only the coordinator writes); internal reference types cannot be "
            f"stored: send plain values"
        ) from None
    return ops


def _refuse_reference(ptr: int, kind: int) -> Any:
    raise _ReferenceFromClient


def _check_dataclass(payload: bytes) -> None:
    """A dataclass payload must be [registered name, {field: value}] with plain values (their Refs refused)."""
    try:  # the dataclasses inside this one are checked on the way, by this function
        fields = codec.decode(payload, frozen=False, opaque_dataclasses=_check_dataclass, ref=_refuse_reference)
    except CorruptionError:
        fields = None
    if type(fields) is not list or len(fields) != 2 or type(fields[0]) is not str or type(fields[1]) is not dict:
        raise EncodingError(
            "commit refused, nothing was applied: a dataclass value in it is malformed (its "
            "payload must be [registered name, {field: value}] in protobase's value format); "
            "send values encoded by protobase"
        )


class Writer:
    """Builds new roots from operations and writes their atoms."""

    def __init__(self, arena: ArenaWriter, store: Store, settings: Settings = DEFAULTS) -> None:
        self.arena = arena
        self.store = store  # decodes the coordinator's own reads of clean atoms
        self.access = TreeWriter(store.node, on_discard=self.retire)
        # {container type -> entries above which it is a tree, not one atom}
        self.flat_limit: dict[type, int] = {
            dict: settings.flat_dict_entries,
            set: settings.flat_set_entries,
            frozenset: settings.flat_set_entries,
            list: settings.flat_list_entries,
        }
        self.flat_max_bytes = settings.flat_max_bytes  # a container whose atom would be larger becomes a tree
        self.inline_bytes = settings.inline_bytes  # longer str/bytes get their own atom
        # An encoded container this short holds no str or bytes over inline_bytes, and no
        # container over its flat limit (every entry takes a byte at least, a dict's two),
        # so it is one atom exactly as encoded (Writer._flat_record).
        self.surely_flat_bytes = min(
            settings.inline_bytes,
            settings.flat_max_bytes,
            settings.flat_list_entries,
            settings.flat_set_entries,
            2 * settings.flat_dict_entries + 1,
        )
        # The records decode_ops may keep as their bytes: exactly those `write_value` stores as one
        # atom holding what `pack` gives (see _plain_record).
        self.records = PlainRecords(settings.flat_dict_entries, settings.inline_bytes, settings.flat_max_bytes)
        self.flat_written: dict[int, int] = {}  # {id(value) -> ptr} of one-atom values, since `begin`
        self.refs_made = 0  # Refs produced while inlining, to tell one-atom values apart
        # Encodings of index entries, which every copy of their node repeats; the compiled packer
        # encodes a tuple faster than a memo finds it.
        self.key_memo = None if codec.COMPILED else codec.KeyMemo()
        self.discarded_bytes = 0  # bytes of atoms that later roots no longer use (an estimate: see retire)

    def retire(self, ptr: int) -> None:
        """Count the atom at `ptr` as no longer used by the working root.

        A lower bound of the garbage: a dropped subtree counts only its root.
        Read past the bytes cache: a retired atom is the last thing to keep there.
        """
        self.discarded_bytes += atom_size(len(self.store.reader.atom(ptr)[1]))

    # -- applying -------------------------------------------------------------

    def begin(self) -> None:
        """Start a new working root: forget where the last one's values were written (`flat_pointer`).

        Values are written while applying (`_spliced`) as well as by `flush`,
        so the names are kept from here, not from the flush: a name left from
        an earlier root could match a new value that reuses its object's id.
        """
        self.flat_written.clear()

    def apply(self, root: Any, code: int, path: KeyPath, argument: Any) -> Any:
        """Apply one operation to the working root; return the new working root."""
        if not path:
            raise PathError("an operation needs a non-empty key path")
        argument = self._working(argument)
        if type(root) is int and (code == OP_SET or code == OP_INCR):
            spliced = self._spliced(root, path, code, argument)
            if spliced is not None:
                return spliced
        return self._apply_in(root, path, code, argument)

    def _spliced(self, root: int, path: KeyPath, code: int, argument: Any) -> int | None:
        """The root after a SET or INCR at `path` written in the nodes' bytes, if the path qualifies; else None.

        The common single-key write, at a path of dict trees under a clean
        root, needs no decoded node: the searcher copies each node on the
        path with one entry set (Searcher.splice, the same bytes as copying,
        changing and encoding the nodes), and the new root is clean at once.
        A record of an indexed collection is written so too, its index
        entries with it (`_spliced_into_collection`); a full leaf that takes
        a new key is written as its two halves. Anything else (a split of a
        tree's root or of a branch, a flat dict on the way, an index entry
        whose node would merge) is applied by path copying.
        """

        def new_entry(old: Any) -> bytes:
            return codec.pack(self.write_value(self._updated(code, old, argument, path)))

        def new_collection(old: Any) -> bytes:
            return self._spliced_into_collection(old, path, code, argument)

        try:
            spliced = self._splice(root, path, new_entry)
            if spliced is None and self._collection_holds(root, path):
                spliced = self._splice(root, path[:-1], new_collection)
        except _Declined:
            return None
        return spliced

    def _splice(self, root: int, path: KeyPath, make_entry: Callable[[Any], bytes]) -> int | None:
        """Searcher.splice at `path` under `root`, its garbage counted: the new root, or None."""
        spliced = self.store.searcher.splice(root, path, make_entry, self.arena.append, codec.pack, MISSING)
        if spliced is None:
            return None
        new_root, old, retired = spliced
        if old is not MISSING:
            self.access.discard_value(old)
        self._count_retired(retired)
        return new_root

    def _count_retired(self, retired: list[tuple[int, int]]) -> None:
        """Count the nodes a splice wrote again ([(pointer, payload length)]) as garbage, as `retire` does."""
        for _, length in retired:
            self.discarded_bytes += atom_size(length)

    @staticmethod
    def _updated(code: int, old: Any, argument: Any, path: KeyPath) -> Any:
        """What a spliced SET or INCR puts over the slot `old` (MISSING for a new key), not yet written."""
        if code == OP_INCR:
            return _sum(0 if old is MISSING else old, argument, path[-1])
        return argument

    def _collection_holds(self, root: int, path: KeyPath) -> bool:
        """Whether `path[:-1]` leads from `root` through dict trees to an indexed collection."""
        ptr = root
        for depth, key in enumerate(path[:-1]):
            if type(key) not in KEY_TYPES or not ptr:
                return False
            try:
                slot = self.store.lookup(ptr, key, DICT_LEAF)
            except KeyError:
                return False
            if type(slot) is not Ref:
                return False
            if slot.kind == INDEXED:
                return depth == len(path) - 2
            if slot.kind not in _DICT_TREE_KINDS:
                return False
            ptr = slot.ptr
        return False

    def _spliced_into_collection(self, old: Any, path: KeyPath, code: int, argument: Any) -> bytes:
        """The new Ref of the indexed collection `old` with the record at `path[-1]` spliced into its records.

        The record's index entries that change are removed from and added to
        each index in its nodes' bytes (Searcher.splice_set), after a dry run
        made sure every index qualifies: one that would merge a node or split
        a branch declines the whole splice (_Declined) before anything is
        written, and path copying applies the op. The atoms are the ones path copying
        writes, in its order: the record, the records' tree, each index, then
        the collection.
        """
        collection = _decode_indexed(self.store.atom(old.ptr)[1])
        key = path[-1]
        upkeep: dict[IndexName, tuple[int, list[Any], list[bool]]] = {}  # {field -> (root, entries, each added?)}

        def record_entry(record: Any) -> bytes:
            value = self._updated(code, record, argument, path)
            before = MISSING if record is MISSING else self._readable(record)
            after = self._readable(value)
            for field, root in collection.indexes.items():
                old_entries = index_entries(before, field, self._readable)
                new_entries = index_entries(after, field, self._readable)
                if old_entries == new_entries:
                    continue
                entries = sorted_keys([(kind, item, key) for kind, item in old_entries ^ new_entries])
                adding = [(kind, item) in new_entries for kind, item, _ in entries]
                if type(root) is not int or not self.store.searcher.splice_set(root, entries, adding, None, codec.pack):
                    raise _Declined
                upkeep[field] = (root, entries, adding)
            return codec.pack(self.write_value(value))

        data = self._splice(collection.data, (key,), record_entry) if type(collection.data) is int else None
        if data is None:
            raise _Declined
        collection.data = data
        for field, (root, entries, adding) in upkeep.items():
            spliced = self.store.searcher.splice_set(root, entries, adding, self.arena.append, codec.pack)
            if spliced is None:  # its dry run qualified it, on the same immutable atoms
                raise CorruptionError(f"the tree of index {field!r} changed while it was being written")
            collection.indexes[field], retired = spliced
            self._count_retired(retired)
        return codec.pack(Ref(self.arena.append(INDEXED, self._indexed_payload(collection)), INDEXED))

    def apply_all(self, root: Any, ops: Iterable[Op]) -> Any:
        """Apply a commit's operations in order; return the new working root.

        The same result as `apply` op by op, but a run of at least
        `MERGE_AT_LEAST` consecutive SETs of keys of one container (a bulk
        load: `users.update(records)`, or many `users[key] = record` in one
        transaction) is merged into it in one pass, bottom-up (btree/build.py),
        its indexes too, instead of path-copying it once per key.
        """
        run: list[Op] = []  # consecutive SETs into the container at run[0]'s path[:-1]
        for op in ops:
            code, path, argument = op
            if code == OP_SET and path:
                if run and path[:-1] != run[0][1][:-1]:
                    root = self._apply_run(root, run)
                    run = []
                run.append(op)
                continue
            root = self._apply_run(root, run)
            run = []
            root = self.apply(root, code, path, argument)
        return self._apply_run(root, run)

    def _working(self, argument: Any) -> Any:
        """An op's argument as the writer works on it: a SortedEntries (decode_ops) as the tree or dict it stands for.

        Its lists are in canonical order already, so the tree is built from
        them as they are, without the dict. Built afresh on each call: a
        commit replayed onto a compaction's copy gets a tree of its own.
        """
        if type(argument) is not SortedEntries:
            return argument
        if len(argument) > self.flat_limit[dict]:
            return self.access.build(DICT_LEAF, argument.keys, argument.values)
        return dict(zip(argument.keys, argument.values))

    def _apply_run(self, root: Any, run: list[Op]) -> Any:
        """Apply SETs into one container: merged in one pass when they are many and it is a dict."""
        parent = run[0][1][:-1] if run else ()
        if len(run) < MERGE_AT_LEAST or not self._mergeable(root, parent):
            for code, path, argument in run:
                root = self.apply(root, code, path, argument)
            return root
        batch: dict[Any, Any] = {}  # {key -> value}: the last write wins, the first key object stays
        for _, path, argument in run:
            batch[path[-1]] = self._working(argument)
        return self._apply_at(root, parent, lambda target: self._merge_into(target, batch))

    def _mergeable(self, root: Any, parent: KeyPath) -> bool:
        """Whether the container at `parent` is a dict (tree, flat, or indexed) reached through no index.

        Read-only: nothing is copied, so a refusal leaves no trace. An indexed
        collection on the way keeps its records' index entries op by op.
        """
        target = root
        try:
            for key in parent:
                if type(target) is IndexedColl:
                    return False
                target = self._container(self._child(target, key, parent), parent)
        except PathError:
            return False  # applied op by op, which raises the error naming the op
        if type(target) is IndexedColl or type(target) is dict:
            return True
        return (type(target) is Node or type(target) is int) and self._leaf_kind(target) == DICT_LEAF

    def _apply_at(self, container: Any, parent: KeyPath, change: Callable[[Any], Any]) -> Any:
        """`change` applied to the container at `parent` below `container`, by path copying."""
        if not parent:
            return change(container)
        key = parent[0]
        child = self._container(self._child(container, key, parent), parent)
        return self._assign(container, key, self._apply_at(child, parent[1:], change), parent)

    def _merge_into(self, target: Any, batch: dict[Any, Any]) -> Any:
        """The dict `target` with every key of `batch` assigned (what `_mergeable` accepted)."""
        target = self._open(target)
        if type(target) is dict:
            target.update(batch)
            return target
        if type(target) is IndexedColl:
            return self._merge_indexed(target, batch)
        keys = sorted_keys(batch)
        return merge_entries(self.access, target, keys, [batch[key] for key in keys], DICT_LEAF)[0]

    def _merge_indexed(self, collection: IndexedColl, batch: dict[Any, Any]) -> IndexedColl:
        """`_merge_into` for an indexed collection: records merged, then each index's entries in one pass."""
        keys = sorted_keys(batch)
        values = [batch[key] for key in keys]
        data, replaced_pairs = merge_entries(self.access, collection.data, keys, values, DICT_LEAF)
        replaced = dict(replaced_pairs)  # {key -> the stored value it had}
        indexes: dict[IndexName, Node | int] = {}
        for field, root in collection.indexes.items():
            added = collect_entries(((key, batch[key]) for key in keys if key not in replaced), field, self._readable)
            removed: list[tuple[int, Any, Any]] = []
            for key, old in replaced.items():  # overwritten records: only the entries that changed
                before = index_entries(self._readable(old), field, self._readable)
                after = index_entries(self._readable(batch[key]), field, self._readable)
                removed.extend((kind, item, key) for kind, item in before - after)
                added.extend((kind, item, key) for kind, item in after - before)
            for entry in removed:
                root = self.access.remove(root, entry, SET_LEAF)[0]
            if added:
                root = merge_entries(self.access, root, sorted_keys(added), None, SET_LEAF)[0]
            indexes[field] = root
        return IndexedColl(data, indexes)

    def _apply_in(self, container: Any, path: KeyPath, code: int, argument: Any, depth: int = 0) -> Any:
        """Apply the operation at `path` to `container`, which holds `path[depth]`.

        The whole path goes down with it, so an error names the path the
        client wrote, not what is left of it.
        """
        container = self._open(container)
        if type(container) is IndexedColl:
            return self._apply_indexed(container, path, code, argument, depth)
        key = path[depth]
        if depth + 1 < len(path):
            child = self._container(self._child(container, key, path), path)
            changed = self._unchanged(self._apply_in(child, path, code, argument, depth + 1))
            return self._assign(container, key, changed, path)
        if code == OP_SET:
            return self._assign(container, key, argument, path)
        if code == OP_DELETE:
            return self._delete(container, key, path)
        if code == OP_INCR:
            return self._assign(container, key, self._incremented(container, key, argument, path), path)
        target = self._container(self._child(container, key, path), path)
        if code == OP_LIST:
            target = self._list_ops(target, argument, path)
        elif code in (OP_CREATE_INDEX, OP_DROP_INDEX):
            target = self._index_op(target, code == OP_CREATE_INDEX, argument, path)
        else:
            target = self._set_ops(target, argument, code == OP_SET_ADD, path)
        return self._assign(container, key, self._unchanged(target), path)

    def _incremented(self, container: Any, key: Any, n: int | float, path: KeyPath) -> int | float:
        """The latest number at `key` plus `n` (OP_INCR): a missing key counts as 0, anything else is refused."""
        try:
            current = self._child(container, key, path)
        except PathError:
            current = 0  # missing (if the container cannot hold `key`, assigning it says so)
        return _sum(current, n, key)

    # -- indexed collections ----------------------------------------------------

    def _apply_indexed(
        self, collection: IndexedColl, path: KeyPath, code: int, argument: Any, depth: int
    ) -> IndexedColl:
        """Apply an operation inside an indexed collection (at `path[depth]`), keeping its indexes in step."""
        key = path[depth]
        before = self._record_entries(collection, key)
        updated = IndexedColl(self._apply_in(collection.data, path, code, argument, depth), dict(collection.indexes))
        after = self._record_entries(updated, key)
        for field, root in updated.indexes.items():
            for kind, value in before[field] - after[field]:
                root = self.access.remove(root, (kind, value, key), SET_LEAF)[0]
            for kind, value in after[field] - before[field]:
                root = self.access.assign(root, (kind, value, key), None, SET_LEAF)[0]
            updated.indexes[field] = root
        return updated

    def _record_entries(self, collection: IndexedColl, key: Any) -> dict[IndexName, set[tuple[int, Any]]]:
        """{field -> the (kind, value) entries of the record at `key`} (empty sets when absent)."""
        try:
            record = self._readable(self.access.lookup(collection.data, key))
        except KeyError:
            record = MISSING
        return {field: index_entries(record, field, self._readable) for field in collection.indexes}

    def _readable(self, slot: Any) -> Any:
        """A stored slot as something `field_value` and `entries` can read (trees through readers)."""
        kind = type(slot)
        if kind is Ref:
            if slot.kind == VALUE:
                return codec.decode(self.store.atom(slot.ptr)[1], frozen=False, opaque_dataclasses=True)
            slot = self._open(slot)  # a tree: its pointer (an int here is a pointer), or an empty Node
            return _TreeReader(self, slot.data if type(slot) is IndexedColl else slot)
        if kind is Node:
            return _TreeReader(self, slot)
        if kind is IndexedColl:
            return _TreeReader(self, slot.data)
        if kind is Packed:
            return codec.unpacked(slot)
        return slot

    def _index_op(self, target: Any, create: bool, field: IndexName, path: KeyPath) -> Any:
        target = self._open(target)
        if type(target) is not IndexedColl:
            if not create:
                return target  # no index to drop
            target = IndexedColl(self._as_dict_tree(target, path), {})
        indexes = dict(target.indexes)
        if not create:
            indexes.pop(field, None)
            # Without indexes it is a plain dict tree again: a Node, since an int in a slot is a number.
            return IndexedColl(target.data, indexes) if indexes else self.access.node(target.data, DICT_LEAF)

        if field not in indexes:
            found = collect_entries(self.access.items(target.data), field, self._readable)
            indexes[field] = self.access.build(SET_LEAF, sorted_entries(found), None)
        return IndexedColl(target.data, indexes)

    def _as_dict_tree(self, target: Any, path: KeyPath) -> Node | int:
        if type(target) is Node or type(target) is int:
            if self._leaf_kind(target) == DICT_LEAF:
                return target
        elif isinstance(target, dict):
            tree = self._as_tree(target, force=True)
            assert tree is not None  # forced, and a dict
            return tree
        raise PathError(f"an index needs a dict of records at {path!r}, found a {type(target).__name__}")

    def _open(self, slot: Any) -> Any:
        """The working form of a slot: a Node for trees, a fresh plain copy for values."""
        if type(slot) is Ref:
            if slot.kind in TREE_KINDS:
                return slot.ptr if slot.ptr else _empty_like(slot.kind)
            if slot.kind == INDEXED:
                kind, payload = self.store.atom(slot.ptr)
                return _decode_indexed(payload)
            kind, payload = self.store.atom(slot.ptr)
            return codec.decode(payload, frozen=False, opaque_dataclasses=True)
        if type(slot) is Packed:
            return codec.unpacked(slot)  # a record of this commit, written into
        return slot

    def _unchanged(self, container: Any) -> Any:
        """A container an op gave back, in a form its parent can hold.

        An op that changes nothing (a delete of a missing key, a drop of an
        absent index, a discard of a missing element) gives back the clean
        tree it opened: its pointer, which a parent would store as a number,
        the records lost. It goes back as its Node.
        """
        return self.access.node(container, DICT_LEAF) if type(container) is int else container

    def _container(self, slot: Any, path: KeyPath) -> Any:
        """A stored slot opened to be descended into or changed; refused if it holds a number.

        In working form an int is a tree's pointer, but in a slot it is a
        number: opening one as a container would let a client graft any atom
        (or read garbage at any offset) by storing its offset and writing below it.
        """
        if type(slot) is int:
            raise PathError(f"no container at {path!r}: a key on the way holds a number, not a container")
        return self._open(slot)

    def _child(self, container: Any, key: Any, path: KeyPath) -> Any:
        container = self._open(container)
        try:
            if type(container) is Node or type(container) is int:
                kind = self._leaf_kind(container)
                if kind == LIST_LEAF:
                    return self.access.at(container, self._index(container, key, path))
                return self.access.lookup(container, key, kind)
            if isinstance(container, (dict, list)):
                return container[key]
        except (KeyError, IndexError, TypeError):
            pass
        raise PathError(f"no container at {path!r}: the key is missing")

    def _leaf_kind(self, tree: Node | int) -> int:
        node = self.access.node(tree, DICT_LEAF)
        return LEAF_OF[node.kind]

    def _index(self, tree: Node | int, index: Any, path: KeyPath) -> int:
        return _list_index(self.access.count(tree, LIST_LEAF), index, path)

    def _assign(self, container: Any, key: Any, value: Any, path: KeyPath) -> Any:
        container = self._open(container)
        if type(container) is Node or type(container) is int:
            kind = self._leaf_kind(container)
            if kind == DICT_LEAF:
                return self.access.assign(container, key, value)[0]
            if kind == LIST_LEAF:
                return self.access.set_at(container, self._index(container, key, path), value)
        elif isinstance(container, dict):
            container[key] = value
            return container
        elif isinstance(container, list):
            container[_list_index(len(container), key, path)] = value
            return container
        raise PathError(f"cannot set a key inside a {type(container).__name__} at {path!r}")

    def _delete(self, container: Any, key: Any, path: KeyPath) -> Any:
        container = self._open(container)
        try:
            if type(container) is Node or type(container) is int:
                kind = self._leaf_kind(container)
                if kind == LIST_LEAF:
                    return self.access.delete_at(container, self._index(container, key, path))[0]
                return self.access.remove(container, key, kind)[0]
            if isinstance(container, list):
                del container[_list_index(len(container), key, path)]
                return container
            if isinstance(container, dict):
                del container[key]
                return container
        except KeyError:
            return container  # already gone: deleting is idempotent
        raise PathError(f"cannot delete a key inside a {type(container).__name__} at {path!r}")

    def _list_ops(self, target: Any, ops: list[list[Any]], path: KeyPath) -> Any:
        target = self._open(target)
        is_tree = type(target) is Node or type(target) is int
        if not is_tree and not isinstance(target, list):
            raise PathError(f"list operation on a {type(target).__name__} at {path!r}")
        for code, index, value in ops:
            if is_tree:
                target = self._tree_list_op(target, code, index, value, path)
            elif code == LIST_APPEND:
                target.append(value)
            elif code == LIST_SET:
                target[_list_index(len(target), index, path)] = value
            elif code == LIST_INSERT:
                target.insert(index, value)  # clamped to the ends, as list.insert does
            else:
                del target[_list_index(len(target), index, path)]
        return target

    def _tree_list_op(self, tree: Any, code: int, index: int, value: Any, path: KeyPath) -> Node:
        length = self.access.count(tree, LIST_LEAF)
        if code == LIST_APPEND:
            return self.access.insert_at(tree, length, value)
        if code == LIST_INSERT:
            return self.access.insert_at(tree, max(0, min(length, index if index >= 0 else length + index)), value)
        if code == LIST_SET:
            return self.access.set_at(tree, _list_index(length, index, path), value)
        return self.access.delete_at(tree, _list_index(length, index, path))[0]

    def _set_ops(self, target: Any, elements: list[Any], adding: bool, path: KeyPath) -> Any:
        target = self._open(target)
        if type(target) is Node or type(target) is int:
            if adding and len(elements) >= MERGE_AT_LEAST:
                return merge_entries(self.access, target, sorted_keys(set(elements)), None, SET_LEAF)[0]
            for element in elements:
                if adding:
                    target = self.access.assign(target, element, None, SET_LEAF)[0]
                else:
                    try:
                        target = self.access.remove(target, element, SET_LEAF)[0]
                    except KeyError:
                        pass
            return target
        if not isinstance(target, (set, frozenset)):
            raise PathError(f"set operation on a {type(target).__name__} at {path!r}")
        target = set(target)
        if adding:
            target.update(elements)
        else:
            target.difference_update(elements)
        return target

    # -- writing ----------------------------------------------------------------

    def flush(self, root: Any) -> int:
        """Write everything dirty under the working root; return the root pointer."""
        return self._flush_tree(root)

    def _flush_tree(self, root: Node | int) -> int:
        return self.access.flush(root, self._write_node, self.write_value, _STORED_AS_IS, self._write_leaf)

    def _write_leaf(self, values: list[Any]) -> list[Any]:
        """A leaf's values in their stored form: `write_value` of each, small records in one copy.

        A bulk load's leaves hold 64 new records each, kept as their bytes by
        decode_ops (Packed); appending their atoms together
        (`ArenaWriter.append_many`) saves most of the per-record cost. Once the
        flush has named its `WRITE_THROUGH_AT_MOST` values, such a leaf takes no
        Python step per record at all (`codec.packed_payloads`, `codec.refs`).
        The loop inlines `_flat_record`'s test for the records that were decoded.
        """
        if len(self.flat_written) >= WRITE_THROUGH_AT_MOST:  # no more values to name (flat_pointer)
            records = codec.packed_payloads(values)
            if records is not None:  # every value a record as the client sent it: one call for the leaf
                return codec.refs(self.arena.append_many(VALUE, records), VALUE)
        stored = values[:]
        flat: list[int] = []  # positions of the small records
        payloads: list[bytes] = []
        dict_limit, surely_flat_bytes, pack = self.flat_limit[dict], self.surely_flat_bytes, codec.pack
        for position, value in enumerate(values):
            kind = type(value)
            if kind is Packed:  # a bulk load's records, as the client sent them
                flat.append(position)
                payloads.append(value.payload)
                continue
            if kind in _STORED_AS_IS:  # the untouched entries of a copied leaf
                continue
            if kind is dict and len(value) <= dict_limit:
                try:
                    payload = pack(value)
                except _PACK_ERRORS:  # a working tree inside, or a value the general path names
                    payload = b""
                if payload and (len(payload) <= surely_flat_bytes or self._plain_record(value, payload)):
                    flat.append(position)
                    payloads.append(payload)
                    continue
            stored[position] = self.write_value(value)
        if payloads:
            written = self.flat_written
            for position, ptr in zip(flat, self.arena.append_many(VALUE, payloads)):
                if len(written) < WRITE_THROUGH_AT_MOST:
                    written[id(values[position])] = ptr
                stored[position] = Ref(ptr, VALUE)
        return stored

    def flat_pointer(self, value: Any) -> int | None:
        """Where the last flush stored `value`, if it became exactly one VALUE atom.

        Known for the first `WRITE_THROUGH_AT_MOST` such values of a flush only
        (None for the others): a write-through is a cache warm-up, not a duty.
        """
        return self.flat_written.get(id(value))

    def _write_node(self, node: Node) -> int:
        ptr = self.arena.append(node.kind, encode_node(node, self.key_memo))
        # The node is now clean and holds exactly what a decode would give back:
        # cache it, so the next commit on this path does not decode it again.
        node.ptr = ptr
        self.store.objects.put(ptr, node)
        return ptr

    def write_value(self, value: Any) -> Any:
        """Store a leaf value: a scalar inline, or a Ref to the atom or tree holding it."""
        kind = type(value)
        if kind in _STORED_AS_IS:
            return value
        if kind is Packed or (kind is dict and len(value) <= self.flat_limit[dict]):
            payload = value.payload if kind is Packed else self._flat_record(value)
            if payload is not None:
                ptr = self.arena.append(VALUE, payload)
                if len(self.flat_written) < WRITE_THROUGH_AT_MOST:
                    self.flat_written[id(value)] = ptr
                return Ref(ptr, VALUE)
        if kind is Node:
            return Ref(self._flush_tree(value), value.kind)
        if kind is IndexedColl:
            return Ref(self.arena.append(INDEXED, self._indexed_payload(value)), INDEXED)
        if kind in (str, bytes):
            if len(value) <= self.inline_bytes:
                return value
            return Ref(self.arena.append(VALUE, codec.encode(value)), VALUE)
        if kind in self.flat_limit or kind is tuple or kind is msgpack.ExtType:
            tree = self._as_tree(value)
            if tree is not None:
                return Ref(self._flush_tree(tree), tree.kind)
            refs_before = self.refs_made
            payload = codec.encode(self._inline(value))
            if len(payload) > self.flat_max_bytes and kind in self.flat_limit and len(value) > 1:
                # Few but large entries: as one atom, every change would rewrite all of it.
                tree = self._as_tree(value, force=True)
                assert tree is not None  # forced, and a type of flat_limit
                return Ref(self._flush_tree(tree), tree.kind)
            ptr = self.arena.append(VALUE, payload)
            if self.refs_made == refs_before and len(self.flat_written) < WRITE_THROUGH_AT_MOST:
                self.flat_written[id(value)] = ptr
            return Ref(ptr, VALUE)
        return value

    def _flat_record(self, record: dict[Any, Any]) -> bytes | None:
        """The payload of a small dict that is one atom with nothing below it, else None.

        The common record, on the path of every bulk load: encoded in one call,
        the same bytes as `_inline` and `encode` give. A payload of at most
        `surely_flat_bytes` cannot hold what would need an atom or a tree of its
        own; a longer one is accepted if it holds only scalars and short text.
        None: the general path lays it out (a working tree inside, which the
        packer refuses, or anything it has to look into).
        """
        try:
            payload = codec.pack(record)
        except _PACK_ERRORS:
            return None
        if len(payload) <= self.surely_flat_bytes or self._plain_record(record, payload):
            return payload
        return None

    def _plain_record(self, record: dict[Any, Any], payload: bytes) -> bool:
        """Whether `record`, encoded as `payload`, holds only scalars and short text and is not too big."""
        inline_bytes = self.inline_bytes
        for item in record.values():
            kind = type(item)
            if kind is str or kind is bytes:
                if len(item) > inline_bytes:
                    return False
            elif kind not in _FLAT_SCALARS:
                return False
        return len(payload) <= self.flat_max_bytes

    def _indexed_payload(self, collection: IndexedColl) -> bytes:
        return codec.encode(
            {
                "data": self._flush_tree(collection.data),
                "indexes": {field: self._flush_tree(root) for field, root in collection.indexes.items()},
            }
        )

    def _inline(self, value: Any) -> Any:
        """A container ready to encode in one atom: nested trees and big containers as Refs."""
        kind = type(value)
        flat_limit = self.flat_limit
        if kind is Node or kind is Ref or kind is IndexedColl or (kind in flat_limit and len(value) > flat_limit[kind]):
            self.refs_made += 1
            return self.write_value(value)
        if kind is dict:
            return {key: self._inline(item) for key, item in value.items()}
        if kind is list:
            return [self._inline(item) for item in value]
        if kind is tuple:
            return tuple(self._inline(item) for item in value)
        return value

    def _as_tree(self, value: Any, force: bool = False) -> Node | None:
        """The value as a tree if it has too many entries to be one atom (or `force`), else None."""
        kind = type(value)
        limit = self.flat_limit.get(kind)
        if limit is None or (len(value) <= limit and not force):
            return None

        if kind is dict:
            keys = list(value)
            ordered = sorted_keys(keys)
            # Records are often inserted in key order: then the values are in order too, no lookups.
            values = list(value.values()) if ordered == keys else [value[key] for key in ordered]
            return self.access.build(DICT_LEAF, ordered, values)
        if kind is list:
            return self.access.build(LIST_LEAF, None, list(value))
        return self.access.build(SET_LEAF, sorted_keys(value), None)

    # -- compaction ---------------------------------------------------------------

    def copy_root(self, root_ptr: int) -> int:
        """Copy every atom reachable from `root_ptr` into new atoms; return the new root."""
        copied: int = _drained(self.copy_steps(root_ptr))
        return copied

    def copy_steps(self, root_ptr: int) -> Generator[None, None, int]:
        """`copy_root` a node at a time: yields after each tree node it wrote; returns the new root.

        Between two steps the caller may commit: the atoms being copied are
        immutable, so the copy stays that of `root_ptr` (reclamation.py
        replays the commits made meanwhile onto it).
        """
        if not root_ptr:
            return 0
        copied: int = yield from self._copy_tree(root_ptr)
        return copied

    def _copy_tree(self, ptr: int) -> Generator[None, None, int]:
        kind, payload = self.store.reader.atom(ptr)
        if kind not in BRANCHES and not codec.may_hold_refs(payload):
            # A leaf of scalars (every index leaf, most small dicts): no pointer to
            # rewrite, so its bytes are the copy. Branches always point at children.
            yield
            return self.arena.append(kind, bytes(payload))
        node = self.store.objects.get(ptr)
        if node is None:  # decode the bytes already read; not worth caching, a compaction reads it once
            node = decode_node(kind, payload, ptr)
        assert node.values is not None or node.kind not in BRANCHES, "a branch has children"
        values = None
        if node.values is not None:
            values = []
            for slot in node.values:
                if node.kind in BRANCHES:
                    slot = yield from self._copy_tree(slot)
                elif type(slot) is Ref and (slot.kind in TREE_KINDS or slot.kind == INDEXED):
                    slot = yield from self._copy_collection(slot)  # a collection in a leaf: in steps too
                else:
                    slot = self._copy_slot(slot)
                values.append(slot)
        yield
        return self._write_node(Node(node.kind, node.keys, values, node.sizes))

    def _copy_collection(self, slot: Ref) -> Generator[None, None, Ref]:
        """A copy of a tree or indexed collection held in a leaf, made in steps."""
        if slot.kind in TREE_KINDS:
            copied: int = (yield from self._copy_tree(slot.ptr)) if slot.ptr else 0
            return Ref(copied, slot.kind)
        fields = codec.decode(self.store.atom(slot.ptr)[1], frozen=False)  # pointers: {"data", "indexes"}
        data = (yield from self._copy_tree(fields["data"])) if fields["data"] else 0
        indexes = {}
        for field, root in fields["indexes"].items():
            indexes[field] = (yield from self._copy_tree(root)) if root else 0
        return Ref(self.arena.append(INDEXED, codec.encode({"data": data, "indexes": indexes})), INDEXED)

    def _copy_slot(self, slot: Any) -> Any:
        """A copy of a leaf value; a collection nested in a value is copied at once (values are small)."""
        if type(slot) is not Ref:
            return slot
        if slot.kind in TREE_KINDS or slot.kind == INDEXED:
            return _drained(self._copy_collection(slot))
        kind, payload = self.store.reader.atom(slot.ptr)  # read once: not worth a place in the cache
        if not codec.may_hold_refs(payload):
            return Ref(self.arena.append(VALUE, bytes(payload)), VALUE)
        nested: list[Ref] = []

        def keep(ptr: int, kind: int) -> Ref:
            nested.append(Ref(ptr, kind))
            return nested[-1]

        value = codec.decode(payload, frozen=False, opaque_dataclasses=True, ref=keep)
        if not nested:
            return Ref(self.arena.append(VALUE, bytes(payload)), VALUE)
        return Ref(self.arena.append(VALUE, codec.encode(_replace_refs(value, self._copy_slot))), VALUE)


def _list_index(length: int, index: Any, path: KeyPath) -> int:
    """`index` of a list of `length` as a position (a negative one counts from the end); PathError if out of range."""
    if type(index) is not int or not -length <= index < length:
        raise PathError(f"list index {index!r} out of range at {path!r}")
    return index % length


def _drained(steps: Generator[None, None, Any]) -> Any:
    """What a generator of steps returns, all its steps taken at once."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _replace_refs(value: Any, copy: Any) -> Any:
    kind = type(value)
    if kind is Ref:
        return copy(value)
    if kind is dict:
        return {key: _replace_refs(item, copy) for key, item in value.items()}
    if kind is list:
        return [_replace_refs(item, copy) for item in value]
    if kind is tuple:
        return tuple(_replace_refs(item, copy) for item in value)
    return value


class _TreeReader:
    """Reads a stored tree for index maintenance: `reader[key]`, and iteration for lists and sets."""

    __slots__ = ("writer", "tree", "leaf_kind", "_index_elements_")

    def __init__(self, writer: Writer, tree: Node | int) -> None:
        self.writer = writer
        self.tree = tree
        self.leaf_kind = writer._leaf_kind(tree)
        self._index_elements_ = self.leaf_kind != DICT_LEAF  # a list or set field: index its elements

    def __getitem__(self, key: Any) -> Any:
        if self.leaf_kind == LIST_LEAF:
            try:
                return self.writer.access.at(self.tree, self.writer._index(self.tree, key, ()))
            except PathError:
                raise IndexError(key) from None
        return self.writer.access.lookup(self.tree, key, self.leaf_kind)

    def __iter__(self) -> Any:
        if self.leaf_kind == LIST_LEAF:
            return self.writer.access.values(self.tree, LIST_LEAF)
        return self.writer.access.keys(self.tree, self.leaf_kind)


def _decode_indexed(payload: Any) -> IndexedColl:
    """The working form of an INDEXED atom's payload."""
    fields = codec.decode(payload, frozen=False)
    return IndexedColl(fields["data"], dict(fields["indexes"]))


def _empty_like(kind: int) -> Node:
    return empty(LEAF_OF[kind])
