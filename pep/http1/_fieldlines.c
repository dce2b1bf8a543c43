/* A message head's bounds and its field lines, for pep/http1/head.py, written in C because the profile asked for
 * it (pep/http1/fields.py says what it cost before and what the pure-Python twins are).
 *
 * bounds(buf, max_head, max_line) -> (end, lf) or None (limits of 0 or more, as pep/http1/limits.py has them)
 *   end: where the first CR LF CR LF starts, if it ends within the first `max_head` bytes (None if not);
 *   lf: where the first LF is, if it is within the first `max_line + 2` bytes, else -1.
 *   The same as `buf.find(b"\r\n\r\n", 0, max_head)` and `buf.find(b"\n", 0, max_line + 2)`.
 *
 * split(buf, start, stop) -> [(name, value), ...]
 *   The field lines in buf[start:stop] (CR LF between them), each split at its first colon, the value without
 *   the spaces and tabs around it. Only for a block llhttp has accepted: every line is then a token, a colon and
 *   a value without CR, LF or other controls. A line without a colon (never in such a block) raises ValueError.
 *
 * Only reads `buf`, through its buffer, bounded by its length at every step.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static Py_ssize_t
clamp(Py_ssize_t i, Py_ssize_t n)
{
    return i < 0 ? 0 : (i > n ? n : i);
}

static PyObject *
bounds(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t max_head, max_line, limit, at, end = -1, lf = -1;
    const char *p, *hit, *nl;
    PyObject *found;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "bounds(buf, max_head, max_line)");
        return NULL;
    }
    max_head = PyLong_AsSsize_t(args[1]);
    if (max_head == -1 && PyErr_Occurred())
        return NULL;
    max_line = PyLong_AsSsize_t(args[2]);
    if (max_line == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    p = view.buf;
    limit = clamp(max_head, view.len);
    /* From LF to LF (a head has one per line): glibc's memmem costs twice as much on a short head. */
    for (at = 1; at + 2 < limit; at = hit - p + 1) {
        hit = memchr(p + at, '\n', (size_t)(limit - 2 - at));
        if (hit == NULL)
            break;
        if (hit[-1] == '\r' && hit[1] == '\r' && hit[2] == '\n') {
            end = hit - p - 1;
            break;
        }
    }
    if (end >= 0) {
        limit = max_line > PY_SSIZE_T_MAX - 2 ? view.len : clamp(max_line + 2, view.len);
        nl = memchr(p, '\n', (size_t)limit);
        if (nl != NULL)
            lf = nl - p;
    }
    PyBuffer_Release(&view);
    if (end < 0)
        Py_RETURN_NONE;
    found = PyTuple_New(2);
    if (found == NULL)
        return NULL;
    PyTuple_SET_ITEM(found, 0, PyLong_FromSsize_t(end));
    PyTuple_SET_ITEM(found, 1, PyLong_FromSsize_t(lf));
    if (PyTuple_GET_ITEM(found, 0) == NULL || PyTuple_GET_ITEM(found, 1) == NULL) {
        Py_DECREF(found);
        return NULL;
    }
    return found;
}

static int
is_ows(char c)
{
    return c == ' ' || c == '\t';
}

/* One field line, p[0:n], appended to `fields` as (name, value). */
static int
add_line(PyObject *fields, const char *p, Py_ssize_t n)
{
    const char *colon = memchr(p, ':', (size_t)n);
    Py_ssize_t from, to;
    PyObject *name, *value, *pair;
    int failed;

    if (colon == NULL) {
        PyErr_SetString(PyExc_ValueError, "a field line without a colon");
        return -1;
    }
    from = colon - p + 1;
    to = n;
    while (from < to && is_ows(p[from]))
        from++;
    while (to > from && is_ows(p[to - 1]))
        to--;
    name = PyBytes_FromStringAndSize(p, colon - p);
    if (name == NULL)
        return -1;
    value = PyBytes_FromStringAndSize(p + from, to - from);
    if (value == NULL) {
        Py_DECREF(name);
        return -1;
    }
    pair = PyTuple_Pack(2, name, value);
    Py_DECREF(name);
    Py_DECREF(value);
    if (pair == NULL)
        return -1;
    failed = PyList_Append(fields, pair);
    Py_DECREF(pair);
    return failed;
}

static PyObject *
split(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start, stop, at;
    const char *p, *cr;
    PyObject *fields;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "split(buf, start, stop)");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    stop = PyLong_AsSsize_t(args[2]);
    if (stop == -1 && PyErr_Occurred())
        return NULL;
    fields = PyList_New(0);
    if (fields == NULL)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(fields);
        return NULL;
    }
    p = view.buf;
    start = clamp(start, view.len);
    stop = clamp(stop, view.len);
    at = start;
    while (at < stop) {
        cr = memchr(p + at, '\r', (size_t)(stop - at));
        /* The last line runs to `stop`; any other ends at its CR (the LF after it is skipped). */
        Py_ssize_t line_end = cr == NULL ? stop : cr - p;
        if (add_line(fields, p + at, line_end - at) < 0) {
            PyBuffer_Release(&view);
            Py_DECREF(fields);
            return NULL;
        }
        at = line_end + 2;
    }
    PyBuffer_Release(&view);
    return fields;
}

static PyMethodDef methods[] = {
    {"bounds", (PyCFunction)(void (*)(void))bounds, METH_FASTCALL,
     "bounds(buf, max_head, max_line) -> (end, lf) or None: see pep/http1/_fieldlines.c."},
    {"split", (PyCFunction)(void (*)(void))split, METH_FASTCALL,
     "split(buf, start, stop) -> [(name, value), ...]: see pep/http1/_fieldlines.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pep.http1._fieldlines", "A message head's bounds and field lines (pep/http1/head.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fieldlines(void)
{
    return PyModule_Create(&module);
}
