/* protobase.core.ccodec: the compiled twins of the pure-Python hot paths of core/.
 *
 * Owns nothing of its own: it mirrors, function for function, the
 * pure-Python functions that every commit and every cold read spends its
 * time in:
 *
 *     pack(value) -> bytes                            codec.pack_python
 *     unpack(data, frozen, ref, opaque[, records])    codec.unpack_python
 *     Ref(ptr, kind)                                  codec.Ref
 *     Packed(payload)                                 codec.Packed
 *     SortedEntries(keys, values)                     codec.SortedEntries
 *     packed_get(payload, key, default, unknown)      codec.packed_get_python
 *     collect_simple_entries(pairs, field, ...)       index.collect_simple_entries_python
 *     freeze(value)                                   frozen.freeze_python
 *     storable(value, depth) -> bool                  the fast path of codec.validate and
 *                                                     client/writeset.check_keys (False: ask them)
 *
 * codec.py and frozen.py hand it their types and hooks (configure,
 * configure_frozen) when they are imported.
 *
 * Runs in every process that imports protobase (clients, coordinator,
 * persistence), unless PROTOBASE_PURE_PYTHON=1 selects the fallback.
 *
 * Invariant: for every value, pack() returns byte for byte what
 * codec.pack_python() returns (msgpack with use_bin_type and strict_types,
 * plus ProtoBase's extension types), and unpack() returns what
 * codec.unpack_python() returns for every byte string pack_python produced
 * (with `records`: a Packed of exactly the bytes a plain record's map took,
 * where the Python twin packs the dict it decoded; `records` keeps a map as
 * its bytes only if they are canonical, so both give the same Packed).
 * Types this module does not encode itself (datetime, Decimal, UUID,
 * dataclasses, ints beyond 64 bits, transaction wrappers) are handed to the
 * Python `default` given to configure(), and extension codes it does not
 * decode itself to its `rare_hook`: the Python code stays
 * the one definition of those formats. Decoding trusts nothing: every length
 * is checked against the bytes that remain before anything is allocated, and
 * every failure is a ValueError or TypeError (codec.decode makes it a
 * CorruptionError).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

/* Extension codes: codec.py's EXT_* constants. */
#define EXT_REF 1
#define EXT_TUPLE 2
#define EXT_SET 3
#define EXT_FROZENSET 10

#define REF_KIND_SHIFT 60
#define REF_POINTER_MASK ((UINT64_C(1) << REF_KIND_SHIFT) - 1)

/* msgpack-python's packer refuses to nest deeper than 511; its unpacker stacks 1024. */
#define PACK_NEST_LIMIT 511
#define UNPACK_NEST_LIMIT 1024

/* Set by configure() (codec.py) and configure_frozen() (frozen.py); strong references kept for the
 * life of the process. */
static PyObject *frozen_dict;  /* frozen.FrozenDict */
static PyObject *frozen_list;  /* frozen.FrozenList */
static PyObject *frozen_set;   /* frozen.FrozenSet */
static PyObject *ext_type;     /* msgpack.ExtType */
static PyObject *default_hook; /* codec's encoder of the types handled in Python */
static PyObject *rare_hook;    /* codec's decoder of the extensions handled in Python */
static PyObject *freeze_hook;  /* frozen.freeze_python, for whatever freeze() does not copy itself */
static PyObject *decimal_type, *uuid_type, *datetime_type, *date_type; /* scalars of the stdlib */

/* ---- Ref: a reference to a value stored in its own atom (codec.Ref, compiled) ------------- */

typedef struct {
    PyObject_HEAD
    PyObject *ptr;  /* AtomPointer of the referenced atom (an int) */
    PyObject *kind; /* atom kind (an int), so a reader knows the shape without a fetch */
} RefObject;

static PyTypeObject RefType;

static PyObject *ref_new_from(PyObject *ptr, PyObject *kind) {
    RefObject *self = PyObject_New(RefObject, &RefType);
    if (self == NULL) return NULL;
    Py_INCREF(ptr);
    Py_INCREF(kind);
    self->ptr = ptr;
    self->kind = kind;
    return (PyObject *)self;
}

static PyObject *ref_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"ptr", "kind", NULL};
    PyObject *ptr, *kind;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:Ref", keywords, &ptr, &kind)) return NULL;
    return ref_new_from(ptr, kind);
}

static void ref_dealloc(RefObject *self) {
    Py_DECREF(self->ptr);
    Py_DECREF(self->kind);
    PyObject_Free(self);
}

static PyObject *ref_richcompare(PyObject *a, PyObject *b, int op) {
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(b, &RefType)) Py_RETURN_NOTIMPLEMENTED;
    return PyObject_RichCompare(((RefObject *)a)->ptr, ((RefObject *)b)->ptr, op);
}

static Py_hash_t ref_hash(RefObject *self) { return PyObject_Hash(self->ptr); }

static PyObject *ref_repr(RefObject *self) {
    PyObject *hex = PyNumber_ToBase(self->ptr, 16);
    if (hex == NULL) return NULL;
    PyObject *text = PyUnicode_FromFormat("Ref(%U, kind=%R)", hex, self->kind);
    Py_DECREF(hex);
    return text;
}

static PyObject *ref_reduce(RefObject *self, PyObject *unused) {
    return Py_BuildValue("O(OO)", (PyObject *)Py_TYPE(self), self->ptr, self->kind);
}

static PyMemberDef ref_members[] = {
    {"ptr", T_OBJECT_EX, offsetof(RefObject, ptr), READONLY, "AtomPointer of the referenced atom"},
    {"kind", T_OBJECT_EX, offsetof(RefObject, kind), READONLY, "atom kind of the referenced atom"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef ref_methods[] = {
    {"__reduce__", (PyCFunction)ref_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RefType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "protobase.core.ccodec.Ref",
    .tp_doc = "A reference to a value stored in its own atom: (AtomPointer, atom kind).",
    .tp_basicsize = sizeof(RefObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = ref_new,
    .tp_dealloc = (destructor)ref_dealloc,
    .tp_richcompare = ref_richcompare,
    .tp_hash = (hashfunc)ref_hash,
    .tp_repr = (reprfunc)ref_repr,
    .tp_members = ref_members,
    .tp_methods = ref_methods,
};

/* ---- Packed: a small plain record kept as its encoding (codec.Packed, compiled) ----------- */

typedef struct {
    PyObject_HEAD
    PyObject *payload; /* bytes: what pack() gives for the dict it stands for */
} PackedObject;

static PyTypeObject PackedType;

static PyObject *packed_new_from(const unsigned char *bytes, Py_ssize_t n) {
    PyObject *payload = PyBytes_FromStringAndSize((const char *)bytes, n);
    if (payload == NULL) return NULL;
    PackedObject *self = PyObject_New(PackedObject, &PackedType);
    if (self == NULL) {
        Py_DECREF(payload);
        return NULL;
    }
    self->payload = payload;
    return (PyObject *)self;
}

static PyObject *packed_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"payload", NULL};
    PyObject *payload;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "S:Packed", keywords, &payload)) return NULL;
    return packed_new_from((const unsigned char *)PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload));
}

static void packed_dealloc(PackedObject *self) {
    Py_DECREF(self->payload);
    PyObject_Free(self);
}

static PyObject *packed_richcompare(PyObject *a, PyObject *b, int op) {
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(b, &PackedType)) Py_RETURN_NOTIMPLEMENTED;
    return PyObject_RichCompare(((PackedObject *)a)->payload, ((PackedObject *)b)->payload, op);
}

static PyObject *packed_repr(PackedObject *self) { return PyUnicode_FromFormat("Packed(%R)", self->payload); }

