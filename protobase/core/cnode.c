/* protobase.core.cnode: point searches in encoded tree nodes, the compiled twin of btree/search.py.
 *
 * Mirrors, function for function, the pure-Python module protobase/core/btree/search.py:
 *
 *     leaf_slot(kind, payload, key) -> slot       search.leaf_slot
 *     branch_child(kind, payload, key) -> int     search.branch_child
 *     Searcher(buffers, atom, fallback)           search.Searcher
 *         .lookup(root, key, leaf_kind) -> slot   search.Searcher.lookup
 *         .value(ptr, ref) -> (value, length)     search.Searcher.value (and the value it returns untracked
 *                                                 by the cyclic GC where it cannot be in a cycle: see untrack)
 *         .splice(root, keys, make_entry, append, pack_key, absent)
 *             -> (root, old slot, retired) | None search.Searcher.splice: the nodes on a path of dict trees
 *                                                 written again with one entry set, spliced in their bytes
 *         .splice_set(root, keys, adding, append, pack_key)
 *             -> (root, retired) | None           search.Searcher.splice_set: keys removed from and added to
 *                                                 a set tree (an index), spliced in its nodes' bytes
 *
 * The Python functions decode a whole node and bisect it; these read the node's msgpack bytes
 * (btree/node.py's format) in place and build a Python object for the one entry they return, so
 * a cold point read decodes one key path, not 64 entries a level. Keys are compared in
 * keyorder.py's canonical order: families by rank, inside a family natively. Text, integers,
 * bytes and None are compared on their bytes (UTF-8 orders as code points do); any other key is
 * decoded and compared by Python itself (keyorder.order_key for tuples), so both agree for every
 * key type. The Searcher reads atoms straight out of the AtomReader's segment buffers
 * ({segment index -> memoryview}), asking `atom(ptr)` (AtomReader.atom, which maps a segment on
 * first use) only for a segment not mapped yet, and hands a key of a type outside the key types
 * (a str subclass, say) to `fallback(root, key, leaf_kind)`: the decoded-node lookup.
 *
 * codec.py's compiled unpacker (ccodec.unpack) decodes what is returned; configure() is given it
 * with Ref, CorruptionError and keyorder.order_key when btree/search.py is imported.
 *
 * Runs in every client process (and the coordinator's Store), unless PROTOBASE_PURE_PYTHON=1.
 *
 * Invariant: for every clean tree, lookup() returns what search.Searcher.lookup returns (the same
 * slot, or KeyError), and nothing in shared memory is trusted: every length and count is checked
 * against the bytes of its atom before it is used, a walk deeper than MAX_DEPTH levels (a cycle)
 * stops, and every malformed byte is a CorruptionError, never a crash.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Atom kinds (arena.py). */
#define VALUE 1
#define DICT_LEAF 2
#define DICT_BRANCH 3
#define SET_LEAF 4
#define SET_BRANCH 5
#define INDEXED 8

/* The atom header (arena.py): u32 little-endian, kind in the top 4 bits, payload length below. */
#define HEADER_SIZE 4
#define LENGTH_BITS 28
#define MAX_PAYLOAD ((UINT32_C(1) << LENGTH_BITS) - 1)
#define OFFSET_BITS 40
#define OFFSET_MASK ((UINT64_C(1) << OFFSET_BITS) - 1)
/* A Ref's u64 (codec.py): atom kind << 60 | AtomPointer. */
#define REF_KIND_SHIFT 60
#define REF_POINTER_MASK ((UINT64_C(1) << REF_KIND_SHIFT) - 1)

/* Extension codes (codec.py). */
#define EXT_REF 1
#define EXT_TUPLE 2
#define EXT_DATETIME 4
#define EXT_DATE 5
#define EXT_DECIMAL 6
#define EXT_UUID 7
#define EXT_BIGINT 9

/* A 64-way tree of 2^40-byte segments is far shallower than this: deeper is a cycle. */
#define MAX_DEPTH 64
/* Node indexes (see build_index): slots of the table, and the widest node indexed. */
#define INDEX_SLOTS 2048
#define INDEX_MAX_ENTRIES 256
/* Values up to this many bytes are decoded from a copy (see decode_range). */
#define COPY_BELOW 4096
/* msgpack-python's unpacker nests at most this deep (as ccodec.c does). */
#define SKIP_NEST_LIMIT 1024

/* keyorder.py's family ranks; AWARE: aware datetimes, a family of their own. */
enum { RANK_NONE = 0, RANK_NUMBER = 1, RANK_STR = 2, RANK_BYTES = 3, RANK_DATETIME = 4, RANK_DATE = 5,
       RANK_UUID = 6, RANK_TUPLE = 7, RANK_AWARE = 8, RANK_DECODE = -1, RANK_NOT_KEY = -2 };

/* Set by configure(); strong references kept for the life of the process. */
static PyObject *unpack_function; /* ccodec.unpack(data, frozen, ref, opaque_dataclasses) */
static PyObject *ref_type;        /* codec.Ref (ccodec.Ref) */
static PyObject *corruption_error; /* protobase.errors.CorruptionError */
static PyObject *order_key;       /* keyorder.order_key */
static PyObject *decimal_type, *uuid_type;
static PyObject *frozen_dict, *frozen_list; /* frozen.FrozenDict, frozen.FrozenList */

static int corrupt(const char *message) {
    PyErr_Format(corruption_error, "tree node: %s", message);
    return -1;
}

static int corrupt_at(uint64_t ptr, const char *message) {
    char text[160]; /* PyErr_Format has no %llx: format here */
    snprintf(text, sizeof text, "tree node %#llx: %s", (unsigned long long)ptr, message);
    PyErr_SetString(corruption_error, text);
    return -1;
}

/* ---- reading msgpack bytes in place ----------------------------------------------------- */

typedef struct {
    const unsigned char *at;
    const unsigned char *end;
} Bytes;

static int need(Bytes *b, Py_ssize_t n) {
    if (n < 0 || b->end - b->at < n) return corrupt("truncated");
    return 0;
}

static uint64_t big_endian(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* A big-endian number of `n` bytes at the reader, consumed. */
static int take_number(Bytes *b, int n, uint64_t *out) {
    if (need(b, n) < 0) return -1;
    *out = big_endian(b->at, n);
    b->at += n;
    return 0;
}

/* An array header; its count must fit in what remains (each item takes at least a byte). */
static int take_array(Bytes *b, uint64_t *count) {
    if (need(b, 1) < 0) return -1;
    unsigned char tag = *b->at++;
    if ((tag & 0xf0) == 0x90)
        *count = tag & 0x0f;
    else if (tag == 0xdc || tag == 0xdd) {
        if (take_number(b, tag == 0xdc ? 2 : 4, count) < 0) return -1;
    } else
        return corrupt("an array was expected");
    if (*count > (uint64_t)(b->end - b->at)) return corrupt("an array holds more items than its bytes");
    return 0;
}

static int skip(Bytes *b, int depth);

/* Move past `n` values. The shapes of node entries (short text, small ints, Refs) are stepped over
 * inline; anything else goes through skip(). */
static int skip_items(Bytes *b, uint64_t n, int depth) {
    if (n > (uint64_t)(b->end - b->at)) return corrupt("a container holds more items than its bytes");
    for (uint64_t i = 0; i < n; i++) {
        if (b->at >= b->end) return corrupt("truncated");
        unsigned char tag = *b->at;
        Py_ssize_t size;
        if (tag < 0x80 || tag >= 0xe0 || tag == 0xc0 || tag == 0xc2 || tag == 0xc3)
            size = 1;
        else if ((tag & 0xe0) == 0xa0)
            size = 1 + (tag & 0x1f); /* fixstr */
        else if (tag == 0xd7)
            size = 10; /* fixext 8: a Ref */
        else if (tag >= 0xcc && tag <= 0xd3)
            size = 1 + (1 << ((tag - 0xcc) & 3)); /* (u)int 8-64: child pointers, subtree sizes */
        else {
            if (skip(b, depth) < 0) return -1;
            continue;
        }
        if (b->end - b->at < size) return corrupt("truncated");
        b->at += size;
    }
    return 0;
}

/* Move past one msgpack value without building it. */
static int skip(Bytes *b, int depth) {
    if (++depth > SKIP_NEST_LIMIT) return corrupt("a value nests too deeply");
    if (need(b, 1) < 0) return -1;
    unsigned char tag = *b->at++;
    uint64_t n;
    if (tag < 0x80 || tag >= 0xe0 || tag == 0xc0 || tag == 0xc2 || tag == 0xc3) return 0;
    if (tag < 0x90) return skip_items(b, 2 * (uint64_t)(tag & 0x0f), depth);
    if (tag < 0xa0) return skip_items(b, tag & 0x0f, depth);
    if (tag < 0xc0) return need(b, tag & 0x1f) < 0 ? -1 : (b->at += tag & 0x1f, 0);
    switch (tag) {
    case 0xcc: case 0xd0: return need(b, 1) < 0 ? -1 : (b->at += 1, 0);
    case 0xcd: case 0xd1: return need(b, 2) < 0 ? -1 : (b->at += 2, 0);
    case 0xca: case 0xce: case 0xd2: return need(b, 4) < 0 ? -1 : (b->at += 4, 0);
    case 0xcb: case 0xcf: case 0xd3: return need(b, 8) < 0 ? -1 : (b->at += 8, 0);
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: { /* fixext: type byte + 1..16 */
        Py_ssize_t size = 1 + ((Py_ssize_t)1 << (tag - 0xd4));
        return need(b, size) < 0 ? -1 : (b->at += size, 0);
    }
    case 0xc4: case 0xd9: n = 1; break; /* bin 8, str 8 */
    case 0xc5: case 0xda: n = 2; break;
    case 0xc6: case 0xdb: n = 4; break;
    case 0xc7: n = 1; break; /* ext 8/16/32: length, type byte, payload */
    case 0xc8: n = 2; break;
    case 0xc9: n = 4; break;
    case 0xdc: case 0xdd:
        if (take_number(b, tag == 0xdc ? 2 : 4, &n) < 0) return -1;
        return skip_items(b, n, depth);
    case 0xde: case 0xdf:
        if (take_number(b, tag == 0xde ? 2 : 4, &n) < 0) return -1;
        return n > UINT32_MAX ? corrupt("a map is too long") : skip_items(b, 2 * n, depth);
    default:
        return corrupt("a byte that starts no msgpack value");
    }
    uint64_t length;
    if (take_number(b, (int)n, &length) < 0) return -1;
    if (tag >= 0xc7 && tag <= 0xc9) length += 1; /* the extension's type byte */
    if (length > (uint64_t)(b->end - b->at)) return corrupt("truncated");
    b->at += length;
    return 0;
}

/* The value at [start, end) decoded by ccodec.unpack (frozen as asked, Refs as codec.Ref). */
static PyObject *decode_range(const unsigned char *start, const unsigned char *end, int frozen, PyObject *ref) {
    /* A small value is copied to a bytes object: one plain allocation, where a memoryview over the
     * segment is two objects the cyclic GC tracks (and counts towards its next collection). */
    PyObject *view = end - start <= COPY_BELOW ? PyBytes_FromStringAndSize((const char *)start, end - start)
                                               : PyMemoryView_FromMemory((char *)start, end - start, PyBUF_READ);
    if (view == NULL) return NULL;
    PyObject *args[4] = {view, frozen ? Py_True : Py_False, ref, Py_False};
    PyObject *value = PyObject_Vectorcall(unpack_function, args, 4, NULL);
    Py_DECREF(view);
    if (value == NULL && !PyErr_ExceptionMatches(corruption_error) && (PyErr_ExceptionMatches(PyExc_ValueError) ||
        PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_OverflowError) ||
        PyErr_ExceptionMatches(PyExc_KeyError) || PyErr_ExceptionMatches(PyExc_ArithmeticError))) {
        /* codec.decode's rule: bytes that do not decode are corrupt (UnicodeDecodeError is a ValueError) */
        PyObject *type, *error, *traceback;
        PyErr_Fetch(&type, &error, &traceback);
        PyErr_NormalizeException(&type, &error, &traceback);
        PyErr_Format(corruption_error, "cannot decode a stored value (%S)", error);
        Py_XDECREF(type);
        Py_XDECREF(error);
        Py_XDECREF(traceback);
    }
    return value;
}

