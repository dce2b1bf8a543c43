/* The facts pep/strictjson.py needs about a JSON text orjson has accepted, in one pass over its bytes and one
 * over orjson's value, written in C because the profile asked for it (pep/strictjson.py says why and what for).
 *
 * scan(data: bytes, value: dict | list, fold: bool) -> (second: bool, depth: int, values: int, suspects: list)
 *   or None when the text is not as an accepted text is, or nests beyond MAX_LEVELS (neither happens to what
 *   orjson accepted; the caller then decides without this module).
 *
 * - second: the text may hold more than orjson kept, so the careful second pass must decide: its keys written
 *   are more than the pairs of orjson's value (a key repeated, escaped or not), or a number is written with 19
 *   bytes or more (an integer beyond 64 bits, which orjson reads as a rounded float).
 * - depth: how deep its containers nest (a container at the top is depth 1);
 * - values: how many members and elements its containers hold, as written;
 * - suspects (with fold): the objects of the value with two keys or more of which one is not lower-case ASCII,
 *   for the case-folding check (pep/strictjson.py), inner objects first.
 *
 * Only reads: `data` through its buffer, bounded by its length at every step, and the value's exact dicts and
 * lists through borrowed references, calling no Python code (so nothing can change them while they are read).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Deeper than orjson ever nests (1024): beyond it, scan() answers None (the Python walk decides). */
#define MAX_LEVELS 2048
#define LONG_NUMBER 19
#define IN_OBJECT 1
#define IN_ARRAY 2

static int
in_scalar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || c == '-' || c == '+' || c == '.' || c == 'E';
}

/* The text pass. Returns 0, or -1 when the text is not as an accepted text is. */
static int
scan_text(const unsigned char *p, Py_ssize_t n, Py_ssize_t *keys, Py_ssize_t *depth, Py_ssize_t *values,
          int *long_number)
{
    unsigned char kinds[MAX_LEVELS];
    Py_ssize_t level = 0, deepest = 0, written = 0, counted = 0, i = 0;
    int expect_key = 0, longest = 0;

    while (i < n) {
        unsigned char c = p[i];
        int in_array = level > 0 && kinds[level - 1] == IN_ARRAY;
        if (c == '"') {
            /* The closing quote: the next one not escaped (preceded by an even run of backslashes). */
            Py_ssize_t j = i + 1, end;
            for (;;) {
                const unsigned char *q = memchr(p + j, '"', (size_t)(n - j));
                Py_ssize_t run = 0;
                if (q == NULL) {
                    return -1;
                }
                end = q - p;
                while (end - 1 - run > i && p[end - 1 - run] == '\\') {
                    run++;
                }
                if (run % 2 == 0) {
                    break;
                }
                j = end + 1;
            }
            if (expect_key) {
                written++;
                counted++;
                expect_key = 0;
            }
            else if (in_array) {
                counted++;
            }
            i = end + 1;
        }
        else if (c == '{' || c == '[') {
            if (in_array) {
                counted++;
            }
            if (level == MAX_LEVELS) {
                return -1;
            }
            kinds[level++] = c == '{' ? IN_OBJECT : IN_ARRAY;
            if (level > deepest) {
                deepest = level;
            }
            expect_key = c == '{';
            i++;
        }
        else if (c == '}' || c == ']') {
            if (level == 0) {
                return -1;
            }
            level--;
            expect_key = 0;
            i++;
        }
        else if (c == ',') {
            expect_key = level > 0 && kinds[level - 1] == IN_OBJECT;
            i++;
        }
        else if (c == ':' || c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            i++;
        }
        else {
            /* A number or a literal: its first byte and every byte that may continue it. */
            Py_ssize_t start = i;
            if (in_array) {
                counted++;
            }
            i++;
            while (i < n && in_scalar(p[i])) {
                i++;
            }
            if (i - start >= LONG_NUMBER) {
                longest = 1;
            }
        }
    }
    if (level != 0) {
        return -1;
    }
    *keys = written;
    *depth = deepest;
    *values = counted;
    *long_number = longest;
    return 0;
}

/* A key that is its own case folding for certain: ASCII without an upper-case letter. */
static int
lower_ascii(PyObject *key)
{
    const Py_UCS1 *s;
    Py_ssize_t size, k;
    if (!PyUnicode_CheckExact(key) || !PyUnicode_IS_ASCII(key)) {
        return 0;
    }
    s = PyUnicode_1BYTE_DATA(key);
    size = PyUnicode_GET_LENGTH(key);
    for (k = 0; k < size; k++) {
        if (s[k] >= 'A' && s[k] <= 'Z') {
            return 0;
        }
    }
    return 1;
}

/* The value pass: the pairs of its objects, and (with suspects) the objects to check for folded keys. Returns 0,
 * 1 when nested beyond MAX_LEVELS, or -1 with an exception set. */
static int
walk(PyObject *value, int level, Py_ssize_t *pairs, PyObject *suspects)
{
    if (level > MAX_LEVELS) {
        return 1;
    }
    if (PyDict_CheckExact(value)) {
        Py_ssize_t pos = 0, size = PyDict_GET_SIZE(value);
        PyObject *key, *item;
        int suspect = 0;
        *pairs += size;
        while (PyDict_Next(value, &pos, &key, &item)) {
            if (suspects != NULL && size > 1 && !suspect && !lower_ascii(key)) {
                suspect = 1;
            }
            if (PyDict_CheckExact(item) || PyList_CheckExact(item)) {
                int inner = walk(item, level + 1, pairs, suspects);
                if (inner != 0) {
                    return inner;
                }
            }
        }
        if (suspect && PyList_Append(suspects, value) < 0) {
            return -1;
        }
    }
    else if (PyList_CheckExact(value)) {
        Py_ssize_t k;
        for (k = 0; k < PyList_GET_SIZE(value); k++) {
            PyObject *item = PyList_GET_ITEM(value, k);
            if (PyDict_CheckExact(item) || PyList_CheckExact(item)) {
                int inner = walk(item, level + 1, pairs, suspects);
                if (inner != 0) {
                    return inner;
                }
            }
        }
    }
    return 0;
}

static PyObject *
scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t keys = 0, depth = 0, values = 0, pairs = 0;
    int long_number = 0, fold, text, walked;
    PyObject *suspects = NULL, *result;
    (void)module;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scan() takes data, value and fold");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "scan() reads bytes");
        return NULL;
    }
    if (!PyDict_CheckExact(args[1]) && !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "scan() walks a dict or a list");
        return NULL;
    }
    fold = PyObject_IsTrue(args[2]);
    if (fold < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    text = scan_text((const unsigned char *)view.buf, view.len, &keys, &depth, &values, &long_number);
    PyBuffer_Release(&view);
    if (text != 0) {
        Py_RETURN_NONE;
    }
    suspects = PyList_New(0);
    if (suspects == NULL) {
        return NULL;
    }
    walked = walk(args[1], 1, &pairs, fold ? suspects : NULL);
    if (walked != 0) {
        Py_DECREF(suspects);
        if (walked < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    result = Py_BuildValue("(OnnO)", (long_number || keys != pairs) ? Py_True : Py_False, depth, values, suspects);
    Py_DECREF(suspects);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(data, value, fold) -> (second, depth, values, suspects) or None: see pep/_jsonscan.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pep._jsonscan", "Facts about a JSON text orjson accepted (pep/strictjson.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__jsonscan(void)
{
    return PyModule_Create(&module);
}
