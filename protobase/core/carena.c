/* The compiled twins of arena.py's `write_atoms` and `Tail`: atoms framed straight into a segment.
 *
 * Runs in the coordinator, the only process that appends atoms. Both write
 * the same bytes as the pure-Python ones (tests/test_arena.py compares
 * them): for each payload a little-endian u32 header (kind << 28 | length),
 * the payload, and zeros up to the next multiple of 4. Nothing is written
 * unless every atom fits and none is too large, so a refusal leaves the
 * segment as it was: `write_atoms` returns None (the caller appends one by
 * one) and `Tail.append` hands the atom to its `overflow` (a new segment).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

#define LENGTH_BITS 28
#define MAX_PAYLOAD ((1u << LENGTH_BITS) - 1)
#define HEADER_SIZE 4
#define ALIGN 4

static Py_ssize_t padded(Py_ssize_t length) { return (HEADER_SIZE + length + ALIGN - 1) & ~(Py_ssize_t)(ALIGN - 1); }

/* The offset after the atoms of `payloads` written from `offset`, or -1 when one is too large
 * (-2 with an exception set when an item is not bytes). */
static Py_ssize_t end_of(PyObject *payloads, Py_ssize_t offset) {
    Py_ssize_t count = PyList_GET_SIZE(payloads);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_Check(payload)) {
            PyErr_Format(PyExc_TypeError, "an atom's payload must be bytes, not %.100s", Py_TYPE(payload)->tp_name);
            return -2;
        }
        Py_ssize_t length = PyBytes_GET_SIZE(payload);
        if ((size_t)length > MAX_PAYLOAD) return -1;
        offset += padded(length);
    }
    return offset;
}

static void frame(char *into, PyObject *payloads, unsigned long kind) {
    Py_ssize_t count = PyList_GET_SIZE(payloads);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        Py_ssize_t length = PyBytes_GET_SIZE(payload);
        uint32_t word = (uint32_t)(kind << LENGTH_BITS | (unsigned long)length);
        unsigned char header[HEADER_SIZE] = {word & 0xff, (word >> 8) & 0xff, (word >> 16) & 0xff, word >> 24};
        memcpy(into, header, HEADER_SIZE);
        memcpy(into + HEADER_SIZE, PyBytes_AS_STRING(payload), length);
        Py_ssize_t size = padded(length);
        memset(into + HEADER_SIZE + length, 0, size - HEADER_SIZE - length);
        into += size;
    }
}

/* write_atoms(buf, offset, kind, payloads, base) -> (pointers, end) or None: arena.write_atoms */
static PyObject *write_atoms(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "write_atoms(buf, offset, kind, payloads, base) takes 5 arguments");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    unsigned long kind = PyLong_AsUnsignedLong(args[2]);
    unsigned long long base = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (kind >= 16 || offset < 0) {
        PyErr_SetString(PyExc_ValueError, "write_atoms: the kind must fit in 4 bits and the offset be >= 0");
        return NULL;
    }
    PyObject *payloads = args[3];
    if (!PyList_Check(payloads)) {
        PyErr_SetString(PyExc_TypeError, "write_atoms: the payloads must be a list of bytes");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0) return NULL;
    PyObject *result = NULL;
    Py_ssize_t end = end_of(payloads, offset);
    if (end == -2) goto done;
    if (end < 0 || end > view.len) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t count = PyList_GET_SIZE(payloads);
    PyObject *pointers = PyList_New(count);
    if (pointers == NULL) goto done;
    Py_ssize_t at = offset;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pointer = PyLong_FromUnsignedLongLong(base + (unsigned long long)at);
        if (pointer == NULL) {
            Py_DECREF(pointers);
            goto done;
        }
        PyList_SET_ITEM(pointers, i, pointer);
        at += padded(PyBytes_GET_SIZE(PyList_GET_ITEM(payloads, i)));
    }
    frame((char *)view.buf + offset, payloads, kind);  // after every allocation: a failure wrote nothing
    result = Py_BuildValue("(Nn)", pointers, end);
done:
    PyBuffer_Release(&view);
    return result;
}

/* ---- Tail: where the next atom goes, appended without a Python frame -------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer view;      /* the segment being appended to, while attached (view.obj != NULL) */
    Py_ssize_t used;      /* bytes of it written */
    unsigned long long base; /* the pointer of its offset 0 */
    Py_ssize_t allocated; /* bytes appended through this tail, headers and padding included */
    PyObject *overflow;   /* overflow(kind, payload) -> pointer: an atom that does not fit here */
} TailObject;

static int tail_init(TailObject *self, PyObject *args, PyObject *kwargs) {
    PyObject *overflow;
    if (!PyArg_ParseTuple(args, "O:Tail", &overflow)) return -1;
    if (!PyCallable_Check(overflow)) {
        PyErr_SetString(PyExc_TypeError, "Tail(overflow): overflow must be callable");
        return -1;
    }
    Py_XSETREF(self->overflow, Py_NewRef(overflow));
    return 0;
}

static void detach_view(TailObject *self) {
    if (self->view.obj != NULL) PyBuffer_Release(&self->view);
}