static PyMemberDef packed_members[] = {
    {"payload", T_OBJECT_EX, offsetof(PackedObject, payload), READONLY, "the record's encoding"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject PackedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "protobase.core.ccodec.Packed",
    .tp_doc = "A small plain record kept as its encoding: the coordinator's working form of it.",
    .tp_basicsize = sizeof(PackedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = packed_new,
    .tp_dealloc = (destructor)packed_dealloc,
    .tp_richcompare = packed_richcompare,
    .tp_hash = PyObject_HashNotImplemented, /* like the dict it stands for */
    .tp_repr = (reprfunc)packed_repr,
    .tp_members = packed_members,
};

/* ---- SortedEntries: a large map of a commit whose text keys came in order (codec.SortedEntries) ---- */

typedef struct {
    PyObject_HEAD
    PyObject *keys;   /* list of str, strictly increasing */
    PyObject *values; /* list, parallel to keys */
} SortedEntriesObject;

static PyTypeObject SortedEntriesType;

static PyObject *sorted_entries_from(PyObject *keys, PyObject *values) {
    SortedEntriesObject *self = PyObject_New(SortedEntriesObject, &SortedEntriesType);
    if (self == NULL) return NULL;
    Py_INCREF(keys);
    Py_INCREF(values);
    self->keys = keys;
    self->values = values;
    return (PyObject *)self;
}

static PyObject *sorted_entries_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"keys", "values", NULL};
    PyObject *keys, *values;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!:SortedEntries", keywords, &PyList_Type, &keys, &PyList_Type,
                                     &values))
        return NULL;
    return sorted_entries_from(keys, values);
}

static void sorted_entries_dealloc(SortedEntriesObject *self) {
    Py_DECREF(self->keys);
    Py_DECREF(self->values);
    PyObject_Free(self);
}

static PyObject *sorted_entries_richcompare(PyObject *a, PyObject *b, int op) {
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(b, &SortedEntriesType)) Py_RETURN_NOTIMPLEMENTED;
    SortedEntriesObject *x = (SortedEntriesObject *)a, *y = (SortedEntriesObject *)b;
    int same = PyObject_RichCompareBool(x->keys, y->keys, Py_EQ);
    if (same == 1) same = PyObject_RichCompareBool(x->values, y->values, Py_EQ);
    if (same < 0) return NULL;
    return PyBool_FromLong(op == Py_EQ ? same : !same);
}

static Py_ssize_t sorted_entries_length(SortedEntriesObject *self) { return PyList_GET_SIZE(self->keys); }

static PyObject *sorted_entries_repr(SortedEntriesObject *self) {
    return PyUnicode_FromFormat("SortedEntries(<%zd entries>)", PyList_GET_SIZE(self->keys));
}

static PyMemberDef sorted_entries_members[] = {
    {"keys", T_OBJECT_EX, offsetof(SortedEntriesObject, keys), READONLY, "the keys, str in increasing order"},
    {"values", T_OBJECT_EX, offsetof(SortedEntriesObject, values), READONLY, "the values, parallel to keys"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods sorted_entries_sequence = {.sq_length = (lenfunc)sorted_entries_length};

static PyTypeObject SortedEntriesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "protobase.core.ccodec.SortedEntries",
    .tp_doc = "A large map of a commit whose text keys came in increasing order: its keys and values as lists.",
    .tp_basicsize = sizeof(SortedEntriesObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = sorted_entries_new,
    .tp_dealloc = (destructor)sorted_entries_dealloc,
    .tp_richcompare = sorted_entries_richcompare,
    .tp_hash = PyObject_HashNotImplemented, /* like the dict it stands for */
    .tp_repr = (reprfunc)sorted_entries_repr,
    .tp_as_sequence = &sorted_entries_sequence,
    .tp_members = sorted_entries_members,
};

/* ---- the output buffer ------------------------------------------------------------------ */

typedef struct {
    char *data;
    Py_ssize_t length;
    Py_ssize_t capacity;
    char inline_space[512]; /* most values (keys, small records) fit without a heap buffer */
} Buffer;

static void buffer_init(Buffer *b) {
    b->data = b->inline_space;
    b->length = 0;
    b->capacity = (Py_ssize_t)sizeof(b->inline_space);
}

static void buffer_free(Buffer *b) {
    if (b->data != b->inline_space) PyMem_Free(b->data);
}

static int buffer_reserve(Buffer *b, Py_ssize_t extra) {
    if (b->length + extra <= b->capacity) return 0;
    Py_ssize_t wanted = b->capacity * 2;
    if (wanted < b->length + extra) wanted = b->length + extra;
    char *grown;
    if (b->data == b->inline_space) {
        grown = PyMem_Malloc((size_t)wanted);
        if (grown != NULL) memcpy(grown, b->data, (size_t)b->length);
    } else {
        grown = PyMem_Realloc(b->data, (size_t)wanted);
    }
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = grown;
    b->capacity = wanted;
    return 0;
}

static int buffer_write(Buffer *b, const void *bytes, Py_ssize_t n) {
    if (buffer_reserve(b, n) < 0) return -1;
    memcpy(b->data + b->length, bytes, (size_t)n);
    b->length += n;
    return 0;
}

/* A type byte followed by an n-byte big-endian number. */
static int write_tagged(Buffer *b, unsigned char tag, uint64_t number, int n) {
    unsigned char out[9];
    out[0] = tag;
    for (int i = 0; i < n; i++) out[1 + i] = (unsigned char)(number >> (8 * (n - 1 - i)));
    return buffer_write(b, out, 1 + n);
}

/* ---- packing: msgpack-python's choices of encoding, exactly ----------------------------- */

static int pack_unsigned(Buffer *b, uint64_t v) {
    if (v < 128) return write_tagged(b, (unsigned char)v, 0, 0);
    if (v < 256) return write_tagged(b, 0xcc, v, 1);
    if (v < 65536) return write_tagged(b, 0xcd, v, 2);
    if (v < (UINT64_C(1) << 32)) return write_tagged(b, 0xce, v, 4);
    return write_tagged(b, 0xcf, v, 8);
}

static int pack_signed(Buffer *b, int64_t v) {
    if (v >= 0) return pack_unsigned(b, (uint64_t)v);
    if (v >= -32) return write_tagged(b, (unsigned char)(int8_t)v, 0, 0);
    if (v >= -128) return write_tagged(b, 0xd0, (uint64_t)v & 0xff, 1);
    if (v >= -32768) return write_tagged(b, 0xd1, (uint64_t)v & 0xffff, 2);
    if (v >= -(INT64_C(1) << 31)) return write_tagged(b, 0xd2, (uint64_t)v & 0xffffffffu, 4);
    return write_tagged(b, 0xd3, (uint64_t)v, 8);
}

/* 1: packed; 0: outside 64 bits (the Python default encodes it); -1: error. */
static int pack_int(Buffer *b, PyObject *o) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow == 0) {
        if (v == -1 && PyErr_Occurred()) return -1;
        return pack_signed(b, v) < 0 ? -1 : 1;
    }
    if (overflow < 0) return 0;
    unsigned long long u = PyLong_AsUnsignedLongLong(o);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        return 0;
    }
    return pack_unsigned(b, u) < 0 ? -1 : 1;
}

static int pack_double(Buffer *b, double d) {
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    return write_tagged(b, 0xcb, bits, 8);
}

static int check_item_limit(Py_ssize_t n, const char *what) {
    if ((uint64_t)n > UINT64_C(0xffffffff)) {
        PyErr_Format(PyExc_ValueError, "%s is too large", what);
        return -1;
    }
    return 0;
}

static int pack_bin(Buffer *b, const char *bytes, Py_ssize_t n) {
    if (check_item_limit(n, "bytes object") < 0) return -1;
    int r = n < 256 ? write_tagged(b, 0xc4, (uint64_t)n, 1)
            : n < 65536 ? write_tagged(b, 0xc5, (uint64_t)n, 2)
                        : write_tagged(b, 0xc6, (uint64_t)n, 4);
    return r < 0 ? -1 : buffer_write(b, bytes, n);
}

static int pack_str(Buffer *b, PyObject *o) {
    Py_ssize_t n;
    const char *text = PyUnicode_AsUTF8AndSize(o, &n);
    if (text == NULL) return -1; /* surrogates: codec.encode's validate names the path */
    if (check_item_limit(n, "unicode string") < 0) return -1;
    int r = n < 32 ? write_tagged(b, (unsigned char)(0xa0 | n), 0, 0)
            : n < 256 ? write_tagged(b, 0xd9, (uint64_t)n, 1)
            : n < 65536 ? write_tagged(b, 0xda, (uint64_t)n, 2)
                        : write_tagged(b, 0xdb, (uint64_t)n, 4);
    return r < 0 ? -1 : buffer_write(b, text, n);
}