/* A Ref (codec.Ref) from the 8 payload bytes of its extension: u64 little-endian, kind << 60 | pointer. */
static PyObject *new_ref(const unsigned char *payload) {
    uint64_t word = 0;
    for (int i = 7; i >= 0; i--) word = (word << 8) | payload[i];
    PyObject *args[2] = {PyLong_FromUnsignedLongLong(word & REF_POINTER_MASK),
                         PyLong_FromUnsignedLongLong(word >> REF_KIND_SHIFT)};
    PyObject *ref = args[0] != NULL && args[1] != NULL ? PyObject_Vectorcall(ref_type, args, 2, NULL) : NULL;
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    return ref;
}

/* The next value, decoded (frozen=False, as decode_node decodes a node), and consumed. The shapes
 * of node entries (Refs, ints, short text, None, booleans) are built here, exactly as
 * ccodec.unpack builds them; anything else is handed to it. */
static PyObject *decode_next(Bytes *b) {
    const unsigned char *start = b->at;
    if (need(b, 1) < 0) return NULL;
    unsigned char tag = *start;
    if (tag < 0x80 || tag >= 0xe0) {
        b->at++;
        return PyLong_FromLong(tag < 0x80 ? (long)tag : (long)(signed char)tag);
    }
    if (tag == 0xc0 || tag == 0xc2 || tag == 0xc3) {
        b->at++;
        return tag == 0xc0 ? Py_NewRef(Py_None) : PyBool_FromLong(tag == 0xc3);
    }
    if (tag == 0xd7 && b->end - b->at >= 10 && b->at[1] == EXT_REF) {
        b->at += 10;
        return new_ref(start + 2);
    }
    if ((tag & 0xe0) == 0xa0) {
        Py_ssize_t n = tag & 0x1f;
        if (need(b, 1 + n) < 0) return NULL;
        b->at += 1 + n;
        PyObject *text = PyUnicode_DecodeUTF8((const char *)start + 1, n, NULL);
        if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            corrupt("text that is not UTF-8");
        }
        return text;
    }
    if (skip(b, 0) < 0) return NULL;
    return decode_range(start, b->at, 0, Py_None);
}

/* ---- keys in canonical order ------------------------------------------------------------ */

/* The search key, prepared once per search (release it with release_key). */
typedef struct Key {
    PyObject *key;
    int rank;
    const char *text; /* str keys: UTF-8 */
    Py_ssize_t text_length;
    int integer;      /* int (or bool) keys that fit 64 bits: their value, as `negative` and `magnitude` */
    int negative;
    uint64_t magnitude;
    struct Key *items; /* tuple keys whose items are all of key types: each item prepared, compared in C */
    Py_ssize_t item_count;
    PyObject *ordered; /* other tuple keys: keyorder.order_key(key), made when first compared */
} Key;

/* Tuples nested deeper than this are compared by Python (through order_key). */
#define TUPLE_NEST_LIMIT 16

static int is_aware(PyObject *datetime) {
    PyObject *offset = PyObject_CallMethod(datetime, "utcoffset", NULL);
    if (offset == NULL) return -1;
    int aware = offset != Py_None;
    Py_DECREF(offset);
    return aware;
}

/* keyorder's rank of a Python object of an exact key type; RANK_NOT_KEY for anything else. */
static int rank_of(PyObject *o) {
    PyTypeObject *type = Py_TYPE(o);
    if (o == Py_None) return RANK_NONE;
    if (type == &PyUnicode_Type) return RANK_STR;
    if (type == &PyLong_Type || type == &PyBool_Type || type == &PyFloat_Type) return RANK_NUMBER;
    if (type == &PyBytes_Type) return RANK_BYTES;
    if (type == &PyTuple_Type) return RANK_TUPLE;
    if ((PyObject *)type == decimal_type) return RANK_NUMBER;
    if ((PyObject *)type == uuid_type) return RANK_UUID;
    if (type == PyDateTimeAPI->DateTimeType) {
        int aware = is_aware(o);
        return aware < 0 ? -3 : aware ? RANK_AWARE : RANK_DATETIME;
    }
    if (type == PyDateTimeAPI->DateType) return RANK_DATE;
    return RANK_NOT_KEY;
}

static void release_key(Key *k) {
    for (Py_ssize_t i = 0; k->items != NULL && i < k->item_count; i++) release_key(&k->items[i]);
    PyMem_Free(k->items);
    k->items = NULL;
    Py_CLEAR(k->ordered);
}

static int prepare_key_at(Key *k, PyObject *key, int depth);

/* A tuple key's items prepared (k->items), when every one is of an exact key type; -1 on error. */
static int prepare_items(Key *k, int depth) {
    Py_ssize_t n = PyTuple_GET_SIZE(k->key);
    if (depth >= TUPLE_NEST_LIMIT) return 0;
    Key *items = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(Key));
    if (items == NULL) return PyErr_NoMemory(), -1;
    k->items = items;
    for (Py_ssize_t i = 0; i < n; i++) {
        k->item_count = i + 1;
        int ok = prepare_key_at(&items[i], PyTuple_GET_ITEM(k->key, i), depth + 1);
        if (ok <= 0) {
            release_key(k); /* an item of no key type: order_key decides, as it does for Python */
            return ok;
        }
    }
    k->item_count = n;
    return 0;
}

/* Prepare `key`; 0 if it is not of an exact key type (the caller falls back), -1 on error. */
static int prepare_key(Key *k, PyObject *key) { return prepare_key_at(k, key, 0); }

static int prepare_key_at(Key *k, PyObject *key, int depth) {
    memset(k, 0, sizeof *k);
    k->key = key;
    k->rank = rank_of(key);
    if (k->rank == -3) return -1;
    if (k->rank == RANK_NOT_KEY) return 0;
    if (k->rank == RANK_TUPLE && prepare_items(k, depth) < 0) return -1;
    if (k->rank == RANK_STR) {
        k->text = PyUnicode_AsUTF8AndSize(key, &k->text_length);
        if (k->text == NULL) { /* a lone surrogate: no stored key can equal it */
            PyErr_Clear();
            k->rank = RANK_NOT_KEY;
            return 0;
        }
    } else if (PyLong_Check(key)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(key, &overflow);
        if (v == -1 && PyErr_Occurred()) return -1;
        if (!overflow) {
            k->integer = 1;
            k->negative = v < 0;
            k->magnitude = v < 0 ? (uint64_t)(-(v + 1)) + 1 : (uint64_t)v;
        } else if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(key);
            if (u == (unsigned long long)-1 && PyErr_Occurred())
                PyErr_Clear(); /* beyond 64 bits: compared by Python */
            else {
                k->integer = 1;
                k->magnitude = u;
            }
        }
    }
    return 1;
}

static int sign(int c) { return (c > 0) - (c < 0); }

/* The rank of the value at the reader, from its first byte; RANK_DECODE when it must be decoded
 * to tell (datetimes, naive or aware), RANK_NOT_KEY for a value that is no key at all. */
static int tag_rank(Bytes *b) {
    unsigned char tag = *b->at;
    if (tag < 0x80 || tag >= 0xe0 || (tag >= 0xca && tag <= 0xd3) || tag == 0xc2 || tag == 0xc3) return RANK_NUMBER;
    if ((tag >= 0xa0 && tag <= 0xbf) || (tag >= 0xd9 && tag <= 0xdb)) return RANK_STR;
    if (tag == 0xc0) return RANK_NONE;
    if (tag >= 0xc4 && tag <= 0xc6) return RANK_BYTES;
    int code;
    if (tag >= 0xd4 && tag <= 0xd8) {
        if (b->end - b->at < 2) return RANK_DECODE;
        code = (signed char)b->at[1];
    } else if (tag >= 0xc7 && tag <= 0xc9) {
        int n = 1 << (tag - 0xc7);
        if (b->end - b->at < 2 + n) return RANK_DECODE;
        code = (signed char)b->at[1 + n];
    } else
        return RANK_NOT_KEY;
    switch (code) {
    case EXT_TUPLE: return RANK_TUPLE;
    case EXT_DATE: return RANK_DATE;
    case EXT_DECIMAL: case EXT_BIGINT: return RANK_NUMBER;
    case EXT_UUID: return RANK_UUID;
    case EXT_DATETIME: return RANK_DECODE;
    default: return RANK_NOT_KEY;
    }
}

/* An encoded integer's value as (negative, magnitude); 0 if the value is no msgpack integer. */
static int encoded_integer(const unsigned char *at, const unsigned char *end, int *negative, uint64_t *magnitude) {
    unsigned char tag = *at;
    if (tag < 0x80) { *negative = 0; *magnitude = tag; return 1; }
    if (tag >= 0xe0) { *negative = 1; *magnitude = (uint64_t)(256 - tag); return 1; }
    if (tag == 0xc2 || tag == 0xc3) { *negative = 0; *magnitude = tag == 0xc3; return 1; } /* False == 0, True == 1 */
    if (tag >= 0xcc && tag <= 0xd3) {
        int n = 1 << ((tag - 0xcc) & 3);
        if (end - at < 1 + n) return 0;
        uint64_t v = big_endian(at + 1, n);
        if (tag <= 0xcf) { *negative = 0; *magnitude = v; return 1; }
        if (n < 8 && ((v >> (8 * n - 1)) & 1)) v |= ~UINT64_C(0) << (8 * n); /* sign-extend */
        int64_t s = (int64_t)v;
        *negative = s < 0;
        *magnitude = s < 0 ? (uint64_t)(-(s + 1)) + 1 : (uint64_t)s;
        return 1;
    }
    return 0;
}

static int compare_integers(int negative_a, uint64_t a, int negative_b, uint64_t b) {
    if (negative_a != negative_b) return negative_a ? -1 : 1;
    int c = (a > b) - (a < b);
    return negative_a ? -c : c;
}

/* Compare two Python keys of one rank as keyorder does: natively, tuples through order_key. */
static int compare_objects(Key *k, PyObject *other, int rank) {
    PyObject *a = k->key, *b = other, *ordered_other = NULL;
    if (rank == RANK_TUPLE) {
        if (k->ordered == NULL && (k->ordered = PyObject_CallOneArg(order_key, k->key)) == NULL) return -2;
        if ((ordered_other = PyObject_CallOneArg(order_key, other)) == NULL) return -2;
        a = k->ordered;
        b = ordered_other;
    }
    int result = -2, less = PyObject_RichCompareBool(a, b, Py_LT);
    if (less == 1)
        result = -1;
    else if (less == 0) {
        int equal = PyObject_RichCompareBool(a, b, Py_EQ);
        result = equal < 0 ? -2 : equal ? 0 : 1;
    }
    Py_XDECREF(ordered_other);
    if (result == -2 && rank == RANK_TUPLE && (PyErr_ExceptionMatches(PyExc_KeyError) ||
                                               PyErr_ExceptionMatches(PyExc_TypeError))) {
        PyErr_Clear(); /* order_key cannot place an item of the stored tuple (search.py's _bisect says so too) */
        corrupt("a stored key is of no key type");
    }
    return result;
}

static int compare_next(Key *k, Bytes *b);

/* A search tuple with prepared items against the encoded tuple at the reader (an EXT_TUPLE holding
 * the array of its items), the reader moved past it: item by item, a prefix first, as Python
 * compares order_key's tuples; -2 with an exception set. */
static int compare_tuple(Key *k, Bytes *b) {
    unsigned char tag = *b->at++;
    uint64_t size;
    if (tag >= 0xd4 && tag <= 0xd8)
        size = UINT64_C(1) << (tag - 0xd4);
    else if (take_number(b, 1 << (tag - 0xc7), &size) < 0)
        return -2;
    if (need(b, 1) < 0 || (uint64_t)(b->end - b->at - 1) < size) return corrupt("truncated"), -2;
    Bytes items = {b->at + 1, b->at + 1 + size};
    b->at = items.end;
    uint64_t count;
    if (take_array(&items, &count) < 0) return -2;
    for (uint64_t i = 0; i < count && i < (uint64_t)k->item_count; i++) {
        int c = compare_next(&k->items[i], &items);
        if (c != 0) return c;
    }
    return ((uint64_t)k->item_count > count) - ((uint64_t)k->item_count < count);
}

/* The search key against the key at the reader: -1, 0 or 1 (key <, ==, > it), the reader moved past
 * it; -2 with an exception set. */
