/* The compiled twin of arena.py's `write_atoms`: atoms framed straight into a segment.
 *
 * Runs in the coordinator, the only process that appends atoms. It writes
 * the same bytes as the pure-Python function (tests/test_arena.py compares
 * them): for each payload a little-endian u32 header (kind << 28 | length),
 * the payload, and zeros up to the next multiple of 4. Nothing is written
 * unless every atom fits and none is too large, so a refusal leaves the
 * segment as it was and the caller falls back to one `append` per atom.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

static PyMethodDef methods[] = {
    {"write_atoms", (PyCFunction)(void (*)(void))write_atoms, METH_FASTCALL,
     "write_atoms(buf, offset, kind, payloads, base) -> (pointers, end) or None: arena.write_atoms, compiled"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "protobase.core.carena", "The compiled twin of arena.write_atoms.", -1, methods,
};

PyMODINIT_FUNC PyInit_carena(void) { return PyModule_Create(&module_definition); }