static int pack_array_header(Buffer *b, Py_ssize_t n) {
    if (check_item_limit(n, "list") < 0) return -1;
    if (n < 16) return write_tagged(b, (unsigned char)(0x90 | n), 0, 0);
    if (n < 65536) return write_tagged(b, 0xdc, (uint64_t)n, 2);
    return write_tagged(b, 0xdd, (uint64_t)n, 4);
}

static int pack_map_header(Buffer *b, Py_ssize_t n) {
    if (check_item_limit(n, "dict") < 0) return -1;
    if (n < 16) return write_tagged(b, (unsigned char)(0x80 | n), 0, 0);
    if (n < 65536) return write_tagged(b, 0xde, (uint64_t)n, 2);
    return write_tagged(b, 0xdf, (uint64_t)n, 4);
}

/* The header of an extension of `n` payload bytes, as msgpack picks it. */
static Py_ssize_t ext_header(unsigned char *out, int code, Py_ssize_t n) {
    unsigned char fixed = n == 1 ? 0xd4 : n == 2 ? 0xd5 : n == 4 ? 0xd6 : n == 8 ? 0xd7 : n == 16 ? 0xd8 : 0;
    if (fixed) {
        out[0] = fixed;
        out[1] = (unsigned char)code;
        return 2;
    }
    int width = n < 256 ? 1 : n < 65536 ? 2 : 4;
    out[0] = width == 1 ? 0xc7 : width == 2 ? 0xc8 : 0xc9;
    for (int i = 0; i < width; i++) out[1 + i] = (unsigned char)((uint64_t)n >> (8 * (width - 1 - i)));
    out[1 + width] = (unsigned char)code;
    return 2 + width;
}

static int pack_ext_bytes(Buffer *b, int code, const char *payload, Py_ssize_t n) {
    unsigned char header[6];
    if (check_item_limit(n, "EXT data") < 0) return -1;
    Py_ssize_t h = ext_header(header, code, n);
    if (buffer_write(b, header, h) < 0) return -1;
    return buffer_write(b, payload, n);
}

static int pack_object(Buffer *b, PyObject *o, int depth, int may_default);

/* Pack every item of an iterable as a msgpack array of `n` items. */
static int pack_items(Buffer *b, PyObject *items, Py_ssize_t n, int depth) {
    if (pack_array_header(b, n) < 0) return -1;
    if (PyList_Check(items)) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i >= PyList_GET_SIZE(items)) break; /* the list shrank under a Python default */
            PyObject *item = PyList_GET_ITEM(items, i);
            Py_INCREF(item);
            int r = pack_object(b, item, depth, 1);
            Py_DECREF(item);
            if (r < 0) return -1;
        }
        if (PyList_GET_SIZE(items) == n) return 0;
        PyErr_SetString(PyExc_RuntimeError, "list changed size during encoding");
        return -1;
    }
    if (PyTuple_Check(items)) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (pack_object(b, PyTuple_GET_ITEM(items, i), depth, 1) < 0) return -1;
        return 0;
    }
    PyObject *iterator = PyObject_GetIter(items), *item;
    if (iterator == NULL) return -1;
    Py_ssize_t packed = 0;
    while ((item = PyIter_Next(iterator)) != NULL) {
        int r = pack_object(b, item, depth, 1);
        Py_DECREF(item);
        if (r < 0) break;
        packed++;
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) return -1;
    if (packed != n) {
        PyErr_SetString(PyExc_RuntimeError, "set changed size during encoding");
        return -1;
    }
    return 0;
}

/* An extension whose payload is the msgpack array of `items` (a tuple or a set).
 * The payload is packed in place after the largest header, then moved down
 * if its real header is shorter: one pass, no second buffer. */
static int pack_ext_array(Buffer *b, int code, PyObject *items, int depth) {
    Py_ssize_t n = PyObject_Length(items);
    if (n < 0) return -1;
    const Py_ssize_t room = 6;
    if (buffer_reserve(b, room) < 0) return -1;
    Py_ssize_t start = b->length;
    b->length += room;
    if (pack_items(b, items, n, depth) < 0) return -1;
    Py_ssize_t size = b->length - start - room;
    if (check_item_limit(size, "EXT data") < 0) return -1;
    unsigned char header[6];
    Py_ssize_t h = ext_header(header, code, size);
    memmove(b->data + start + h, b->data + start + room, (size_t)size);
    memcpy(b->data + start, header, (size_t)h);
    b->length = start + h + size;
    return 0;
}

/* 1: packed; 0: its fields are not those of a valid Ref (the Python default decides). */
static int pack_ref(Buffer *b, RefObject *ref) {
    unsigned long long p = PyLong_Check(ref->ptr) ? PyLong_AsUnsignedLongLong(ref->ptr) : (unsigned long long)-1;
    unsigned long long k = PyLong_Check(ref->kind) ? PyLong_AsUnsignedLongLong(ref->kind) : (unsigned long long)-1;
    if (PyErr_Occurred()) PyErr_Clear();
    if (k >= 16 || p == (unsigned long long)-1) return 0;
    uint64_t word = ((uint64_t)k << REF_KIND_SHIFT) | (uint64_t)p;
    unsigned char payload[8];
    for (int i = 0; i < 8; i++) payload[i] = (unsigned char)(word >> (8 * i)); /* little-endian */
    return pack_ext_bytes(b, EXT_REF, (const char *)payload, 8) < 0 ? -1 : 1;
}

static int pack_dict(Buffer *b, PyObject *o, int depth) {
    if (pack_map_header(b, PyDict_GET_SIZE(o)) < 0) return -1;
    Py_ssize_t position = 0;
    PyObject *key, *value;
    while (PyDict_Next(o, &position, &key, &value)) {
        Py_INCREF(key);
        Py_INCREF(value);
        int r = pack_object(b, key, depth, 1) < 0 || pack_object(b, value, depth, 1) < 0 ? -1 : 0;
        Py_DECREF(key);
        Py_DECREF(value);
        if (r < 0) return -1;
    }
    return 0;
}

static int pack_memoryview(Buffer *b, PyObject *o) {
    Py_buffer view;
    if (PyObject_GetBuffer(o, &view, PyBUF_SIMPLE) < 0) return -1;
    int r = pack_bin(b, view.buf, view.len);
    PyBuffer_Release(&view);
    return r;
}

/* Hand a type this module does not encode to codec's Python default, then pack what it returns. */
static int pack_by_default(Buffer *b, PyObject *o, int depth, int may_default) {
    if (!may_default || default_hook == NULL) {
        PyErr_Format(PyExc_TypeError, "can not serialize '%.200s' object", Py_TYPE(o)->tp_name);
        return -1;
    }
    PyObject *replacement = PyObject_CallOneArg(default_hook, o);
    if (replacement == NULL) return -1;
    int r = pack_object(b, replacement, depth, 0);
    Py_DECREF(replacement);
    return r;
}

static int pack_object(Buffer *b, PyObject *o, int depth, int may_default) {
    if (++depth > PACK_NEST_LIMIT) {
        PyErr_SetString(PyExc_ValueError, "recursion limit exceeded.");
        return -1;
    }
    PyTypeObject *type = Py_TYPE(o);
    int r;
    if (o == Py_None) return write_tagged(b, 0xc0, 0, 0);
    if (o == Py_True) return write_tagged(b, 0xc3, 0, 0);
    if (o == Py_False) return write_tagged(b, 0xc2, 0, 0);
    if (type == &PyLong_Type) {
        if ((r = pack_int(b, o)) != 0) return r < 0 ? -1 : 0;
        return pack_by_default(b, o, depth, may_default);
    }
    if (type == &PyUnicode_Type) return pack_str(b, o);
    if (type == &PyFloat_Type) return pack_double(b, PyFloat_AS_DOUBLE(o));
    if (type == &PyBytes_Type) return pack_bin(b, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o));
    if (type == &PyByteArray_Type) return pack_bin(b, PyByteArray_AS_STRING(o), PyByteArray_GET_SIZE(o));
    if (type == &PyDict_Type || (PyObject *)type == frozen_dict) return pack_dict(b, o, depth);
    if (type == &PyList_Type || (PyObject *)type == frozen_list) return pack_items(b, o, PyList_GET_SIZE(o), depth);
    if (type == &PyTuple_Type) return pack_ext_array(b, EXT_TUPLE, o, depth);
    if (type == &RefType) {
        if ((r = pack_ref(b, (RefObject *)o)) != 0) return r < 0 ? -1 : 0;
        return pack_by_default(b, o, depth, may_default);
    }
    if (type == &PySet_Type || (PyObject *)type == frozen_set) return pack_ext_array(b, EXT_SET, o, depth);
    if (type == &PyFrozenSet_Type) return pack_ext_array(b, EXT_FROZENSET, o, depth);
    if ((PyObject *)type == ext_type) {
        PyObject *code = PyTuple_GET_ITEM(o, 0), *data = PyTuple_GET_ITEM(o, 1);
        long c = PyLong_AsLong(code);
        if (c == -1 && PyErr_Occurred()) return -1;
        if (!PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "ExtType data must be bytes");
            return -1;
        }
        return pack_ext_bytes(b, (int)c, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
    }
    if (PyMemoryView_Check(o)) return pack_memoryview(b, o);
    return pack_by_default(b, o, depth, may_default);
}