static int compare_next(Key *k, Bytes *b) {
    if (need(b, 1) < 0) return -2;
    if (k->text != NULL && (*b->at & 0xe0) == 0xa0) { /* text against fixstr: the common case, first */
        Py_ssize_t n = *b->at & 0x1f;
        if (b->end - b->at < 1 + n) return corrupt("truncated"), -2;
        Py_ssize_t common = n < k->text_length ? n : k->text_length;
        int c = memcmp(k->text, b->at + 1, (size_t)common);
        b->at += 1 + n;
        return c ? sign(c) : (k->text_length > n) - (k->text_length < n);
    }
    int rank = tag_rank(b);
    if (rank == RANK_NOT_KEY) return corrupt("a key of a type no key can have"), -2;
    if (rank != RANK_DECODE && rank != k->rank) { /* known families apart (a datetime's is RANK_DECODE) */
        if (skip(b, 0) < 0) return -2;
        return k->rank < rank ? -1 : 1;
    }
    if (rank == RANK_STR && k->text != NULL) {
        unsigned char tag = *b->at++;
        uint64_t n = tag & 0x1f;
        if (tag >= 0xd9 && take_number(b, 1 << (tag - 0xd9), &n) < 0) return -2;
        if (n > (uint64_t)(b->end - b->at)) return corrupt("truncated"), -2;
        size_t common = (size_t)n < (size_t)k->text_length ? (size_t)n : (size_t)k->text_length;
        int c = memcmp(k->text, b->at, common);
        b->at += n;
        return c ? sign(c) : ((size_t)k->text_length > (size_t)n) - ((size_t)k->text_length < (size_t)n);
    }
    if (rank == RANK_TUPLE && k->items != NULL) return compare_tuple(k, b);
    int negative;
    uint64_t magnitude;
    if (rank == RANK_NUMBER && k->integer && encoded_integer(b->at, b->end, &negative, &magnitude)) {
        if (skip(b, 0) < 0) return -2;
        return compare_integers(k->negative, k->magnitude, negative, magnitude);
    }
    if (rank == RANK_NONE && k->rank == RANK_NONE) {
        b->at++;
        return 0;
    }
    if (rank == RANK_BYTES && k->rank == RANK_BYTES) {
        unsigned char tag = *b->at++;
        uint64_t n;
        if (take_number(b, 1 << (tag - 0xc4), &n) < 0) return -2;
        if (n > (uint64_t)(b->end - b->at)) return corrupt("truncated"), -2;
        Py_ssize_t length = PyBytes_GET_SIZE(k->key);
        size_t common = (size_t)n < (size_t)length ? (size_t)n : (size_t)length;
        int c = memcmp(PyBytes_AS_STRING(k->key), b->at, common);
        b->at += n;
        return c ? sign(c) : ((size_t)length > (size_t)n) - ((size_t)length < (size_t)n);
    }
    /* Anything else: decode the stored key and let Python compare, as keyorder does. */
    PyObject *other = decode_next(b);
    if (other == NULL) return -2;
    int other_rank = rank_of(other), result;
    if (other_rank == -3)
        result = -2;
    else if (other_rank == RANK_NOT_KEY)
        result = (corrupt("a key of a type no key can have"), -2);
    else if (other_rank != k->rank)
        result = k->rank < other_rank ? -1 : 1;
    else
        result = compare_objects(k, other, other_rank);
    Py_DECREF(other);
    return result;
}

/* ---- nodes ------------------------------------------------------------------------------ */

/* Open a node's payload: its array header must count `parts` parts. */
static int open_node(Bytes *b, uint64_t parts) {
    uint64_t n;
    if (take_array(b, &n) < 0) return -1;
    if (n != parts) return corrupt("does not have the node shape");
    return 0;
}

/* bisect_left over the keys array at the reader: the position of `k` and whether the key there
 * equals it, the reader left at that key (at the array's end when every key is below `k`). */
static int find_key(Bytes *b, Key *k, uint64_t *count, uint64_t *position, int *equal) {
    if (take_array(b, count) < 0) return -1;
    uint64_t i = 0;
    *equal = 0;
    for (; i < *count; i++) {
        const unsigned char *here = b->at;
        int c = compare_next(k, b);
        if (c == -2) return -1;
        if (c <= 0) {
            *equal = c == 0;
            b->at = here;
            break;
        }
    }
    *position = i;
    return 0;
}

static PyObject *key_error(PyObject *key) {
    PyObject *error = PyTuple_Pack(1, key);
    if (error != NULL) {
        PyErr_SetObject(PyExc_KeyError, error);
        Py_DECREF(error);
    }
    return NULL;
}

/* search.leaf_slot on prepared bytes. */
static PyObject *leaf_slot_of(int kind, Bytes *b, Key *k) {
    if (open_node(b, kind == DICT_LEAF ? 2 : 1) < 0) return NULL;
    uint64_t count, position, values;
    int equal;
    if (find_key(b, k, &count, &position, &equal) < 0) return NULL;
    if (kind == SET_LEAF) return equal ? decode_next(b) : key_error(k->key);
    if (skip_items(b, count - position, 0) < 0) return NULL; /* the keys from `position` on */
    if (take_array(b, &values) < 0) return NULL;
    if (values != count) return corrupt("has mismatched key, value and size counts"), NULL;
    if (!equal) return key_error(k->key);
    if (skip_items(b, position, 0) < 0) return NULL;
    return decode_next(b);
}

/* search.branch_child on prepared bytes: the child pointer, or 0 with an exception set. */
static uint64_t branch_child_of(Bytes *b, Key *k) {
    if (open_node(b, 3) < 0) return 0;
    uint64_t count, i = 0;
    if (take_array(b, &count) < 0) return 0;
    for (; i < count; i++) { /* bisect_right: the first separator above the key */
        int c = compare_next(k, b);
        if (c == -2) return 0;
        if (c < 0) break;
    }
    if (i < count && skip_items(b, count - i - 1, 0) < 0) return 0;
    uint64_t children;
    if (take_array(b, &children) < 0) return 0;
    if (children != count + 1) return corrupt("has mismatched key, value and size counts"), 0;
    if (skip_items(b, i, 0) < 0) return 0;
    int negative;
    uint64_t child;
    if (need(b, 1) < 0) return 0;
    if (!encoded_integer(b->at, b->end, &negative, &child) || negative || child == 0 || *b->at == 0xc2 ||
        *b->at == 0xc3)
        return corrupt("a child pointer is not a pointer"), 0;
    return child;
}

static int is_leaf_kind(int kind) { return kind == DICT_LEAF || kind == SET_LEAF; }
static int is_branch_kind(int kind) { return kind == DICT_BRANCH || kind == SET_BRANCH; }

static int open_bytes(PyObject *payload, Py_buffer *view, Bytes *b) {
    if (PyObject_GetBuffer(payload, view, PyBUF_SIMPLE) < 0) return -1;
    b->at = view->buf;
    b->end = (const unsigned char *)view->buf + view->len;
    return 0;
}

/* The arguments of leaf_slot and branch_child, (kind, payload, key): checked, the key prepared and
 * the payload's buffer taken (release both with close_search); -1 with an exception set. */
static int open_search(const char *name, PyObject *const *args, Py_ssize_t nargs, int branch, int *kind, Key *k,
                       Py_buffer *view, Bytes *b) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "%s(kind, payload, key) takes 3 arguments", name), -1;
    if (unpack_function == NULL) return PyErr_Format(PyExc_RuntimeError, "cnode.configure() was not called"), -1;
    *kind = PyLong_AsLong(args[0]);
    if (*kind == -1 && PyErr_Occurred()) return -1;
    if (branch ? !is_branch_kind(*kind) : !is_leaf_kind(*kind))
        return corrupt(branch ? "a dict or set branch was expected" : "a dict or set leaf was expected"), -1;
    int ok = prepare_key(k, args[2]);
    if (ok <= 0) return ok < 0 ? -1 : (PyErr_Format(PyExc_TypeError, "not a key type: %R", Py_TYPE(args[2])), -1);
    if (open_bytes(args[1], view, b) < 0) return release_key(k), -1;
    return 0;
}

static void close_search(Key *k, Py_buffer *view) {
    PyBuffer_Release(view);
    release_key(k);
}

/* leaf_slot(kind, payload, key) */
static PyObject *leaf_slot(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    int kind;
    Key k;
    Py_buffer view;
    Bytes b;
    if (open_search("leaf_slot", args, nargs, 0, &kind, &k, &view, &b) < 0) return NULL;
    PyObject *slot = leaf_slot_of(kind, &b, &k);
    close_search(&k, &view);
    return slot;
}

/* branch_child(kind, payload, key) */
static PyObject *branch_child(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    int kind;
    Key k;
    Py_buffer view;
    Bytes b;
    if (open_search("branch_child", args, nargs, 1, &kind, &k, &view, &b) < 0) return NULL;
    uint64_t child = branch_child_of(&b, &k);
    close_search(&k, &view);
    return child ? PyLong_FromUnsignedLongLong(child) : NULL;
}

/* ---- records the cyclic GC need not visit ---------------------------------------------- */

/* Untrack a decoded frozen value from the cyclic GC wherever it cannot be part of a cycle, bottom
 * up; 1 if `o` is now untracked or no container at all.
 *
 * Why: a FrozenDict is a dict subclass, which CPython never untracks (it does for exact dicts
 * and tuples that hold only atomic values), so every cached record stayed tracked, and a
 * reader's collections visited all of them: with 10,000 records in its cache a cold point read
 * spent more time in the collector than in the read. A frozen container holding only untracked
 * objects and atomic values (str, int, float, bytes, None, Refs) cannot be part of a reference
 * cycle: it is never mutated after decoding (its Python mutators refuse), so none can appear
 * later. The cost is one pass over the value, which decoding just made. Were C code to mutate it
 * anyway, a dict re-tracks itself when given a container (MAINTAIN_TRACKING), and a list could at
 * worst leak a cycle: refcounting still frees everything else. */
static int untrack(PyObject *o, int depth) {
    if (!PyObject_IS_GC(o) || !PyObject_GC_IsTracked(o)) return 1;
    if (depth > SKIP_NEST_LIMIT) return 0;
    PyObject *type = (PyObject *)Py_TYPE(o);
    int settled = 1;
    if (type == frozen_dict) {
        Py_ssize_t at = 0;
        PyObject *key, *value;
        while (PyDict_Next(o, &at, &key, &value)) settled &= untrack(key, depth + 1) & untrack(value, depth + 1);
    } else if (type == frozen_list) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); i++) settled &= untrack(PyList_GET_ITEM(o, i), depth + 1);
    } else if (type == (PyObject *)&PyTuple_Type) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(o); i++) settled &= untrack(PyTuple_GET_ITEM(o, i), depth + 1);
    } else
        return 0;
    if (settled) PyObject_GC_UnTrack(o);
    return settled;
}

/* ---- node indexes: decode-on-second-touch, in C -------------------------------------------
 *
 * A walk scans a node's keys in order (msgpack has no offsets), ~350 ns for 64 entries. A node
 * walked through a second time (the branches near the root on every read; the leaves of a hot
 * range) gets an index: the offsets of its keys and values in its payload, so a search is a
 * binary search (about 6 comparisons) and the value is read in place. Nothing is decoded into
 * Python objects: an index takes 8 bytes an entry, a decoded 64-entry node 9 KB. The table is
 * direct-mapped by pointer, INDEX_SLOTS slots (at most ~1.2 MB), so it is bounded whatever is read;
 * a pointer names one immutable atom forever, so an index never goes stale, and it is only used
 * after the atom's own bytes were reached (its segment still mapped). */

typedef struct NodeIndex {
    uint64_t ptr;
    uint32_t keys, values;  /* entries: keys (separators), values (children); 0 values for a set leaf */
    uint32_t offsets[];     /* keys offsets, then values offsets, from the payload's start */
} NodeIndex;

static uint32_t slot_of(uint64_t ptr) { return (uint32_t)((ptr >> 2) * UINT64_C(0x9E3779B97F4A7C15) >> 53) % INDEX_SLOTS; }