/* attach(buf, base, used): append into `buf` from offset `used`, its pointers `base + offset` */
static PyObject *tail_attach(TailObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "attach(buf, base, used) takes 3 arguments");
    unsigned long long base = PyLong_AsUnsignedLongLong(args[1]);
    Py_ssize_t used = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0) return NULL;
    if (used < 0 || used > view.len) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "attach: %zd bytes used of a %zd-byte segment", used, view.len);
    }
    detach_view(self);
    self->view = view;
    self->base = base;
    self->used = used;
    Py_RETURN_NONE;
}

/* detach(): append nowhere (every atom overflows) and let the segment go */
static PyObject *tail_detach(TailObject *self, PyObject *unused) {
    detach_view(self);
    Py_RETURN_NONE;
}

/* append(kind, payload) -> pointer: arena.Tail.append */
static PyObject *tail_append(TailObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "append(kind, payload) takes 2 arguments");
    unsigned long kind = PyLong_AsUnsignedLong(args[0]);
    if (kind == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (kind >= 16) return PyErr_Format(PyExc_ValueError, "append: the kind must fit in 4 bits, not %lu", kind);
    PyObject *payload = args[1];
    if (!PyBytes_Check(payload))
        return PyErr_Format(PyExc_TypeError, "an atom's payload must be bytes, not %.100s", Py_TYPE(payload)->tp_name);
    Py_ssize_t length = PyBytes_GET_SIZE(payload), size = padded(length);
    if (self->view.obj == NULL || (size_t)length > MAX_PAYLOAD || self->view.len - self->used < size)
        return PyObject_Vectorcall(self->overflow, args, 2, NULL);
    unsigned long long pointer = self->base + (unsigned long long)self->used;
    PyObject *result = PyLong_FromUnsignedLongLong(pointer);
    if (result == NULL) return NULL;
    char *into = (char *)self->view.buf + self->used;
    uint32_t word = (uint32_t)(kind << LENGTH_BITS | (unsigned long)length);
    unsigned char header[HEADER_SIZE] = {word & 0xff, (word >> 8) & 0xff, (word >> 16) & 0xff, word >> 24};
    memcpy(into, header, HEADER_SIZE);
    memcpy(into + HEADER_SIZE, PyBytes_AS_STRING(payload), length);
    self->used += size;
    self->allocated += size;
    return result;
}

static PyObject *get_size(TailObject *self, void *offset) { return PyLong_FromSsize_t(*(Py_ssize_t *)((char *)self + (Py_ssize_t)offset)); }

static int set_size(TailObject *self, PyObject *value, void *offset) {
    Py_ssize_t size = value != NULL ? PyLong_AsSsize_t(value) : -1;
    if (size == -1 && (value == NULL || PyErr_Occurred())) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a byte count cannot be deleted");
        return -1;
    }
    if (size < 0) return PyErr_SetString(PyExc_ValueError, "a byte count is >= 0"), -1;
    *(Py_ssize_t *)((char *)self + (Py_ssize_t)offset) = size;
    return 0;
}

static PyGetSetDef tail_getset[] = {
    {"used", (getter)get_size, (setter)set_size, "bytes of the attached segment written",
     (void *)offsetof(TailObject, used)},
    {"allocated", (getter)get_size, (setter)set_size, "bytes appended, headers and padding included",
     (void *)offsetof(TailObject, allocated)},
    {NULL},
};

static int tail_traverse(TailObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->overflow);
    return 0;
}

static int tail_clear(TailObject *self) {
    Py_CLEAR(self->overflow);
    return 0;
}

static void tail_dealloc(TailObject *self) {
    PyObject_GC_UnTrack(self);
    detach_view(self);
    tail_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef tail_methods[] = {
    {"attach", (PyCFunction)(void (*)(void))tail_attach, METH_FASTCALL,
     "attach(buf, base, used): append into buf from offset used, its pointers base + offset"},
    {"detach", (PyCFunction)tail_detach, METH_NOARGS, "detach(): append nowhere, releasing the segment"},
    {"append", (PyCFunction)(void (*)(void))tail_append, METH_FASTCALL,
     "append(kind, payload) -> pointer: the atom written here, or by overflow(kind, payload) if it does not fit"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TailType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "protobase.core.carena.Tail",
    .tp_basicsize = sizeof(TailObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Tail(overflow): where the next atom goes in the segment being appended to (arena.Tail, compiled)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tail_init,
    .tp_dealloc = (destructor)tail_dealloc,
    .tp_traverse = (traverseproc)tail_traverse,
    .tp_clear = (inquiry)tail_clear,
    .tp_methods = tail_methods,
    .tp_getset = tail_getset,
};

static PyMethodDef methods[] = {
    {"write_atoms", (PyCFunction)(void (*)(void))write_atoms, METH_FASTCALL,
     "write_atoms(buf, offset, kind, payloads, base) -> (pointers, end) or None: arena.write_atoms, compiled"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "protobase.core.carena", "The compiled twins of arena.write_atoms and arena.Tail.", -1,
    methods,
};

PyMODINIT_FUNC PyInit_carena(void) {
    if (PyType_Ready(&TailType) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "Tail", (PyObject *)&TailType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