static PyObject *pack(PyObject *module, PyObject *value) {
    Buffer b;
    buffer_init(&b);
    PyObject *result = NULL;
    if (pack_object(&b, value, 0, 1) == 0) result = PyBytes_FromStringAndSize(b.data, b.length);
    buffer_free(&b);
    return result;
}

/* ---- unpacking -------------------------------------------------------------------------- */

typedef struct {
    const unsigned char *at;
    const unsigned char *end;
    int frozen;
    PyObject *ref;      /* ref(ptr, kind) builds what a Ref decodes to; None: a codec.Ref */
    PyObject *frozen_arg, *opaque; /* unpack's arguments, handed back to rare_hook with the rare extensions */
    int records;                   /* keep plain records as Packed (codec.PlainRecords): then the limits */
    Py_ssize_t record_entries, record_text, record_size;
} Reader;

static int truncated(void) {
    PyErr_SetString(PyExc_ValueError, "encoded value is truncated");
    return -1;
}

static int take(Reader *r, Py_ssize_t n, const unsigned char **out) {
    if (r->end - r->at < n) return truncated();
    *out = r->at;
    r->at += n;
    return 0;
}

static int take_number(Reader *r, int n, uint64_t *out) {
    const unsigned char *p;
    if (take(r, n, &p) < 0) return -1;
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    *out = v;
    return 0;
}

/* A count of items that each take at least `unit` bytes must fit in what remains. */
static int check_count(Reader *r, uint64_t count, int unit) {
    if (count > (uint64_t)(r->end - r->at) / (uint64_t)unit) return truncated();
    return 0;
}

static PyObject *read_object(Reader *r, int depth);

/* `n` items into a new list, or a new tuple (a tuple extension's payload, built in place). */
static PyObject *read_items(Reader *r, uint64_t n, int depth, int as_tuple) {
    if (check_count(r, n, 1) < 0) return NULL;
    PyObject *items = as_tuple ? PyTuple_New((Py_ssize_t)n) : PyList_New((Py_ssize_t)n);
    if (items == NULL) return NULL;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *item = read_object(r, depth);
        if (item == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        if (as_tuple)
            PyTuple_SET_ITEM(items, (Py_ssize_t)i, item);
        else
            PyList_SET_ITEM(items, (Py_ssize_t)i, item);
    }
    return items;
}

static PyObject *read_list(Reader *r, uint64_t n, int depth) { return read_items(r, n, depth, 0); }

/* An empty instance of a frozen container type (a subclass of dict or list, no __init__ of its own),
 * filled afterwards through the C API, which its refusing Python methods do not guard. */
static PyObject *new_empty(PyObject *type) {
    PyObject *none = PyTuple_New(0);
    if (none == NULL) return NULL;
    PyObject *instance = ((PyTypeObject *)type)->tp_new((PyTypeObject *)type, none, NULL);
    Py_DECREF(none);
    return instance;
}

/* A frozen container whose keys and items are all untracked (scalars, strings, Packed
 * records, containers already untracked) can be part of no reference cycle, so the cyclic
 * collector need not walk it: CPython untracks such exact dicts and tuples itself, but only
 * when a collection finds them, and never a subclass. Untracking the records a client
 * caches keeps its full collections short. A dict that is later given a tracked value is
 * tracked again by CPython; a frozen list refuses every write. */
static int holds_only_untracked(PyObject *const *items, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyObject_GC_IsTracked(items[i])) return 0;
    return 1;
}

static PyObject *untracked_if_atomic(PyObject *container) {
    if (container == NULL || !PyObject_GC_IsTracked(container)) return container;
    if (PyTuple_Check(container) || PyList_Check(container)) {
        PyObject *const *items = PyTuple_Check(container) ? ((PyTupleObject *)container)->ob_item
                                                          : ((PyListObject *)container)->ob_item;
        if (holds_only_untracked(items, Py_SIZE(container))) PyObject_GC_UnTrack(container);
        return container;
    }
    PyObject *key, *value;
    Py_ssize_t position = 0;
    while (PyDict_Next(container, &position, &key, &value))
        if (PyObject_GC_IsTracked(key) || PyObject_GC_IsTracked(value)) return container;
    PyObject_GC_UnTrack(container);
    return container;
}

static PyObject *frozen_list_of(Reader *r, PyObject *plain) {
    if (!r->frozen || plain == NULL) return plain;
    PyObject *frozen = new_empty(frozen_list);
    if (frozen != NULL && PyList_SetSlice(frozen, 0, 0, plain) < 0) Py_CLEAR(frozen);
    Py_DECREF(plain);
    return untracked_if_atomic(frozen);
}

/* Short ASCII map keys seen lately (record field names, mostly), so decoding a thousand
 * records makes their field names once, not a thousand times: a direct-mapped table, each
 * slot holding one str (strings are immutable, so sharing one is invisible). */
#define KEY_SLOTS 1024
#define KEY_MAX_LENGTH 24
static PyObject *recent_keys[KEY_SLOTS];

/* A map key; text keys interned, as msgpack does: a lookup by a literal then matches by identity. */
static PyObject *read_interned(Reader *r, int depth) {
    PyObject *key = read_object(r, depth);
    if (key != NULL && PyUnicode_CheckExact(key)) PyUnicode_InternInPlace(&key);
    return key;
}

static PyObject *read_key(Reader *r, int depth) {
    unsigned char tag = r->at < r->end ? *r->at : 0;
    Py_ssize_t n = tag & 0x1f;
    if ((tag & 0xe0) != 0xa0 || n > KEY_MAX_LENGTH || r->end - r->at < 1 + n) return read_interned(r, depth);
    const unsigned char *text = r->at + 1;
    uint32_t hash = 2166136261u; /* FNV-1a */
    for (Py_ssize_t i = 0; i < n; i++) hash = (hash ^ text[i]) * 16777619u;
    PyObject **slot = &recent_keys[(hash ^ (uint32_t)n) % KEY_SLOTS];
    PyObject *cached = *slot;
    if (cached != NULL && PyUnicode_GET_LENGTH(cached) == n && memcmp(PyUnicode_DATA(cached), text, (size_t)n) == 0) {
        r->at += 1 + n;
        Py_INCREF(cached);
        return cached;
    }
    PyObject *key = read_interned(r, depth);
    if (key != NULL && PyUnicode_CheckExact(key) && PyUnicode_IS_ASCII(key)) {
        Py_INCREF(key);
        Py_XSETREF(*slot, key);
    }
    return key;
}

/* A map with more entries than this holds data keys (a bulk load's million record keys), not
 * field names: its keys are neither interned nor kept in recent_keys. Interning them cost more
 * than decoding the records they name (1.03 against 0.30 us an entry for 300,000), and each one
 * evicted the field names from recent_keys. No stored map is this large: a dict of more than
 * flat_dict_entries (64 by default) is a tree. */
#define DATA_KEYS_ABOVE 256

/* codec.RECORDS_FROM_DEPTH and MAX_RECORD_ENTRIES. */
#define RECORDS_FROM_DEPTH 3
#define MAX_RECORD_ENTRIES 64

/* The length of the canonical header (what pack writes) of a str, bin or map of n items. */
static Py_ssize_t str_header(uint64_t n) { return n < 32 ? 1 : n < 256 ? 2 : n < 65536 ? 3 : 5; }
static Py_ssize_t bin_header(uint64_t n) { return n < 256 ? 2 : n < 65536 ? 3 : 5; }
static Py_ssize_t map_header(uint64_t n) { return n < 16 ? 1 : n < 65536 ? 3 : 5; }