/* Index the node whose payload is [base, end): its shape checked as a scan checks it. */
static NodeIndex *build_index(uint64_t ptr, int kind, const unsigned char *base, const unsigned char *end) {
    Bytes b = {base, end};
    int branch = is_branch_kind(kind);
    uint64_t keys, values = 0;
    if (open_node(&b, kind == DICT_LEAF ? 2 : kind == SET_LEAF ? 1 : 3) < 0 || take_array(&b, &keys) < 0) return NULL;
    if (keys > INDEX_MAX_ENTRIES) return NULL; /* not a node the coordinator writes: scan it */
    NodeIndex *index = PyMem_Malloc(sizeof(NodeIndex) + sizeof(uint32_t) * (2 * keys + 1));
    if (index == NULL) return (NodeIndex *)PyErr_NoMemory();
    index->ptr = ptr;
    index->keys = (uint32_t)keys;
    index->values = 0;
    for (uint64_t i = 0; i < keys; i++) {
        index->offsets[i] = (uint32_t)(b.at - base);
        if (skip(&b, 0) < 0) goto fail;
    }
    if (kind != SET_LEAF) {
        if (take_array(&b, &values) < 0) goto fail;
        if (values != keys + (uint64_t)branch) {
            corrupt("has mismatched key, value and size counts");
            goto fail;
        }
        for (uint64_t i = 0; i < values; i++) {
            index->offsets[keys + i] = (uint32_t)(b.at - base);
            if (skip_items(&b, 1, 0) < 0) goto fail;
        }
        index->values = (uint32_t)values;
    }
    return index;
fail:
    PyMem_Free(index);
    return NULL;
}

/* bisect (right for a branch, left for a leaf) over an indexed node; -1 with an exception set. */
static int64_t indexed_bisect(NodeIndex *index, const unsigned char *base, const unsigned char *end, Key *k,
                              int right, int *equal) {
    uint32_t lo = 0, hi = index->keys;
    *equal = 0;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        Bytes e = {base + index->offsets[mid], end};
        int c = compare_next(k, &e);
        if (c == -2) return -1;
        if (c < 0 || (!right && c == 0)) {
            hi = mid;
            if (c == 0) *equal = 1;
        } else
            lo = mid + 1;
    }
    if (!right && *equal) { /* the first key not below k: equal only if it is the one compared equal */
        Bytes e = {base + index->offsets[lo], end};
        int c = lo < index->keys ? compare_next(k, &e) : 1;
        if (c == -2) return -1;
        *equal = c == 0;
    }
    return lo;
}

/* The child pointer an indexed branch leads `k` to; 0 with an exception set. */
static uint64_t indexed_child(NodeIndex *index, const unsigned char *base, const unsigned char *end, Key *k) {
    int equal;
    int64_t i = indexed_bisect(index, base, end, k, 1, &equal);
    if (i < 0) return 0;
    const unsigned char *at = base + index->offsets[index->keys + i];
    int negative;
    uint64_t child;
    if (at >= end || !encoded_integer(at, end, &negative, &child) || negative || child == 0 || *at == 0xc2 || *at == 0xc3)
        return corrupt("a child pointer is not a pointer"), 0;
    return child;
}

/* The slot an indexed leaf holds under `k`; KeyError if none. */
static PyObject *indexed_slot(NodeIndex *index, int kind, const unsigned char *base, const unsigned char *end, Key *k) {
    int equal;
    int64_t i = indexed_bisect(index, base, end, k, 0, &equal);
    if (i < 0) return NULL;
    if (!equal) return key_error(k->key);
    Bytes e = {base + index->offsets[kind == SET_LEAF ? (uint32_t)i : index->keys + (uint32_t)i], end};
    return decode_next(&e);
}

/* ---- Searcher: walks from a tree's root to an entry, reading segments in place ---------- */

typedef struct {
    PyObject_HEAD
    PyObject *buffers;  /* AtomReader.buffers: {segment index -> memoryview of the mapped segment} */
    PyObject *atom;     /* AtomReader.atom(ptr) -> (kind, payload): maps a segment on first use */
    PyObject *fallback; /* fallback(root, key, leaf_kind): the decoded-node lookup, for other key types */
    uint64_t seen[INDEX_SLOTS];       /* {slot -> pointer of the node last walked through it once} */
    struct NodeIndex *index[INDEX_SLOTS]; /* {slot -> the index of a node walked through twice}, or NULL */
    struct DryRun *dry_runs;          /* splice_set's last plans made without writing, or NULL */
    int next_dry_run;                 /* the slot of dry_runs the next one goes to */
} SearcherObject;

/* The segment a walk reads, held from one node to the next while they share it (they mostly do). */
typedef struct {
    Py_buffer view;
    int held;
    uint64_t index; /* segment index of `view`; NO_SEGMENT when it holds one atom's payload only */
} Mapping;

#define NO_SEGMENT UINT64_MAX

static void release(Mapping *m) {
    if (m->held) PyBuffer_Release(&m->view);
    m->held = 0;
}

/* Ask AtomReader.atom(ptr) for an atom whose segment is not mapped yet (it maps it): then read the
 * segment, or, should it still not be among the buffers, the payload it returned. */
static int map_through_hook(SearcherObject *self, Mapping *m, uint64_t ptr, Bytes *b, int *kind) {
    PyObject *pointer = PyLong_FromUnsignedLongLong(ptr);
    if (pointer == NULL) return -1;
    PyObject *found = PyObject_CallOneArg(self->atom, pointer);
    Py_DECREF(pointer);
    if (found == NULL) return -1;
    if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 2) {
        Py_DECREF(found);
        PyErr_SetString(PyExc_TypeError, "atom(ptr) must return (kind, payload)");
        return -1;
    }
    *kind = PyLong_AsLong(PyTuple_GET_ITEM(found, 0));
    int failed = (*kind == -1 && PyErr_Occurred()) || open_bytes(PyTuple_GET_ITEM(found, 1), &m->view, b) < 0;
    Py_DECREF(found); /* the payload stays alive through m->view */
    if (failed) return -1;
    m->held = 1;
    m->index = NO_SEGMENT;
    return 0;
}

/* The atom at `ptr`: its kind and payload bytes, read from the segment `m` holds (mapped first if
 * another). Its header is checked as AtomReader.atom checks it. */
static int open_atom(SearcherObject *self, Mapping *m, uint64_t ptr, Bytes *b, int *kind) {
    uint64_t index = ptr >> OFFSET_BITS;
    if (!m->held || m->index != index) {
        release(m);
        PyObject *key = PyLong_FromUnsignedLongLong(index);
        if (key == NULL) return -1;
        PyObject *segment = PyDict_GetItemWithError(self->buffers, key); /* borrowed */
        Py_DECREF(key);
        if (segment == NULL) return PyErr_Occurred() ? -1 : map_through_hook(self, m, ptr, b, kind);
        if (PyObject_GetBuffer(segment, &m->view, PyBUF_SIMPLE) < 0) return -1;
        m->held = 1;
        m->index = index;
    }
    const unsigned char *base = m->view.buf;
    uint64_t offset = ptr & OFFSET_MASK, size = (uint64_t)m->view.len;
    char text[160];
    if (offset > size || size - offset < HEADER_SIZE) {
        snprintf(text, sizeof text, "atom pointer %#llx is past the end of segment %llu", (unsigned long long)ptr,
                 (unsigned long long)index);
        PyErr_SetString(corruption_error, text);
        return -1;
    }
    const unsigned char *h = base + offset;
    uint32_t word = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
    uint32_t length = word & MAX_PAYLOAD;
    *kind = (int)(word >> LENGTH_BITS);
    if (size - offset - HEADER_SIZE < length || *kind < VALUE || *kind > INDEXED) {
        snprintf(text, sizeof text, "atom %#llx has a bad header (length %u, kind %d) in segment %llu",
                 (unsigned long long)ptr, (unsigned)length, *kind, (unsigned long long)index);
        PyErr_SetString(corruption_error, text);
        return -1;
    }
    b->at = h + HEADER_SIZE;
    b->end = b->at + length;
    return 0;
}

static int take_pointer(PyObject *o, uint64_t *ptr) {
    *ptr = PyLong_AsUnsignedLongLong(o);
    return (*ptr == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

/* The index of the node at `ptr` if it has one, or builds one if it was walked through before;
 * NULL otherwise (scan it), or NULL with an exception for a malformed node. The index is taken out
 * of the table while in use (a comparison may run Python code, and another thread a walk that
 * would replace it): give_back() returns it. */
static NodeIndex *indexed(SearcherObject *self, uint64_t ptr, int kind, Bytes *b) {
    uint32_t slot = slot_of(ptr);
    NodeIndex *index = self->index[slot];
    if (index != NULL && index->ptr == ptr) {
        self->index[slot] = NULL;
        return index;
    }
    if (self->seen[slot] != ptr) {
        self->seen[slot] = ptr;
        return NULL;
    }
    return build_index(ptr, kind, b->at, b->end);
}

static void give_back(SearcherObject *self, NodeIndex *index) {
    if (index == NULL) return;
    uint32_t slot = slot_of(index->ptr);
    PyMem_Free(self->index[slot]); /* another node's index (or one a concurrent walk built): ours is newer */
    self->index[slot] = index;
}

static void forget_indexes(SearcherObject *self) {
    for (int i = 0; i < INDEX_SLOTS; i++) {
        PyMem_Free(self->index[i]);
        self->index[i] = NULL;
        self->seen[i] = 0;
    }
}

/* lookup(root, key, leaf_kind) -> the slot under key (a set tree: the key); KeyError if absent */
static PyObject *searcher_lookup(SearcherObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "lookup(root, key, leaf_kind) takes 3 arguments");
    uint64_t ptr;
    if (take_pointer(args[0], &ptr) < 0) return NULL;
    int leaf_kind = PyLong_AsLong(args[2]);
    if (leaf_kind == -1 && PyErr_Occurred()) return NULL;
    if (!is_leaf_kind(leaf_kind)) return PyErr_Format(PyExc_ValueError, "lookup needs a dict or set tree");
    Key k;
    int ok = prepare_key(&k, args[1]);
    if (ok < 0) return NULL;
    if (ok == 0) return PyObject_Vectorcall(self->fallback, args, 3, NULL);
    if (ptr == 0) return release_key(&k), key_error(k.key);
    PyObject *slot = NULL;
    Mapping m = {.held = 0};
    for (int depth = 0;; depth++) {
        if (depth > MAX_DEPTH) {
            corrupt_at(ptr, "the tree is deeper than any tree can be (a cycle)");
            break;
        }
        Bytes b;
        int kind;
        if (open_atom(self, &m, ptr, &b, &kind) < 0) break;
        if (kind != leaf_kind && kind != leaf_kind + 1) {
            corrupt_at(ptr, "not a node of its tree");
            break;
        }
        NodeIndex *index = indexed(self, ptr, kind, &b);
        if (index == NULL && PyErr_Occurred()) break;
        if (kind == leaf_kind) {
            slot = index != NULL ? indexed_slot(index, kind, b.at, b.end, &k) : leaf_slot_of(kind, &b, &k);
            give_back(self, index);
            break;
        }
        uint64_t child = index != NULL ? indexed_child(index, b.at, b.end, &k) : branch_child_of(&b, &k);
        give_back(self, index);
        if (child == 0) break;
        ptr = child;
    }
    release(&m);
    release_key(&k);
    return slot;
}

/* value(ptr, ref) -> (value, payload length): the VALUE atom at ptr decoded frozen, Refs through ref */
static PyObject *searcher_value(SearcherObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "value(ptr, ref) takes 2 arguments");
    uint64_t ptr;
    if (take_pointer(args[0], &ptr) < 0) return NULL;
    Mapping m = {.held = 0};
    Bytes b;
    int kind;
    if (open_atom(self, &m, ptr, &b, &kind) < 0) return release(&m), NULL;
    PyObject *value = decode_range(b.at, b.end, 1, args[1]);
    Py_ssize_t length = b.end - b.at;
    release(&m);
    if (value == NULL) return NULL;
    untrack(value, 0);
    return Py_BuildValue("(Nn)", value, length);
}

/* ---- splice: a point write on encoded nodes -------------------------------------------- */

#define MAX_ENTRIES 64 /* btree/node.py: entries per leaf; a leaf this full splits on an insert */
#define MAX_LEVELS 128 /* nodes one splice may rewrite: a path of 16 keys through trees of 8 levels */

/* One node on the path splice() rewrites. */
typedef struct {
    uint64_t ptr;
    int kind;
    Py_ssize_t length;
    uint64_t position; /* a branch: the child taken; a leaf: where the key is, or goes */
    uint64_t width;    /* a branch: its children */
    int last_tree;     /* in the tree that holds the last key (an insert changes its counts) */
} Level;