/* The length of a str or bin at `at` if it is canonical, ASCII (a str), of at most `limit` bytes,
 * and whole before `end`; -1 otherwise. */
static Py_ssize_t plain_text(const unsigned char *at, const unsigned char *end, Py_ssize_t limit,
                             Py_ssize_t *header) {
    unsigned char tag = *at;
    uint64_t n;
    int is_str = 1;
    if ((tag & 0xe0) == 0xa0) {
        n = tag & 0x1f;
        *header = 1;
    } else {
        int width = tag == 0xd9 || tag == 0xc4 ? 1 : tag == 0xda || tag == 0xc5 ? 2 : tag == 0xdb || tag == 0xc6 ? 4 : 0;
        if (width == 0 || end - at < 1 + width) return -1;
        is_str = tag >= 0xd9;
        n = 0;
        for (int i = 1; i <= width; i++) n = (n << 8) | at[i];
        *header = 1 + width;
    }
    if (n > (uint64_t)limit || *header != (is_str ? str_header(n) : bin_header(n)) ||
        (uint64_t)(end - at - *header) < n)
        return -1;
    if (is_str)
        for (uint64_t i = 0; i < n; i++)
            if (at[*header + i] >= 0x80) return -1;
    return (Py_ssize_t)n;
}

/* The length of a canonical plain scalar at `at` (nil, bool, int, float 64, short text), or -1. */
static Py_ssize_t plain_scalar(const unsigned char *at, const unsigned char *end, Py_ssize_t text_limit) {
    unsigned char tag = *at;
    if (tag < 0x80 || tag >= 0xe0 || tag == 0xc0 || tag == 0xc2 || tag == 0xc3) return 1;
    if (tag == 0xcb) return end - at >= 9 ? 9 : -1;
    if (tag >= 0xcc && tag <= 0xd3) { /* the smallest width that holds the number, as pack chooses */
        int width = 1 << ((tag - 0xcc) & 3);
        if (end - at < 1 + width) return -1;
        uint64_t v = 0;
        for (int i = 1; i <= width; i++) v = (v << 8) | at[i];
        if (tag <= 0xcf) { /* unsigned: above what the next smaller width holds */
            static const uint64_t above[] = {0x7f, 0xff, 0xffff, 0xffffffffu};
            return v > above[tag - 0xcc] ? 1 + width : -1;
        }
        if (width < 8 && (v >> (8 * width - 1)) & 1) v |= ~UINT64_C(0) << (8 * width);
        static const int64_t below[] = {-32, -128, -32768, -2147483648LL};
        return (int64_t)v < below[tag - 0xd0] ? 1 + width : -1;
    }
    Py_ssize_t header, n = plain_text(at, end, text_limit, &header);
    return n < 0 ? -1 : header + n;
}

/* Where the map of `n` entries whose header starts at `start` ends, if it is a plain record as
 * codec.PlainRecords describes; NULL if it is not (or is malformed: read_map then says how). */
static const unsigned char *plain_record_end(Reader *r, const unsigned char *start, uint64_t n) {
    if (n > (uint64_t)r->record_entries || r->at - start != map_header(n)) return NULL;
    const unsigned char *at = r->at, *end = r->end;
    const unsigned char *keys[MAX_RECORD_ENTRIES];
    Py_ssize_t key_lengths[MAX_RECORD_ENTRIES];
    for (uint64_t i = 0; i < n; i++) {
        int is_text = at < end && ((*at & 0xe0) == 0xa0 || (*at >= 0xd9 && *at <= 0xdb));
        Py_ssize_t header, length = is_text ? plain_text(at, end, r->record_size, &header) : -1;
        if (length < 0) return NULL;
        keys[i] = at + header;
        key_lengths[i] = length;
        for (uint64_t j = 0; j < i; j++) /* a duplicate key: pack of the dict would drop one */
            if (key_lengths[j] == length && memcmp(keys[j], keys[i], (size_t)length) == 0) return NULL;
        at += header + length;
        Py_ssize_t value = at < end ? plain_scalar(at, end, r->record_text) : -1;
        if (value < 0) return NULL;
        at += value;
    }
    return at - start <= r->record_size ? at : NULL;
}

/* `dict` as a SortedEntries if it has more than DATA_KEYS_ABOVE entries, all of them text keys in
 * increasing order (codec._in_text_order); else `dict` itself. Steals the reference to `dict`. */
static PyObject *sorted_entries_or_dict(PyObject *dict) {
    Py_ssize_t n = PyDict_GET_SIZE(dict), position = 0, i = 0;
    PyObject *key, *value, *previous = NULL;
    if (n <= DATA_KEYS_ABOVE) return dict;
    while (PyDict_Next(dict, &position, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || (previous != NULL && PyUnicode_Compare(previous, key) >= 0)) return dict;
        previous = key;
    }
    PyObject *keys = PyList_New(n), *values = PyList_New(n), *entries = NULL;
    if (keys != NULL && values != NULL) {
        for (position = 0; PyDict_Next(dict, &position, &key, &value); i++) {
            Py_INCREF(key);
            Py_INCREF(value);
            PyList_SET_ITEM(keys, i, key);
            PyList_SET_ITEM(values, i, value);
        }
        entries = sorted_entries_from(keys, values);
    }
    Py_XDECREF(keys);
    Py_XDECREF(values);
    Py_DECREF(dict);
    return entries;
}

/* The map an op takes as its argument (depth RECORDS_FROM_DEPTH) when it has more than
 * DATA_KEYS_ABOVE entries: a bulk load's records. While its keys come as text in increasing order
 * (what a client sends for a dict built in key order) they go into two lists, a SortedEntries, and
 * no dict is built: inserting a million keys into one was 45% of decoding a bulk load (perf),
 * each insert a cache miss. From the first key out of order on it is a dict, which
 * sorted_entries_or_dict then looks at as a whole, as codec._packed_records does. */
static PyObject *read_data_map(Reader *r, uint64_t n, int depth) {
    PyObject *keys = PyList_New((Py_ssize_t)n), *values = PyList_New((Py_ssize_t)n), *dict = NULL;
    Py_ssize_t count = 0; /* entries in keys and values */
    if (keys == NULL || values == NULL) goto fail;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *key = read_object(r, depth);
        PyObject *value = key == NULL ? NULL : read_object(r, depth);
        if (value == NULL) {
            Py_XDECREF(key);
            goto fail;
        }
        if (dict == NULL && PyUnicode_CheckExact(key) &&
            (count == 0 || PyUnicode_Compare(PyList_GET_ITEM(keys, count - 1), key) < 0)) {
            PyList_SET_ITEM(keys, count, key);
            PyList_SET_ITEM(values, count, value);
            count++;
            continue;
        }
        if (dict == NULL) { /* out of order: what came so far goes into a dict */
            dict = PyDict_New();
            for (Py_ssize_t j = 0; dict != NULL && j < count; j++) {
                if (PyDict_SetItem(dict, PyList_GET_ITEM(keys, j), PyList_GET_ITEM(values, j)) < 0) Py_CLEAR(dict);
            }
        }
        int failed = dict == NULL || PyDict_SetItem(dict, key, value) < 0;
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed) goto fail;
    }
    PyObject *made = dict != NULL ? sorted_entries_or_dict(dict) : sorted_entries_from(keys, values);
    Py_DECREF(keys);
    Py_DECREF(values);
    return made;
fail:
    Py_XDECREF(keys);
    Py_XDECREF(values);
    Py_XDECREF(dict);
    return NULL;
}

static PyObject *read_map(Reader *r, uint64_t n, int depth, const unsigned char *start) {
    if (r->records && depth >= RECORDS_FROM_DEPTH) {
        const unsigned char *end = plain_record_end(r, start, n);
        if (end != NULL) {
            r->at = end;
            return packed_new_from(start, end - start);
        }
    }
    if (check_count(r, n, 2) < 0) return NULL;
    if (r->records && depth == RECORDS_FROM_DEPTH && n > DATA_KEYS_ABOVE) return read_data_map(r, n, depth);
    PyObject *dict = r->frozen ? new_empty(frozen_dict) : PyDict_New();
    if (dict == NULL) return NULL;
    int data_keys = n > DATA_KEYS_ABOVE;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *key = data_keys ? read_object(r, depth) : read_key(r, depth);
        if (key == NULL) goto fail;
        PyObject *value = read_object(r, depth);
        if (value == NULL) {
            Py_DECREF(key);
            goto fail;
        }
        int failed = PyDict_SetItem(dict, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed) goto fail;
    }
    return r->frozen ? untracked_if_atomic(dict) : dict;
fail:
    Py_DECREF(dict);
    return NULL;
}

static PyObject *read_ref(const unsigned char *payload, Py_ssize_t n, Reader *r) {
    if (n != 8) {
        PyErr_SetString(PyExc_ValueError, "a Ref extension holds 8 bytes");
        return NULL;
    }
    uint64_t word = 0;
    for (int i = 7; i >= 0; i--) word = (word << 8) | payload[i];
    PyObject *args[2];
    args[0] = PyLong_FromUnsignedLongLong(word & REF_POINTER_MASK);
    args[1] = PyLong_FromUnsignedLongLong(word >> REF_KIND_SHIFT);
    PyObject *result = NULL;
    if (args[0] != NULL && args[1] != NULL) {
        if (r->ref != Py_None)
            result = PyObject_Vectorcall(r->ref, args, 2, NULL);
        else
            result = ref_new_from(args[0], args[1]);
    }
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    return result;
}

/* The items (a list, or a tuple) of an extension whose payload is one msgpack array and nothing more. */
static PyObject *read_payload_items(const unsigned char *payload, Py_ssize_t n, Reader *outer, int depth,
                                    int as_tuple) {
    Reader r = *outer;
    r.records = 0; /* inside a tuple or a set, maps stay maps, as in codec._packed_records */
    r.at = payload;
    r.end = payload + n;
    const unsigned char *tag;
    if (take(&r, 1, &tag) < 0) return NULL;
    uint64_t count;
    if ((*tag & 0xf0) == 0x90) {
        count = *tag & 0x0f;
    } else if (*tag == 0xdc || *tag == 0xdd) {
        if (take_number(&r, *tag == 0xdc ? 2 : 4, &count) < 0) return NULL;
    } else {
        PyErr_SetString(PyExc_ValueError, "a tuple or set extension does not hold an array");
        return NULL;
    }
    PyObject *items = read_items(&r, count, depth, as_tuple);
    if (items != NULL && r.at != r.end) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_ValueError, "extra data after an extension's array");
        return NULL;
    }
    return as_tuple ? untracked_if_atomic(items) : items;
}

static PyObject *read_ext(Reader *r, int code, Py_ssize_t n, int depth) {
    const unsigned char *payload;
    if (take(r, n, &payload) < 0) return NULL;
    if (code == EXT_REF) return read_ref(payload, n, r);
    if (code == EXT_TUPLE || code == EXT_SET || code == EXT_FROZENSET) {
        PyObject *items = read_payload_items(payload, n, r, depth, code == EXT_TUPLE), *result;
        if (items == NULL || code == EXT_TUPLE) return items;
        if (r->frozen)
            result = PyObject_CallOneArg(frozen_set, items);
        else
            result = code == EXT_SET ? PySet_New(items) : PyFrozenSet_New(items);
        Py_DECREF(items);
        return result;
    }
    /* rare_hook(code, payload, frozen, ref, opaque_dataclasses) */
    return PyObject_CallFunction(rare_hook, "iy#OOO", code, (const char *)payload, n, r->frozen_arg, r->ref,
                                 r->opaque);
}

static PyObject *read_sized(Reader *r, unsigned char tag, int depth) {
    uint64_t n;
    static const int widths[] = {1, 2, 4};
    const unsigned char *p = NULL;
    if (tag >= 0xc4 && tag <= 0xc6) { /* bin 8/16/32 */
        if (take_number(r, widths[tag - 0xc4], &n) < 0 || take(r, (Py_ssize_t)n, &p) < 0) return NULL;
        return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
    }
    if (tag >= 0xd9 && tag <= 0xdb) { /* str 8/16/32 */
        if (take_number(r, widths[tag - 0xd9], &n) < 0 || take(r, (Py_ssize_t)n, &p) < 0) return NULL;
        return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, NULL);
    }
    if (tag >= 0xc7 && tag <= 0xc9) { /* ext 8/16/32 */
        if (take_number(r, widths[tag - 0xc7], &n) < 0 || take(r, 1, &p) < 0) return NULL;
        return read_ext(r, (int)(signed char)p[0], (Py_ssize_t)n, depth);
    }
    if (tag >= 0xd4 && tag <= 0xd8) { /* fixext 1/2/4/8/16 */
        if (take(r, 1, &p) < 0) return NULL;
        return read_ext(r, (int)(signed char)p[0], (Py_ssize_t)1 << (tag - 0xd4), depth);
    }
    if (tag == 0xdc || tag == 0xdd) {
        if (take_number(r, tag == 0xdc ? 2 : 4, &n) < 0) return NULL;
        return frozen_list_of(r, read_list(r, n, depth));
    }
    if (tag == 0xde || tag == 0xdf) {
        if (take_number(r, tag == 0xde ? 2 : 4, &n) < 0) return NULL;
        return read_map(r, n, depth, r->at - (tag == 0xde ? 3 : 5));
    }
    PyErr_Format(PyExc_ValueError, "byte 0x%02x does not start a msgpack value", tag);
    return NULL;
}

static PyObject *read_number(Reader *r, unsigned char tag) {
    uint64_t v;
    if (tag >= 0xcc && tag <= 0xcf) { /* uint 8/16/32/64 */
        if (take_number(r, 1 << (tag - 0xcc), &v) < 0) return NULL;
        return PyLong_FromUnsignedLongLong(v);
    }
    if (tag >= 0xd0 && tag <= 0xd3) { /* int 8/16/32/64 */
        int n = 1 << (tag - 0xd0);
        if (take_number(r, n, &v) < 0) return NULL;
        if (n < 8 && (v >> (8 * n - 1)) & 1) v |= ~UINT64_C(0) << (8 * n); /* sign-extend */
        return PyLong_FromLongLong((long long)(int64_t)v);
    }
    if (tag == 0xca) {
        if (take_number(r, 4, &v) < 0) return NULL;
        uint32_t bits = (uint32_t)v;
        float f;
        memcpy(&f, &bits, sizeof f);
        return PyFloat_FromDouble((double)f);
    }
    if (take_number(r, 8, &v) < 0) return NULL; /* 0xcb float 64 */
    double d;
    memcpy(&d, &v, sizeof d);
    return PyFloat_FromDouble(d);
}

static PyObject *read_object(Reader *r, int depth) {
    if (++depth > UNPACK_NEST_LIMIT) {
        PyErr_SetString(PyExc_ValueError, "encoded value nests too deeply");
        return NULL;
    }
    const unsigned char *p;
    if (take(r, 1, &p) < 0) return NULL;
    unsigned char tag = *p;
    if (tag < 0x80) return PyLong_FromLong(tag);
    if (tag >= 0xe0) return PyLong_FromLong((long)(signed char)tag);
    if (tag < 0x90) return read_map(r, tag & 0x0f, depth, p);
    if (tag < 0xa0) return frozen_list_of(r, read_list(r, tag & 0x0f, depth));
    if (tag < 0xc0) {
        Py_ssize_t n = tag & 0x1f;
        if (take(r, n, &p) < 0) return NULL;
        return PyUnicode_DecodeUTF8((const char *)p, n, NULL);
    }
    if (tag == 0xc0) Py_RETURN_NONE;
    if (tag == 0xc2) Py_RETURN_FALSE;
    if (tag == 0xc3) Py_RETURN_TRUE;
    if ((tag >= 0xca && tag <= 0xd3)) return read_number(r, tag);
    return read_sized(r, tag, depth);
}