/* The child `k` leads to in a dict (or set) branch: its position and pointer, and the branch's width. */
static int branch_step(NodeIndex *index, Bytes *b, Key *k, uint64_t *position, uint64_t *child, uint64_t *width) {
    const unsigned char *base = b->at;
    if (index != NULL) {
        int equal;
        int64_t i = indexed_bisect(index, b->at, b->end, k, 1, &equal);
        if (i < 0) return -1;
        *position = (uint64_t)i;
        *width = index->values;
        b->at = base + index->offsets[index->keys + i];
    } else {
        uint64_t count, i = 0, children;
        if (open_node(b, 3) < 0 || take_array(b, &count) < 0) return -1;
        for (; i < count; i++) { /* bisect_right: the first separator above the key */
            int c = compare_next(k, b);
            if (c == -2) return -1;
            if (c < 0) break;
        }
        if (i < count && skip_items(b, count - i - 1, 0) < 0) return -1;
        if (take_array(b, &children) < 0) return -1;
        if (children != count + 1) return corrupt("has mismatched key, value and size counts");
        if (skip_items(b, i, 0) < 0) return -1;
        *position = i;
        *width = children;
    }
    int negative;
    if (b->at >= b->end || !encoded_integer(b->at, b->end, &negative, child) || negative || *child == 0 ||
        *b->at == 0xc2 || *b->at == 0xc3)
        return corrupt("a child pointer is not a pointer");
    return 0;
}

/* Where `k` is (or goes) in a dict leaf, whether it is there, the leaf's width, and the reader left at
 * the value under it when it is. */
static int leaf_step(NodeIndex *index, Bytes *b, Key *k, uint64_t *position, int *equal, uint64_t *count) {
    const unsigned char *base = b->at;
    if (index != NULL) {
        int64_t i = indexed_bisect(index, b->at, b->end, k, 0, equal);
        if (i < 0) return -1;
        *position = (uint64_t)i;
        *count = index->keys;
        if (*equal) b->at = base + index->offsets[index->keys + i];
        return 0;
    }
    uint64_t values;
    if (open_node(b, 2) < 0 || find_key(b, k, count, position, equal) < 0) return -1;
    if (!*equal) return 0;
    if (skip_items(b, *count - *position, 0) < 0 || take_array(b, &values) < 0) return -1;
    if (values != *count) return corrupt("has mismatched key, value and size counts");
    return skip_items(b, *position, 0);
}

/* The tree a leaf entry refers to, if it is a Ref to a dict tree: its pointer, else 0. */
static uint64_t dict_tree_at(Bytes *b) {
    const unsigned char *at = b->at;
    if (b->end - at < 10 || at[0] != 0xd7 || at[1] != EXT_REF) return 0;
    uint64_t word = 0;
    for (int i = 9; i >= 2; i--) word = (word << 8) | at[i];
    int kind = (int)(word >> REF_KIND_SHIFT);
    return kind == DICT_LEAF || kind == DICT_BRANCH ? word & REF_POINTER_MASK : 0;
}

/* Walk `keys` from `root` through dict trees, recording every node on the way; 1 if the last key is
 * present (*old: its slot, decoded), 2 if it is absent from a leaf with room for it, 3 if from a full
 * leaf that may split, 0 if the path does not qualify, -1 on error. */
static int walk_path(SearcherObject *self, uint64_t root, PyObject *keys, Level *levels, int *count, PyObject **old) {
    Mapping m = {.held = 0};
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    uint64_t ptr = root;
    int outcome = 1;
    *count = 0;
    for (Py_ssize_t j = 0; j < n && outcome == 1; j++) {
        Key k;
        int ok = prepare_key(&k, PySequence_Fast_GET_ITEM(keys, j));
        if (ok <= 0) {
            release_key(&k);
            outcome = ok;
            break;
        }
        for (int depth = 0;; depth++) {
            Bytes b;
            int kind, equal = 0;
            uint64_t width = 0;
            if (depth > MAX_DEPTH) {
                outcome = corrupt_at(ptr, "the tree is deeper than any tree can be (a cycle)");
                break;
            }
            if (*count == MAX_LEVELS) {
                outcome = 0;
                break;
            }
            if (open_atom(self, &m, ptr, &b, &kind) < 0) {
                outcome = -1;
                break;
            }
            if (kind != DICT_LEAF && kind != DICT_BRANCH) {
                outcome = corrupt_at(ptr, "not a node of its tree");
                break;
            }
            Level *level = &levels[(*count)++];
            *level = (Level){.ptr = ptr, .kind = kind, .length = b.end - b.at, .last_tree = j == n - 1};
            NodeIndex *index = indexed(self, ptr, kind, &b);
            if (index == NULL && PyErr_Occurred()) {
                outcome = -1;
                break;
            }
            int failed = kind == DICT_BRANCH ? branch_step(index, &b, &k, &level->position, &ptr, &level->width)
                                             : leaf_step(index, &b, &k, &level->position, &equal, &width);
            give_back(self, index);
            if (failed)
                outcome = -1;
            else if (kind == DICT_BRANCH)
                continue;
            else if (!equal && j == n - 1 && width < MAX_ENTRIES)
                outcome = 2;
            else if (!equal) /* a full leaf splits: under a branch of its tree with room for one more child */
                outcome = j == n - 1 && width == MAX_ENTRIES && *count >= 2 && levels[*count - 2].last_tree &&
                                  levels[*count - 2].kind == DICT_BRANCH && levels[*count - 2].width < MAX_ENTRIES
                              ? 3
                              : 0;
            else if (j == n - 1) {
                *old = decode_next(&b);
                outcome = *old == NULL ? -1 : 1;
            } else if ((ptr = dict_tree_at(&b)) == 0)
                outcome = 0; /* no dict tree below: a value, a flat dict, an indexed collection */
            break;
        }
        release_key(&k);
    }
    release(&m);
    return outcome;
}

/* msgpack's shortest encoding of an unsigned integer (a child pointer, a subtree size, an array header's
 * count when `array`): its length. */
static Py_ssize_t encode_uint(unsigned char *out, uint64_t v, int array) {
    if (array && v <= 15) return out[0] = (unsigned char)(0x90 | v), 1;
    if (array) return out[0] = 0xdc, out[1] = (unsigned char)(v >> 8), out[2] = (unsigned char)v, 3;
    int width = v < 0x80 ? 0 : v <= 0xff ? 1 : v <= 0xffff ? 2 : v <= 0xffffffff ? 4 : 8;
    if (width == 0) return out[0] = (unsigned char)v, 1;
    out[0] = width == 1 ? 0xcc : width == 2 ? 0xcd : width == 4 ? 0xce : 0xcf;
    for (int i = 0; i < width; i++) out[1 + i] = (unsigned char)(v >> (8 * (width - 1 - i)));
    return 1 + width;
}

/* A child's encoding in its parent: a pointer in a branch, a Ref to the tree's root node in a leaf. */
static PyObject *child_entry(uint64_t ptr, int parent_kind, int kind) {
    unsigned char out[10];
    if (parent_kind == DICT_BRANCH) return PyBytes_FromStringAndSize((const char *)out, encode_uint(out, ptr, 0));
    uint64_t word = (uint64_t)kind << REF_KIND_SHIFT | ptr;
    out[0] = 0xd7;
    out[1] = EXT_REF;
    for (int i = 0; i < 8; i++) out[2 + i] = (unsigned char)(word >> (8 * i));
    return PyBytes_FromStringAndSize((const char *)out, 10);
}

/* One change to a payload: its bytes [start, end) become `size` bytes at `data`. */
typedef struct {
    Py_ssize_t start, end, size;
    const char *data;
} Edit;

#define MAX_EDITS 6
#define LEFT_HALF ((MAX_ENTRIES + 1) / 2) /* the entries a leaf of MAX_ENTRIES + 1 keeps when it splits */
#define NUMBER_BYTES 18                   /* an edit's encoded numbers: two unsigned integers at most */

/* The edits that write `entry` into a node, and, for an insert (`key` not NULL), the key and the
 * counts: a leaf's two array headers, a branch's subtree size. `numbers` holds the encoded counts. */
static int plan_edits(Level *level, Bytes *b, PyObject *entry, PyObject *key, Edit *edits, int *count,
                      unsigned char (*numbers)[NUMBER_BYTES]) {
    const unsigned char *base = b->at;
    uint64_t n, i = level->position, size;
    int negative;
    *count = 0;
#define SPAN_OF_NEXT(edit) (edit.start = b->at - base, skip_items(b, 1, 0) < 0 ? -1 : (edit.end = b->at - base, 0))
    if (level->kind == DICT_BRANCH) {
        uint64_t separators, children, sizes;
        if (open_node(b, 3) < 0 || take_array(b, &separators) < 0 || skip_items(b, separators, 0) < 0 ||
            take_array(b, &children) < 0)
            return -1;
        if (i >= children) return corrupt("changed while it was being written again");
        if (skip_items(b, i, 0) < 0) return -1;
        Edit *child = &edits[(*count)++];
        if (SPAN_OF_NEXT((*child)) < 0) return -1;
        child->data = PyBytes_AS_STRING(entry), child->size = PyBytes_GET_SIZE(entry);
        if (key == NULL) return 0;
        if (skip_items(b, children - i - 1, 0) < 0 || take_array(b, &sizes) < 0 || sizes != children ||
            skip_items(b, i, 0) < 0)
            return corrupt("has mismatched key, value and size counts");
        if (b->at >= b->end || !encoded_integer(b->at, b->end, &negative, &size) || negative)
            return corrupt("a subtree size is not a count");
        Edit *grown = &edits[(*count)++];
        if (SPAN_OF_NEXT((*grown)) < 0) return -1;
        grown->data = (const char *)numbers[0], grown->size = encode_uint(numbers[0], size + 1, 0);
        return 0;
    }
    Edit *keys_header = &edits[0], *at_key = &edits[1], *values_header = &edits[2], *value = &edits[3];
    if (open_node(b, 2) < 0) return -1;
    keys_header->start = b->at - base;
    if (take_array(b, &n) < 0) return -1;
    if (i > n) return corrupt("changed while it was being written again");
    keys_header->end = b->at - base;
    if (skip_items(b, i, 0) < 0) return -1;
    at_key->start = at_key->end = b->at - base;
    if (skip_items(b, n - i, 0) < 0) return -1;
    values_header->start = b->at - base;
    uint64_t values;
    if (take_array(b, &values) < 0 || values != n) return corrupt("has mismatched key, value and size counts");
    values_header->end = b->at - base;
    if (skip_items(b, i, 0) < 0) return -1;
    if (key == NULL) {
        if (SPAN_OF_NEXT((*value)) < 0) return -1;
        edits[0] = *value;
        edits[0].data = PyBytes_AS_STRING(entry), edits[0].size = PyBytes_GET_SIZE(entry);
        *count = 1;
        return 0;
    }
#undef SPAN_OF_NEXT
    value->start = value->end = b->at - base;
    value->data = PyBytes_AS_STRING(entry), value->size = PyBytes_GET_SIZE(entry);
    at_key->data = PyBytes_AS_STRING(key), at_key->size = PyBytes_GET_SIZE(key);
    keys_header->data = (const char *)numbers[1], keys_header->size = encode_uint(numbers[1], n + 1, 1);
    values_header->data = (const char *)numbers[2], values_header->size = encode_uint(numbers[2], n + 1, 1);
    *count = 4;
    return 0;
}

/* The payload at [base, base + length) with the edits (in order, not overlapping) made. */
static PyObject *edited(const unsigned char *base, Py_ssize_t length, Edit *edits, int count) {
    Py_ssize_t size = length;
    for (int e = 0; e < count; e++) size += edits[e].size - (edits[e].end - edits[e].start);
    PyObject *payload = PyBytes_FromStringAndSize(NULL, size);
    if (payload == NULL) return NULL;
    char *out = PyBytes_AS_STRING(payload);
    Py_ssize_t from = 0;
    for (int e = 0; e < count; e++) {
        memcpy(out, base + from, (size_t)(edits[e].start - from));
        out += edits[e].start - from;
        memcpy(out, edits[e].data, (size_t)edits[e].size);
        out += edits[e].size;
        from = edits[e].end;
    }
    memcpy(out, base + from, (size_t)(length - from));
    return payload;
}

/* An edit replacing the item at the reader (a child pointer, a subtree size) with one or two numbers. */
static int number_edit(Bytes *b, const unsigned char *base, uint64_t *at, Edit *e, unsigned char *number,
                       uint64_t first, int two, uint64_t second) {
    e->start = b->at - base;
    if (skip_items(b, 1, 0) < 0) return -1;
    *at += 1;
    e->end = b->at - base, e->data = (const char *)number;
    e->size = encode_uint(number, first, 0);
    if (two) e->size += encode_uint(number + e->size, second, 0);
    return 0;
}

/* append(kind, payload) -> *ptr; -1 with an exception set. Takes `payload` (NULL: an error already set).
 * The node written counts as walked through once: the next commit's path goes through it again (a
 * root, a hot branch), and bisects it on its first visit instead of comparing keys one by one. */
static int appended(SearcherObject *self, PyObject *append, int kind, PyObject *payload, uint64_t *ptr) {
    PyObject *args[2] = {payload != NULL ? PyLong_FromLong(kind) : NULL, payload};
    PyObject *written = args[0] != NULL ? PyObject_Vectorcall(append, args, 2, NULL) : NULL;
    Py_XDECREF(args[0]);
    Py_XDECREF(payload);
    int failed = written == NULL || take_pointer(written, ptr) < 0;
    Py_XDECREF(written);
    if (failed) return -1;
    if (self != NULL) self->seen[slot_of(*ptr)] = *ptr;
    return 0;
}

static PyObject *called_for_bytes(PyObject *function, PyObject *argument, const char *what) {
    PyObject *result = PyObject_CallOneArg(function, argument);
    if (result != NULL && !PyBytes_Check(result)) {
        PyErr_Format(PyExc_TypeError, "splice: %s must return bytes", what);
        Py_CLEAR(result);
    }
    return result;
}


/* A node the splice writes again. */
typedef struct {
    uint64_t ptr;
    int kind;
    Py_ssize_t length;
    Py_ssize_t first, last; /* the changes under it: [first, last) */
    int parent;             /* its parent's place in the plan; -1 at the root */
    uint64_t position;      /* its place among its parent's children */
    int64_t delta;          /* keys added minus keys removed under it */
    int split;              /* a leaf written as two halves */
    uint64_t written;       /* its new pointer (a split leaf's left half), once written */
    uint64_t right;         /* a split leaf's right half, once written */
    PyObject *separator;    /* a split leaf's: its right half's first key, encoded */
} Touched;

/* Move the reader at item *at of an array to item `index` of it. */
static int skip_to(Bytes *b, uint64_t *at, uint64_t index) {
    if (index < *at) return corrupt("changed while it was being written again");
    if (skip_items(b, index - *at, 0) < 0) return -1;
    *at = index;
    return 0;
}

/* A branch's edits, in the order of its bytes: for each changed child (`kids`, its `count_of_kids`
 * changed children, left to right), the separator before it when it split (and the separators'
 * count), its new pointer (a split leaf's two), then its subtree size (a split leaf's two). */
static int branch_edits(Touched *const *kids, int count_of_kids, Bytes *b, Edit *edits, int *count,
                        unsigned char (*numbers)[NUMBER_BYTES]) {
    const unsigned char *base = b->at, *header;
    uint64_t counts[3], at, splits = 0; /* separators, children, sizes */
    *count = 0;
    for (int j = 0; j < count_of_kids; j++) splits += kids[j]->split;
    if (open_node(b, 3) < 0) return -1;
    for (int part = 0; part < 3; part++) {
        header = b->at;
        if (take_array(b, &counts[part]) < 0) return -1;
        if (part > 0 && counts[part] != counts[0] + 1) return corrupt("has mismatched key, value and size counts");
        if (splits) {
            Edit *e = &edits[(*count)++];
            e->start = header - base, e->end = b->at - base, e->data = (const char *)numbers[*count - 1];
            e->size = encode_uint(numbers[*count - 1], counts[part] + splits, 1);
        }
        at = 0;
        for (int j = 0; j < count_of_kids; j++) {
            const Touched *child = kids[j];
            uint64_t size;
            int negative;
            if (child->position >= counts[0] + 1) return corrupt("changed while it was being written again");
            if ((part == 0 && !child->split) || (part == 2 && !child->split && child->delta == 0)) continue;
            if (skip_to(b, &at, child->position) < 0) return -1;
            Edit *e = &edits[(*count)++];
            if (part == 0) { /* the right half's first key goes before the separator that followed the leaf */
                e->start = e->end = b->at - base;
                e->data = PyBytes_AS_STRING(child->separator), e->size = PyBytes_GET_SIZE(child->separator);
            } else if (part == 1) {
                if (number_edit(b, base, &at, e, numbers[*count - 1], child->written, child->split, child->right) < 0)
                    return -1;
            } else {
                if (b->at >= b->end || !encoded_integer(b->at, b->end, &negative, &size) || negative ||
                    (int64_t)size + child->delta < 0)
                    return corrupt("a subtree size is not a count");
                uint64_t grown = (uint64_t)((int64_t)size + child->delta);
                if (child->split && grown != MAX_ENTRIES + 1) return corrupt("changed while it was being written again");
                if (number_edit(b, base, &at, e, numbers[*count - 1], child->split ? LEFT_HALF : grown, child->split,
                                MAX_ENTRIES + 1 - LEFT_HALF) < 0)
                    return -1;
            }
        }
        if (skip_to(b, &at, counts[part]) < 0) return -1;
    }
    return 0;
}

/* A leaf's payload (a dict or set leaf, `kind`) holding the entries [from, to) of the leaf payload
 * [at, end) (*first, when given: the encoding of its first key); NULL with an exception set. */
static PyObject *leaf_part(int kind, const unsigned char *at, const unsigned char *end, uint64_t from, uint64_t to,
                           PyObject **first) {
    int arrays = kind == DICT_LEAF ? 2 : 1; /* keys (and values) */
    const unsigned char *spans[2][2];
    Bytes b = {at, end};
    uint64_t n = 0, count;
    if (open_node(&b, (uint64_t)arrays) < 0) return NULL;
    for (int a = 0; a < arrays; a++) {
        if (take_array(&b, &count) < 0) return NULL;
        if (a > 0 && count != n) return corrupt("has mismatched key, value and size counts"), NULL;
        n = count;
        if (from > to || to > n) return corrupt("changed while it was being written again"), NULL;
        if (skip_items(&b, from, 0) < 0) return NULL;
        spans[a][0] = b.at;
        if (skip_items(&b, to - from, 0) < 0) return NULL;
        spans[a][1] = b.at;
        if (skip_items(&b, n - to, 0) < 0) return NULL;
    }
    if (first != NULL) {
        Bytes key = {spans[0][0], spans[0][1]};
        if (skip_items(&key, 1, 0) < 0) return NULL;
        if ((*first = PyBytes_FromStringAndSize((const char *)spans[0][0], key.at - spans[0][0])) == NULL) return NULL;
    }
    unsigned char header[3];
    Py_ssize_t h = encode_uint(header, to - from, 1), size = 1;
    for (int a = 0; a < arrays; a++) size += h + (spans[a][1] - spans[a][0]);
    PyObject *payload = PyBytes_FromStringAndSize(NULL, size);
    if (payload == NULL) return NULL;
    char *out = PyBytes_AS_STRING(payload);
    *out++ = (char)(0x90 | arrays);
    for (int a = 0; a < arrays; a++) {
        memcpy(out, header, (size_t)h), out += h;
        memcpy(out, spans[a][0], (size_t)(spans[a][1] - spans[a][0])), out += spans[a][1] - spans[a][0];
    }
    return payload;
}

/* A leaf that splits (splice's outcome 3): what it needs and what it leaves for its parent. */
typedef struct {
    int on;
    PyObject *make_entry, *old; /* the new value's encoding, asked for once the left half is written when the
                                 * new key goes to the right half (a flush writes the value with its half) */
    uint64_t left, right;       /* the halves' pointers */
    PyObject *separator;        /* the right half's first key, encoded */
} Split;

/* The atom of a level again, its length checked (atoms never change). */
static int reopen(SearcherObject *self, Mapping *m, Level *level, Bytes *b) {
    int kind;
    if (open_atom(self, m, level->ptr, b, &kind) < 0) return -1;
    if (b->end - b->at != level->length) return corrupt_at(level->ptr, "changed while it was being written again");
    return 0;
}

/* Write the full leaf with the new key in it as its two halves, the left first, as
 * TreeWriter._split_child and a flush write them; *entry NULL: asked for after the left half. */
static int write_split_leaf(SearcherObject *self, Level *level, PyObject **entry, PyObject *key, Split *split,
                            PyObject *append) {
    Mapping m = {.held = 0};
    Bytes b;
    int left_written = 0, made;
    if (reopen(self, &m, level, &b) < 0) return release(&m), -1;
    if (*entry == NULL) { /* the key goes right of the middle: the left half is the leaf's first entries */
        PyObject *left = leaf_part(DICT_LEAF, b.at, b.end, 0, LEFT_HALF, NULL);
        release(&m);
        if (appended(NULL, append, DICT_LEAF, left, &split->left) < 0) return -1;
        left_written = 1;
        if ((*entry = called_for_bytes(split->make_entry, split->old, "make_entry(old)")) == NULL) return -1;
        if (reopen(self, &m, level, &b) < 0) return release(&m), -1;
    }
    Edit edits[MAX_EDITS];
    unsigned char numbers[MAX_EDITS][NUMBER_BYTES];
    const unsigned char *base = b.at;
    PyObject *whole = plan_edits(level, &b, *entry, key, edits, &made, numbers) < 0 ? NULL
                                                                                : edited(base, level->length, edits, made);
    release(&m);
    if (whole == NULL) return -1;
    const unsigned char *at = (const unsigned char *)PyBytes_AS_STRING(whole), *end = at + PyBytes_GET_SIZE(whole);
    int failed = !left_written && appended(NULL, append, DICT_LEAF, leaf_part(DICT_LEAF, at, end, 0, LEFT_HALF, NULL),
                                           &split->left) < 0;
    if (!failed)
        failed = appended(NULL, append, DICT_LEAF, leaf_part(DICT_LEAF, at, end, LEFT_HALF, MAX_ENTRIES + 1, &split->separator),
                          &split->right) < 0;
    Py_DECREF(whole);
    return failed ? -1 : 0;
}


/* Write the levels bottom-up, each with its edits made; the new root's pointer, or NULL. `entry` is
 * NULL only for a split whose make_entry is asked later (write_split_leaf). */
static PyObject *splice_levels(SearcherObject *self, Level *levels, int count, PyObject *entry, PyObject *key,
                               PyObject *append, PyObject *retired, Split *split) {
    Mapping m = {.held = 0};
    Py_XINCREF(entry);
    for (int i = count - 1; i >= 0; i--) {
        Level *level = &levels[i];
        Bytes b;
        int edits_made, failed;
        Edit edits[MAX_EDITS];
        unsigned char numbers[MAX_EDITS][NUMBER_BYTES];
        uint64_t ptr;
        PyObject *was = Py_BuildValue("(Kn)", (unsigned long long)level->ptr, level->length);
        if (was == NULL) break;
        PyList_SET_ITEM(retired, i, was);
        if (split->on && i == count - 1) { /* the leaf, as two: its parent takes both */
            if (write_split_leaf(self, level, &entry, key, split, append) < 0) break;
            continue;
        }
        if (reopen(self, &m, level, &b) < 0) break;
        const unsigned char *base = b.at;
        if (split->on && i == count - 2) { /* the branch over the leaf that split */
            Touched leaf = {.position = level->position, .delta = 1, .split = 1, .written = split->left,
                            .right = split->right, .separator = split->separator};
            Touched *kids[1] = {&leaf};
            failed = branch_edits(kids, 1, &b, edits, &edits_made, numbers) < 0;
        } else
            failed = plan_edits(level, &b, entry, level->last_tree ? key : NULL, edits, &edits_made, numbers) < 0;
        PyObject *payload = failed ? NULL : edited(base, level->length, edits, edits_made);
        release(&m); /* append() may map or grow segments: hold none across it */
        if (appended(NULL, append, level->kind, payload, &ptr) < 0) break;
        Py_SETREF(entry, i > 0 ? child_entry(ptr, levels[i - 1].kind, level->kind) : NULL);
        if (i > 0 && entry == NULL) break;
        if (i == 0) {
            release(&m);
            return PyLong_FromUnsignedLongLong(ptr);
        }
    }
    release(&m);
    Py_XDECREF(entry);
    return NULL;
}

/* splice(root, keys, make_entry, append, pack_key, absent)
 *     -> (new root, old slot or absent, [(ptr, payload length)]) or None */