static PyObject *unpack(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "unpack(data, frozen, ref, opaque_dataclasses[, records]) takes 4 or 5 arguments");
        return NULL;
    }
    Py_ssize_t limits[3] = {0, 0, 0};
    int records = nargs == 5 && args[4] != Py_None;
    if (records && !PyArg_ParseTuple(args[4], "nnn:records", &limits[0], &limits[1], &limits[2])) return NULL;
    if (limits[0] < 0 || limits[1] < 0 || limits[2] < 0) {
        PyErr_SetString(PyExc_ValueError, "unpack: the limits of records are counts of entries and bytes, >= 0");
        return NULL;
    }
    if (limits[0] > MAX_RECORD_ENTRIES) limits[0] = MAX_RECORD_ENTRIES; /* plain_record_end's key table */
    if (rare_hook == NULL || frozen_dict == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ccodec.configure() was not called");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    int frozen = PyObject_IsTrue(args[1]);
    Reader r = {view.buf, (const unsigned char *)view.buf + view.len, frozen, args[2], args[1], args[3],
                records && !frozen, limits[0], limits[1], limits[2]};
    PyObject *result = frozen < 0 ? NULL : read_object(&r, 0);
    if (result != NULL && r.at != r.end) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "extra data after the encoded value");
    }
    PyBuffer_Release(&view);
    return result;
}

/* ---- packed_get: one field of a Packed record, nothing else decoded --------------------- */

static PyObject *packed_get(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "packed_get(payload, key, default, unknown) takes bytes and a str");
        return NULL;
    }
    const unsigned char *at = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const unsigned char *end = at + PyBytes_GET_SIZE(args[0]);
    Py_ssize_t key_length;
    const char *key = PyUnicode_IS_ASCII(args[1]) ? PyUnicode_AsUTF8AndSize(args[1], &key_length) : NULL;
    uint64_t count;
    if (key == NULL || at == end) goto unknown; /* a key no plain record holds, or no map: ask Python */
    if ((*at & 0xf0) == 0x80) {
        count = *at++ & 0x0f;
    } else if (*at == 0xde && end - at >= 3) {
        count = (uint64_t)at[1] << 8 | at[2];
        at += 3;
    } else {
        goto unknown;
    }
    for (uint64_t i = 0; i < count; i++) {
        int is_text = at < end && ((*at & 0xe0) == 0xa0 || (*at >= 0xd9 && *at <= 0xdb));
        Py_ssize_t header, length = is_text ? plain_text(at, end, PY_SSIZE_T_MAX, &header) : -1;
        if (length < 0) goto unknown;
        const unsigned char *text = at + header;
        at = text + length;
        if (at >= end) goto unknown;
        if (length == key_length && memcmp(text, key, (size_t)length) == 0) {
            Reader r = {at, end, 0, Py_None, Py_False, Py_False, 0, 0, 0, 0};
            PyObject *value = read_object(&r, 0);
            if (value == NULL) PyErr_Clear();
            return value != NULL ? value : Py_NewRef(args[3]);
        }
        Py_ssize_t skip = plain_scalar(at, end, PY_SSIZE_T_MAX);
        if (skip < 0) goto unknown;
        at += skip;
    }
    return Py_NewRef(args[2]);
unknown:
    return Py_NewRef(args[3]);
}

/* ---- storable: the fast path of codec.validate and the client's key checks ---------------- */

/* codec.MAX_DEPTH, less a margin: a container this deep is left to the Python checks. */
#define STORABLE_DEPTH 95

static int text_ok(PyObject *text) {
    if (PyUnicode_IS_ASCII(text)) return 1;
    if (PyUnicode_AsUTF8AndSize(text, NULL) != NULL) return 1;
    PyErr_Clear(); /* a lone surrogate: codec.validate names it */
    return 0;
}

/* 1 if keyorder.check_key accepts `key`; 0 if it might not (Decimal keys: a NaN is refused). */
static int key_ok(PyObject *key, int depth) {
    PyTypeObject *type = Py_TYPE(key);
    if (key == Py_None || key == Py_True || key == Py_False || type == &PyLong_Type || type == &PyBytes_Type)
        return 1;
    if (type == &PyFloat_Type) return !isnan(PyFloat_AS_DOUBLE(key));
    if (type == &PyUnicode_Type) return text_ok(key);
    PyObject *t = (PyObject *)type;
    if (t == datetime_type || t == date_type || t == uuid_type) return 1;
    if (type == &PyTuple_Type && depth < STORABLE_DEPTH) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(key); i++)
            if (!key_ok(PyTuple_GET_ITEM(key, i), depth + 1)) return 0;
        return 1;
    }
    return 0;
}

/* 1 if codec.validate and the client's key checks accept `value` at `depth` keys below the root;
 * 0 if they might not (or if it is not plain data: dataclasses, wrappers), for Python to decide. */
static int value_ok(PyObject *value, int depth) {
    PyTypeObject *type = Py_TYPE(value);
    PyObject *t = (PyObject *)type;
    if (value == Py_None || value == Py_True || value == Py_False || type == &PyLong_Type ||
        type == &PyFloat_Type || type == &PyBytes_Type || type == &PyByteArray_Type || t == decimal_type ||
        t == uuid_type || t == datetime_type || t == date_type)
        return 1;
    if (type == &PyUnicode_Type) return text_ok(value);
    if (depth >= STORABLE_DEPTH) return 0; /* too deep, or a value that holds itself */
    if (type == &PyDict_Type || t == frozen_dict) {
        Py_ssize_t position = 0;
        PyObject *k, *v;
        while (PyDict_Next(value, &position, &k, &v))
            if (!key_ok(k, depth + 1) || !value_ok(v, depth + 1)) return 0;
        return 1;
    }
    if (type == &PyList_Type || t == frozen_list) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++)
            if (!value_ok(PyList_GET_ITEM(value, i), depth + 1)) return 0;
        return 1;
    }
    if (type == &PyTuple_Type) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(value); i++)
            if (!value_ok(PyTuple_GET_ITEM(value, i), depth + 1)) return 0;
        return 1;
    }
    if (type == &PySet_Type || type == &PyFrozenSet_Type || t == frozen_set) {
        PyObject *iterator = PyObject_GetIter(value), *item;
        int ok = iterator != NULL;
        while (ok && (item = PyIter_Next(iterator)) != NULL) {
            ok = key_ok(item, depth + 1);
            Py_DECREF(item);
        }
        Py_XDECREF(iterator);
        if (PyErr_Occurred()) PyErr_Clear();
        return ok;
    }
    return 0;
}

static PyObject *storable(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "storable(value, depth) takes a value and an int");
        return NULL;
    }
    if (decimal_type == NULL) Py_RETURN_FALSE; /* not configured: let Python decide */
    long depth = PyLong_AsLong(args[1]);
    if (depth == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(depth >= 0 && depth < STORABLE_DEPTH && value_ok(args[0], (int)depth));
}

/* ---- freeze: frozen.freeze_python, compiled ---------------------------------------------- */

static PyObject *new_empty(PyObject *type);

static PyObject *freeze_object(PyObject *value, int depth) {
    PyTypeObject *type = Py_TYPE(value);
    PyObject *t = (PyObject *)type;
    if (value == Py_None || value == Py_True || value == Py_False || type == &PyLong_Type ||
        type == &PyFloat_Type || type == &PyUnicode_Type || type == &PyBytes_Type || t == decimal_type ||
        t == uuid_type || t == datetime_type || t == date_type) {
        Py_INCREF(value);
        return value;
    }
    if (++depth > UNPACK_NEST_LIMIT) {
        PyErr_SetString(PyExc_RecursionError, "maximum recursion depth exceeded while freezing a value");
        return NULL;
    }
    if (type == &PyDict_Type || t == frozen_dict) {
        PyObject *copy = new_empty(frozen_dict), *k, *v;
        Py_ssize_t position = 0;
        while (copy != NULL && PyDict_Next(value, &position, &k, &v)) {
            PyObject *frozen = freeze_object(v, depth);
            if (frozen == NULL || PyDict_SetItem(copy, k, frozen) < 0) Py_CLEAR(copy);
            Py_XDECREF(frozen);
        }
        return untracked_if_atomic(copy);
    }
    if (type == &PyList_Type || t == frozen_list || type == &PyTuple_Type) {
        int is_tuple = type == &PyTuple_Type;
        Py_ssize_t n = Py_SIZE(value);
        PyObject *items = is_tuple ? PyTuple_New(n) : PyList_New(n);
        for (Py_ssize_t i = 0; items != NULL && i < n; i++) {
            PyObject *frozen = freeze_object(is_tuple ? PyTuple_GET_ITEM(value, i) : PyList_GET_ITEM(value, i), depth);
            if (frozen == NULL) {
                Py_CLEAR(items);
            } else if (is_tuple) {
                PyTuple_SET_ITEM(items, i, frozen);
            } else {
                PyList_SET_ITEM(items, i, frozen);
            }
        }
        if (is_tuple || items == NULL) return untracked_if_atomic(items);
        PyObject *copy = new_empty(frozen_list);
        if (copy != NULL && PyList_SetSlice(copy, 0, 0, items) < 0) Py_CLEAR(copy);
        Py_DECREF(items);
        return untracked_if_atomic(copy);
    }
    if (type == &PySet_Type || type == &PyFrozenSet_Type || t == frozen_set) return PyObject_CallOneArg(frozen_set, value);
    return PyObject_CallOneArg(freeze_hook, value); /* dataclasses, wrappers, other scalars: Python's rules */
}