static PyObject *searcher_splice(SearcherObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6)
        return PyErr_Format(PyExc_TypeError, "splice(root, keys, make_entry, append, pack_key, absent) takes 6 arguments");
    uint64_t root;
    if (take_pointer(args[0], &root) < 0) return NULL;
    PyObject *keys = PySequence_Fast(args[1], "splice: keys must be a sequence");
    if (keys == NULL) return NULL;
    Level levels[MAX_LEVELS];
    int count;
    PyObject *old = NULL, *key = NULL, *entry = NULL, *retired = NULL, *written = NULL, *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    int found = root != 0 && n > 0 ? walk_path(self, root, keys, levels, &count, &old) : 0;
    if (found <= 0) {
        Py_DECREF(keys);
        return found < 0 ? NULL : Py_NewRef(Py_None);
    }
    if (found >= 2) {
        old = Py_NewRef(args[5]);
        key = called_for_bytes(args[4], PySequence_Fast_GET_ITEM(keys, n - 1), "pack_key(key)");
    }
    Split split = {.on = found == 3, .make_entry = args[2], .old = old};
    int later = found == 3 && levels[count - 1].position >= LEFT_HALF; /* its value is written with the right half */
    if ((found == 1 || key != NULL) && !later) entry = called_for_bytes(args[2], old, "make_entry(old)");
    if (entry != NULL || (later && key != NULL)) retired = PyList_New(count);
    if (retired != NULL) written = splice_levels(self, levels, count, entry, key, args[3], retired, &split);
    Py_XDECREF(split.separator);
    if (written != NULL) result = PyTuple_Pack(3, written, old, retired);
    Py_XDECREF(written);
    Py_XDECREF(retired);
    Py_XDECREF(entry);
    Py_XDECREF(key);
    Py_DECREF(old);
    Py_DECREF(keys);
    return result;
}

/* ---- splice_set: an index's entries added and removed in its set tree's bytes -------------------
 *
 * What TreeWriter does to a set tree for a commit's removes, then adds (an index's upkeep), written
 * in the nodes' bytes when no node merges or empties and only leaves split: every node on the keys'
 * paths is written once, bottom-up and left to right as a flush writes them, with its keys removed
 * and inserted (a leaf, written as its two halves when its last add overflows it) or its children's
 * pointers and subtree sizes set (a branch, and the separator of a child that split inserted). A
 * plan is made first and nothing is written unless the whole splice qualifies. */

#define MERGE_BELOW (MAX_ENTRIES / 4) /* btree/node.py: a node this small is merged into a neighbour */
#define PENDING (-2)                   /* a planned node whose parent is not planned yet */

/* One key of a set splice. */
typedef struct {
    Key k;
    PyObject *packed;  /* an added key's encoding (pack_key), else NULL */
    int adding;
    uint64_t position; /* in its leaf: where the key is, or goes */
} Change;


typedef struct {
    Touched *nodes;
    int count, capacity;
} Plan;

static int plan_add(Plan *plan, Touched node) {
    if (plan->count == plan->capacity) {
        int capacity = plan->capacity ? 2 * plan->capacity : 16;
        Touched *grown = PyMem_Realloc(plan->nodes, sizeof(Touched) * (size_t)capacity);
        if (grown == NULL) return PyErr_NoMemory(), -1;
        plan->nodes = grown;
        plan->capacity = capacity;
    }
    plan->nodes[plan->count++] = node;
    return 0;
}

static int not_in_order(void) {
    PyErr_SetString(PyExc_ValueError, "splice_set: the keys must be distinct and in canonical order");
    return -1;
}

/* A node's width (a leaf's keys, a branch's children), from its array headers. */
static int node_width(Bytes b, int kind, uint64_t *width) {
    if (open_node(&b, kind == SET_LEAF ? 1 : 3) < 0 || take_array(&b, width) < 0) return -1;
    if (kind == SET_BRANCH) *width += 1;
    return 0;
}

static int plan_set_node(SearcherObject *self, Plan *plan, Change *changes, Py_ssize_t first, Py_ssize_t last,
                         uint64_t ptr, int is_root, int depth);

/* Plan a leaf: each change's position, and whether it splits (*split: its last add overflows it);
 * 0 if a key to add is there or one to remove is not, or the leaf would split more than once or
 * as the root (the tree would grow), go under MERGE_BELOW (it would be merged) or, as the root, empty. */
static int plan_set_leaf(NodeIndex *index, Bytes b, Change *changes, Py_ssize_t first, Py_ssize_t last, int is_root,
                         uint64_t width, int *split) {
    uint64_t removed = 0, added = 0, lowest = 0; /* where the next change may be: past a removed key */
    for (Py_ssize_t j = first; j < last; j++) {
        Change *c = &changes[j];
        int equal;
        uint64_t position, count;
        if (index != NULL) {
            int64_t i = indexed_bisect(index, b.at, b.end, &c->k, 0, &equal);
            if (i < 0) return -1;
            position = (uint64_t)i;
        } else {
            Bytes scan = b;
            if (open_node(&scan, 1) < 0 || find_key(&scan, &c->k, &count, &position, &equal) < 0) return -1;
        }
        if (equal == c->adding) return 0; /* path copying would change nothing, or raise */
        if (position < lowest) return not_in_order();
        lowest = position + !c->adding;
        c->position = position;
        removed += !c->adding;
        added += c->adding;
    }
    uint64_t final = width - removed + added;
    if (removed && !is_root && width - removed < MERGE_BELOW) return 0;
    if (final > MAX_ENTRIES + 1 || (is_root && (final == 0 || final > MAX_ENTRIES))) return 0;
    *split = final == MAX_ENTRIES + 1;
    return 1;
}

/* Plan a branch: the child each change goes to, then each child with changes, left to right; 0 if a
 * remove goes through it while it could be merged (or, as the root, replaced by its one child). */
static int plan_set_branch(SearcherObject *self, Plan *plan, NodeIndex *index, Bytes b, Mapping *m, Change *changes,
                           Py_ssize_t first, Py_ssize_t last, int is_root, uint64_t width, int depth) {
    Py_ssize_t n = last - first;
    uint64_t *positions = PyMem_Malloc(sizeof(uint64_t) * 2 * (size_t)n);
    if (positions == NULL) return PyErr_NoMemory(), -1;
    uint64_t *children = positions + n;
    int removing = 0, outcome = 1;
    for (Py_ssize_t j = 0; j < n && outcome == 1; j++) {
        Bytes scan = b;
        removing |= !changes[first + j].adding;
        uint64_t ignored;
        if (branch_step(index, &scan, &changes[first + j].k, &positions[j], &children[j], &ignored) < 0)
            outcome = -1;
        else if (j > 0 && positions[j] < positions[j - 1])
            outcome = not_in_order();
    }
    if (outcome == 1 && removing && (is_root ? width < 2 : width < MERGE_BELOW)) outcome = 0;
    release(m); /* the children are read next: hold nothing of this node */
    for (Py_ssize_t j = 0; j < n && outcome == 1;) {
        Py_ssize_t end = j + 1;
        while (end < n && positions[end] == positions[j]) end++;
        outcome = plan_set_node(self, plan, changes, first + j, first + end, children[j], 0, depth + 1);
        if (outcome == 1) plan->nodes[plan->count - 1].position = positions[j]; /* the child, planned last */
        j = end;
    }
    PyMem_Free(positions);
    return outcome;
}

/* Plan the node at `ptr` with the changes [first, last) under it, after its children (post-order). */
static int plan_set_node(SearcherObject *self, Plan *plan, Change *changes, Py_ssize_t first, Py_ssize_t last,
                         uint64_t ptr, int is_root, int depth) {
    if (depth > MAX_DEPTH) return corrupt_at(ptr, "the tree is deeper than any tree can be (a cycle)");
    Mapping m = {.held = 0};
    Bytes b;
    int kind, outcome = -1, start = plan->count, split = 0;
    uint64_t width;
    if (open_atom(self, &m, ptr, &b, &kind) < 0) return release(&m), -1;
    if (kind != SET_LEAF && kind != SET_BRANCH) return release(&m), corrupt_at(ptr, "not a node of its tree");
    Py_ssize_t length = b.end - b.at;
    NodeIndex *index = indexed(self, ptr, kind, &b);
    if ((index != NULL || !PyErr_Occurred()) && node_width(b, kind, &width) == 0) {
        if (kind == SET_LEAF)
            outcome = plan_set_leaf(index, b, changes, first, last, is_root, width, &split);
        else {
            NodeIndex *held = index;
            index = NULL;
            outcome = plan_set_branch(self, plan, held, b, &m, changes, first, last, is_root, width, depth);
            give_back(self, held);
        }
    }
    give_back(self, index);
    release(&m);
    if (outcome != 1) return outcome;
    uint64_t splits = 0; /* children that split: each one more child here, which must not split it */
    for (int j = start; j < plan->count; j++) splits += plan->nodes[j].parent == PENDING && plan->nodes[j].split;
    if (kind == SET_BRANCH && width + splits > MAX_ENTRIES) return 0;
    int64_t delta = 0;
    for (Py_ssize_t j = first; j < last; j++) delta += changes[j].adding ? 1 : -1;
    Touched node = {.ptr = ptr, .kind = kind, .length = length, .first = first, .last = last,
                    .parent = is_root ? -1 : PENDING, .delta = delta, .split = split};
    for (int j = start; j < plan->count; j++)
        if (plan->nodes[j].parent == PENDING) plan->nodes[j].parent = plan->count; /* its children */
    return plan_add(plan, node) < 0 ? -1 : 1;
}

/* A planned leaf's edits: its keys array's header, then each key inserted or removed, in order. */
static int leaf_edits(Touched *t, Bytes *b, Change *changes, Edit *edits, int *count,
                      unsigned char (*numbers)[NUMBER_BYTES]) {
    const unsigned char *base = b->at;
    uint64_t n, at = 0;
    if (open_node(b, 1) < 0) return -1;
    Py_ssize_t header = b->at - base;
    if (take_array(b, &n) < 0) return -1;
    edits[0] = (Edit){.start = header, .end = b->at - base, .data = (const char *)numbers[0]};
    edits[0].size = encode_uint(numbers[0], (uint64_t)((int64_t)n + t->delta), 1);
    *count = 1;
    for (Py_ssize_t j = t->first; j < t->last; j++) {
        Change *c = &changes[j];
        if (c->position > n) return corrupt("changed while it was being written again");
        if (skip_items(b, c->position - at, 0) < 0) return -1;
        at = c->position;
        Edit *e = &edits[(*count)++];
        e->start = e->end = b->at - base;
        if (c->adding) {
            e->data = PyBytes_AS_STRING(c->packed), e->size = PyBytes_GET_SIZE(c->packed);
            continue;
        }
        if (skip_items(b, 1, 0) < 0) return -1;
        at++;
        e->end = b->at - base, e->data = "", e->size = 0;
    }
    return 0;
}



/* Write the plan's nodes in order, each with its edits made; 0, or -1 with an exception set. */
static int write_plan(SearcherObject *self, Plan *plan, Change *changes, PyObject *append) {
    for (int i = 0; i < plan->count; i++) {
        Touched *t = &plan->nodes[i];
        Mapping m = {.held = 0};
        Bytes b;
        int kind, made = 0, failed;
        Py_ssize_t most = 3 + 3 * (t->last - t->first); /* a branch's: three headers, three per child */
        Edit *edits = PyMem_Malloc((sizeof(Edit) + sizeof(Touched *) + NUMBER_BYTES) * (size_t)most);
        if (edits == NULL) return PyErr_NoMemory(), -1;
        Touched **kids = (Touched **)(edits + most);
        int count_of_kids = 0;
        unsigned char (*numbers)[NUMBER_BYTES] = (unsigned char (*)[NUMBER_BYTES])(kids + most);
        for (int j = 0; j < i; j++)
            if (plan->nodes[j].parent == i) kids[count_of_kids++] = &plan->nodes[j];
        failed = open_atom(self, &m, t->ptr, &b, &kind) < 0;
        if (!failed && b.end - b.at != t->length) /* atoms never change: this one did */
            failed = corrupt_at(t->ptr, "changed while it was being written again");
        const unsigned char *base = b.at;
        if (!failed)
            failed = (t->kind == SET_LEAF ? leaf_edits(t, &b, changes, edits, &made, numbers)
                                          : branch_edits(kids, count_of_kids, &b, edits, &made, numbers)) < 0;
        PyObject *payload = failed ? NULL : edited(base, t->length, edits, made), *right = NULL;
        release(&m); /* append() may map or grow segments: hold none across it */
        PyMem_Free(edits);
        if (payload != NULL && t->split) { /* its halves, as TreeWriter._split_child makes them */
            PyObject *whole = payload;
            const unsigned char *at = (const unsigned char *)PyBytes_AS_STRING(whole), *end = at + PyBytes_GET_SIZE(whole);
            payload = leaf_part(SET_LEAF, at, end, 0, LEFT_HALF, NULL);
            right = payload != NULL ? leaf_part(SET_LEAF, at, end, LEFT_HALF, MAX_ENTRIES + 1, &t->separator) : NULL;
            if (right == NULL) Py_CLEAR(payload);
            Py_DECREF(whole);
        }
        if (appended(self, append, t->kind, payload, &t->written) < 0) return Py_XDECREF(right), -1;
        if (t->split && appended(self, append, t->kind, right, &t->right) < 0) return -1;
    }
    return 0;
}

/* The keys and their changes prepared (an added key packed); 0 if a key is of no key type. */
static int prepare_changes(PyObject *keys, PyObject *adding, PyObject *pack_key, Change *changes, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n; j++) {
        Change *c = &changes[j];
        int flag = PyObject_IsTrue(PySequence_Fast_GET_ITEM(adding, j));
        if (flag < 0) return -1;
        c->adding = flag;
        int ok = prepare_key(&c->k, PySequence_Fast_GET_ITEM(keys, j));
        if (ok <= 0) return ok;
        if (flag && (c->packed = called_for_bytes(pack_key, c->k.key, "pack_key(key)")) == NULL) return -1;
    }
    return 1;
}

/* The plans of the last dry runs that qualified: the write that follows a dry run (Writer's index
 * upkeep checks every index, then writes each) takes its plan instead of making it again. A plan
 * only reads immutable atoms, and a root pointer names one tree forever, so a plan stays right for
 * as long as its arguments are the same; it holds its own references to them. */

#define DRY_RUNS 4 /* an index each, of the collection being written */

typedef struct DryRun {
    uint64_t root;
    PyObject *keys, *adding, *pack_key; /* tuples of the keys and flags, and pack_key; NULL: an empty slot */
    Change *changes;
    Py_ssize_t n;
    Plan plan;
} DryRun;

static void free_changes(Change *changes, Py_ssize_t n, Plan *plan) {
    for (Py_ssize_t j = 0; changes != NULL && j < n; j++) {
        release_key(&changes[j].k);
        Py_XDECREF(changes[j].packed);
    }
    for (int i = 0; i < plan->count; i++) Py_XDECREF(plan->nodes[i].separator);
    PyMem_Free(changes);
    PyMem_Free(plan->nodes);
}

static void clear_dry_run(DryRun *run) {
    if (run->keys == NULL) return;
    free_changes(run->changes, run->n, &run->plan);
    Py_CLEAR(run->keys);
    Py_CLEAR(run->adding);
    Py_CLEAR(run->pack_key);
}

static void forget_dry_runs(SearcherObject *self) {
    for (int i = 0; self->dry_runs != NULL && i < DRY_RUNS; i++) clear_dry_run(&self->dry_runs[i]);
    PyMem_Free(self->dry_runs);
    self->dry_runs = NULL;
}

/* 1 if `sequence` (a fast sequence) holds the items of `tuple`, each equal; -1 on error. */
static int same_items(PyObject *tuple, PyObject *sequence) {
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    if (PySequence_Fast_GET_SIZE(sequence) != n) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int equal = PyObject_RichCompareBool(PyTuple_GET_ITEM(tuple, i), PySequence_Fast_GET_ITEM(sequence, i), Py_EQ);
        if (equal != 1) return equal;
    }
    return 1;
}

/* The dry run of these arguments, taken out of the table (the caller owns its changes and plan);
 * 0 if there is none, -1 on error. */
static int take_dry_run(SearcherObject *self, uint64_t root, PyObject *keys, PyObject *adding, PyObject *pack_key,
                        DryRun *taken) {
    for (int i = 0; self->dry_runs != NULL && i < DRY_RUNS; i++) {
        DryRun *run = &self->dry_runs[i];
        if (run->keys == NULL || run->root != root || run->pack_key != pack_key) continue;
        int same = same_items(run->keys, keys);
        if (same == 1) same = same_items(run->adding, adding);
        if (same < 0) return -1;
        if (same == 0) continue;
        *taken = *run;
        memset(run, 0, sizeof *run);
        return 1;
    }
    return 0;
}

/* Keep a qualified dry run's plan for the write that follows it; takes `changes` and `plan`. */
static void keep_dry_run(SearcherObject *self, uint64_t root, PyObject *keys, PyObject *adding, PyObject *pack_key,
                         Change *changes, Py_ssize_t n, Plan *plan) {
    if (self->dry_runs == NULL) self->dry_runs = PyMem_Calloc(DRY_RUNS, sizeof(DryRun));
    PyObject *key_items = self->dry_runs != NULL ? PySequence_Tuple(keys) : NULL;
    PyObject *flags = key_items != NULL ? PySequence_Tuple(adding) : NULL;
    if (flags == NULL) { /* no memory: the write makes its plan again */
        PyErr_Clear();
        Py_XDECREF(key_items);
        free_changes(changes, n, plan);
        return;
    }
    DryRun *run = &self->dry_runs[self->next_dry_run];
    self->next_dry_run = (self->next_dry_run + 1) % DRY_RUNS;
    clear_dry_run(run);
    *run = (DryRun){.root = root, .keys = key_items, .adding = flags, .pack_key = Py_NewRef(pack_key),
                    .changes = changes, .n = n, .plan = *plan};
}

/* splice_set(root, keys, adding, append, pack_key) -> (new root, [(ptr, payload length)]) or None;
 * with append None, a dry run: (0, the same list), or None, writing nothing. */
static PyObject *searcher_splice_set(SearcherObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) return PyErr_Format(PyExc_TypeError, "splice_set(root, keys, adding, append, pack_key) takes 5 arguments");
    uint64_t root;
    if (take_pointer(args[0], &root) < 0) return NULL;
    PyObject *keys = PySequence_Fast(args[1], "splice_set: keys must be a sequence"), *adding = NULL, *result = NULL;
    if (keys != NULL) adding = PySequence_Fast(args[2], "splice_set: adding must be a sequence");
    if (adding == NULL) return Py_XDECREF(keys), NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    if (PySequence_Fast_GET_SIZE(adding) != n) {
        PyErr_SetString(PyExc_ValueError, "splice_set: one adding flag per key");
        n = -1;
    }
    int writing = args[3] != Py_None;
    DryRun run = {.keys = NULL};
    int outcome = n < 0 ? -1 : writing && n > 0 ? take_dry_run(self, root, keys, adding, args[4], &run) : 0;
    Change *changes = run.changes;
    Plan plan = run.plan;
    if (outcome == 0) {
        changes = n > 0 ? PyMem_Calloc((size_t)n, sizeof(Change)) : NULL;
        if (n > 0 && changes == NULL)
            outcome = (PyErr_NoMemory(), -1);
        else if (n > 0 && root != 0 && (outcome = prepare_changes(keys, adding, args[4], changes, n)) == 1)
            outcome = plan_set_node(self, &plan, changes, 0, n, root, 1, 0);
    }
    if (outcome == 1 && writing) outcome = write_plan(self, &plan, changes, args[3]) < 0 ? -1 : 1;
    if (outcome == 1) {
        PyObject *retired = PyList_New(plan.count);
        for (int i = 0; retired != NULL && i < plan.count; i++) {
            PyObject *was = Py_BuildValue("(Kn)", (unsigned long long)plan.nodes[i].ptr, plan.nodes[i].length);
            if (was == NULL) Py_CLEAR(retired);
            else PyList_SET_ITEM(retired, i, was);
        }
        uint64_t written = args[3] != Py_None ? plan.nodes[plan.count - 1].written : 0;
        result = retired != NULL ? Py_BuildValue("(KN)", (unsigned long long)written, retired) : NULL;
    } else if (outcome == 0)
        result = Py_NewRef(Py_None);
    Py_XDECREF(run.keys);
    Py_XDECREF(run.adding);
    Py_XDECREF(run.pack_key);
    if (result != NULL && outcome == 1 && !writing)
        keep_dry_run(self, root, keys, adding, args[4], changes, n, &plan);
    else
        free_changes(changes, n, &plan);
    Py_DECREF(keys);
    Py_DECREF(adding);
    return result;
}

static int searcher_init(SearcherObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"buffers", "atom", "fallback", NULL};
    PyObject *buffers, *atom, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OO:Searcher", keywords, &PyDict_Type, &buffers, &atom, &fallback))
        return -1;
    if (unpack_function == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cnode.configure() was not called");
        return -1;
    }
    Py_INCREF(buffers);
    Py_INCREF(atom);
    Py_INCREF(fallback);
    Py_XSETREF(self->buffers, buffers);
    Py_XSETREF(self->atom, atom);
    Py_XSETREF(self->fallback, fallback);
    return 0;
}

static int searcher_traverse(SearcherObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->buffers);
    Py_VISIT(self->atom);
    Py_VISIT(self->fallback);
    for (int i = 0; self->dry_runs != NULL && i < DRY_RUNS; i++) {
        Py_VISIT(self->dry_runs[i].keys);
        Py_VISIT(self->dry_runs[i].adding);
        Py_VISIT(self->dry_runs[i].pack_key);
    }
    return 0;
}

static int searcher_clear(SearcherObject *self) {
    forget_indexes(self);
    forget_dry_runs(self);
    Py_CLEAR(self->buffers);
    Py_CLEAR(self->atom);
    Py_CLEAR(self->fallback);
    return 0;
}

static void searcher_dealloc(SearcherObject *self) {
    PyObject_GC_UnTrack(self);
    searcher_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef searcher_methods[] = {
    {"lookup", (PyCFunction)(void (*)(void))searcher_lookup, METH_FASTCALL,
     "lookup(root, key, leaf_kind) -> the slot under key; KeyError if absent (search.Searcher.lookup)"},
    {"value", (PyCFunction)(void (*)(void))searcher_value, METH_FASTCALL,
     "value(ptr, ref) -> (the VALUE atom at ptr decoded frozen, its payload length) (search.Searcher.value)"},
    {"splice", (PyCFunction)(void (*)(void))searcher_splice, METH_FASTCALL,
     "splice(root, keys, make_entry, append, pack_key, absent) -> (new root, old slot, [(ptr, payload length)]) "
     "or None: the value at a path of dict trees set in the nodes' bytes (search.Searcher.splice)"},
    {"splice_set", (PyCFunction)(void (*)(void))searcher_splice_set, METH_FASTCALL,
     "splice_set(root, keys, adding, append, pack_key) -> (new root, [(ptr, payload length)]) or None: keys "
     "removed from and added to a set tree in the nodes' bytes (search.Searcher.splice_set)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SearcherType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "protobase.core.cnode.Searcher",
    .tp_basicsize = sizeof(SearcherObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Searcher(buffers, atom, fallback): point lookups in a process's mapped trees (search.Searcher)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)searcher_init,
    .tp_dealloc = (destructor)searcher_dealloc,
    .tp_traverse = (traverseproc)searcher_traverse,
    .tp_clear = (inquiry)searcher_clear,
    .tp_methods = searcher_methods,
};

/* ---- the module ------------------------------------------------------------------------- */

static PyObject *configure(PyObject *module, PyObject *args) {
    PyObject *values[8];
    if (!PyArg_ParseTuple(args, "OOOOOOOO:configure", &values[0], &values[1], &values[2], &values[3], &values[4],
                          &values[5], &values[6], &values[7]))
        return NULL;
    PyObject **slots[] = {&unpack_function, &ref_type,     &corruption_error, &order_key,
                          &decimal_type,    &uuid_type,    &frozen_dict,      &frozen_list};
    for (int i = 0; i < 8; i++) {
        Py_INCREF(values[i]);
        Py_XSETREF(*slots[i], values[i]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(unpack, Ref, CorruptionError, order_key, Decimal, UUID, FrozenDict, FrozenList): what search.py "
     "hands over"},
    {"leaf_slot", (PyCFunction)(void (*)(void))leaf_slot, METH_FASTCALL,
     "leaf_slot(kind, payload, key) -> the slot under key in an encoded leaf; KeyError if absent"},
    {"branch_child", (PyCFunction)(void (*)(void))branch_child, METH_FASTCALL,
     "branch_child(kind, payload, key) -> the pointer of the child of an encoded branch that may hold key"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "protobase.core.cnode", "The compiled twin of btree/search.py.", -1, methods,
};

PyMODINIT_FUNC PyInit_cnode(void) {
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) return NULL;
    if (PyType_Ready(&SearcherType) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) return NULL;
    Py_INCREF(&SearcherType);
    if (PyModule_AddObject(module, "Searcher", (PyObject *)&SearcherType) < 0) {
        Py_DECREF(&SearcherType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