static PyObject *freeze(PyObject *module, PyObject *value) {
    if (freeze_hook == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ccodec.configure_frozen() was not called");
        return NULL;
    }
    return freeze_object(value, 0);
}

/* ---- the module ------------------------------------------------------------------------- */

/* Keep strong references to the objects passed, in the static slots given. */
static PyObject *keep(PyObject *args, const char *format, PyObject **slots[], int n) {
    PyObject *values[8];
    if (!PyArg_ParseTuple(args, format, &values[0], &values[1], &values[2], &values[3], &values[4], &values[5],
                          &values[6], &values[7]))
        return NULL;
    for (int i = 0; i < n; i++) {
        Py_INCREF(values[i]);
        Py_XSETREF(*slots[i], values[i]);
    }
    Py_RETURN_NONE;
}

static PyObject *configure_frozen(PyObject *module, PyObject *args) {
    PyObject **slots[] = {&frozen_dict, &frozen_list, &frozen_set, &freeze_hook};
    return keep(args, "OOOO|OOOO:configure_frozen", slots, 4);
}

static PyObject *configure(PyObject *module, PyObject *args) {
    PyObject **slots[] = {&ext_type, &default_hook, &rare_hook, &decimal_type, &uuid_type, &datetime_type, &date_type};
    return keep(args, "OOOOOOO|O:configure", slots, 7);
}

/* ---- collect_simple_entries: an index build's entries, the common records read here -------- */

/* The str or int `field` of a plain dict or a Packed record (a new reference), or NULL without an
 * exception when the record is another kind, lacks the field or holds something else there. */
static PyObject *simple_field(PyObject *module, PyObject *record, PyObject *field) {
    PyObject *value = NULL;
    if (Py_TYPE(record) == &PackedType) {
        PyObject *call[4] = {((PackedObject *)record)->payload, field, Py_None, Py_None};
        value = packed_get(module, call, 4);
    } else if (PyDict_CheckExact(record)) {
        value = PyDict_GetItemWithError(record, field);
        Py_XINCREF(value);
    }
    if (value != NULL && !PyUnicode_CheckExact(value) && !PyLong_CheckExact(value)) Py_CLEAR(value);
    return value;
}

/* collect_simple_entries(pairs, field, value_entry, general) -> list: index.collect_simple_entries_python */
static PyObject *collect_simple_entries(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyUnicode_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "collect_simple_entries(pairs, field, value_entry, general) takes a str field");
        return NULL;
    }
    PyObject *iterator = PyObject_GetIter(args[0]), *found = iterator == NULL ? NULL : PyList_New(0), *pair;
    if (found == NULL) goto fail;
    while ((pair = PyIter_Next(iterator)) != NULL) {
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            Py_DECREF(pair);
            PyErr_SetString(PyExc_TypeError, "collect_simple_entries: pairs are (key, record) tuples");
            goto fail;
        }
        PyObject *key = PyTuple_GET_ITEM(pair, 0), *record = PyTuple_GET_ITEM(pair, 1);
        PyObject *value = simple_field(module, record, args[1]);
        int failed;
        if (value != NULL) {
            PyObject *entry = PyTuple_Pack(3, args[2], value, key);
            failed = entry == NULL || PyList_Append(found, entry) < 0;
            Py_XDECREF(entry);
            Py_DECREF(value);
        } else if (PyErr_Occurred()) {
            failed = 1;
        } else { /* the general path names this record's entries */
            PyObject *more = PyObject_CallFunctionObjArgs(args[3], key, record, NULL);
            failed = more == NULL || PyList_SetSlice(found, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, more) < 0;
            Py_XDECREF(more);
        }
        Py_DECREF(pair);
        if (failed) goto fail;
    }
    if (PyErr_Occurred()) goto fail;
    Py_DECREF(iterator);
    return found;
fail:
    Py_XDECREF(iterator);
    Py_XDECREF(found);
    return NULL;
}

/* ---- a leaf of Packed records, written as atoms: their payloads, then Refs to them --------- */

/* packed_payloads(values) -> [payload, ...] or None: codec.packed_payloads_python */
static PyObject *packed_payloads(PyObject *module, PyObject *values) {
    if (!PyList_CheckExact(values)) {
        PyErr_Format(PyExc_TypeError, "packed_payloads() takes a list, not %.100s", Py_TYPE(values)->tp_name);
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(values);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (Py_TYPE(PyList_GET_ITEM(values, i)) != &PackedType) Py_RETURN_NONE;
    }
    PyObject *payloads = PyList_New(n);
    if (payloads == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *payload = ((PackedObject *)PyList_GET_ITEM(values, i))->payload;
        Py_INCREF(payload);
        PyList_SET_ITEM(payloads, i, payload);
    }
    return payloads;
}

/* refs(pointers, kind) -> [Ref(ptr, kind), ...]: codec.refs_python */
static PyObject *refs(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "refs(pointers, kind) takes a list of pointers and a kind");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    PyObject *made = PyList_New(n);
    if (made == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ref = ref_new_from(PyList_GET_ITEM(args[0], i), args[1]);
        if (ref == NULL) {
            Py_DECREF(made);
            return NULL;
        }
        PyList_SET_ITEM(made, i, ref);
    }
    return made;
}

static PyMethodDef methods[] = {
    {"configure_frozen", configure_frozen, METH_VARARGS,
     "configure_frozen(FrozenDict, FrozenList, FrozenSet, freeze_python): the types frozen.py defines"},
    {"storable", (PyCFunction)(void (*)(void))storable, METH_FASTCALL,
     "storable(value, depth) -> bool: True only if codec.validate and the key checks accept value"},
    {"freeze", freeze, METH_O, "freeze(value): frozen.freeze_python, compiled"},
    {"configure", configure, METH_VARARGS,
     "configure(ExtType, default, rare_hook, Decimal, UUID, datetime, date): what codec.py defines and uses"},
    {"pack", pack, METH_O, "pack(value) -> bytes: codec.pack_python, compiled"},
    {"packed_get", (PyCFunction)(void (*)(void))packed_get, METH_FASTCALL,
     "packed_get(payload, key, default, unknown): codec.packed_get_python, compiled"},
    {"collect_simple_entries", (PyCFunction)(void (*)(void))collect_simple_entries, METH_FASTCALL,
     "collect_simple_entries(pairs, field, value_entry, general) -> list: index.collect_simple_entries_python"},
    {"packed_payloads", packed_payloads, METH_O,
     "packed_payloads(values) -> list or None: codec.packed_payloads_python, compiled"},
    {"refs", (PyCFunction)(void (*)(void))refs, METH_FASTCALL, "refs(pointers, kind) -> list: codec.refs_python, compiled"},
    {"unpack", (PyCFunction)(void (*)(void))unpack, METH_FASTCALL,
     "unpack(data, frozen, ref, opaque_dataclasses[, records]): codec.unpack_python, compiled"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "protobase.core.ccodec", "The compiled twin of codec.py's packing.", -1, methods,
};

PyMODINIT_FUNC PyInit_ccodec(void) {
    if (PyType_Ready(&RefType) < 0 || PyType_Ready(&PackedType) < 0 || PyType_Ready(&SortedEntriesType) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "Ref", (PyObject *)&RefType) < 0 ||
        PyModule_AddObjectRef(module, "Packed", (PyObject *)&PackedType) < 0 ||
        PyModule_AddObjectRef(module, "SortedEntries", (PyObject *)&SortedEntriesType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
