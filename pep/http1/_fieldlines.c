/* A message head's bounds and its field lines, read (pep/http1/head.py) and written (pep/http1/writer.py), in C
 * because the profile asked for it (pep/http1/fields.py says what it cost before and what the Python twins are).
 *
 * bounds(buf, max_head, max_line) -> (end, lf) or None (limits of 0 or more, as pep/http1/limits.py has them)
 *   end: where the first CR LF CR LF starts, if it ends within the first `max_head` bytes (None if not);
 *   lf: where the first LF is, if it is within the first `max_line + 2` bytes, else -1.
 *   The same as `buf.find(b"\r\n\r\n", 0, max_head)` and `buf.find(b"\n", 0, max_line + 2)`.
 *
 * split(buf, start, stop, wanted) -> ([(name, value), ...], [(wanted name, value), ...])
 *   The field lines in buf[start:stop] (CR LF between them), each split at its first colon, the value without
 *   the spaces and tabs around it. Only for a block llhttp has accepted: every line is then a token, a colon and
 *   a value without CR, LF or other controls. A line without a colon (never in such a block) raises ValueError.
 *   And the fields whose name is, in ASCII lower case, one of `wanted` (a tuple of lower-case names): that name
 *   from `wanted`, and the value. A reader acts on a few fields of each head; it finds them without a pass of
 *   its own.
 *
 * keep(fields, drop) -> (kept, connection) or None
 *   The fields whose name, in ASCII lower case, is not in the frozenset `drop` (in order, the same pairs), and
 *   the values of the Connection fields. None when `fields` is anything but a list of pairs of bytes, or `drop`
 *   not a frozenset: pep/headers.py then takes its own path.
 *
 * join(fields) -> bytes or None
 *   The field lines of a head to be written: `name: value` and CR LF for each (name, value) pair of bytes, when
 *   every name is a token and every value holds field-value bytes, spaces and tabs only (RFC 9110 5.5, 5.6.2).
 *   None when any is not, or the list holds anything but such pairs: pep/http1/writer.py then takes its own
 *   path, which says what is wrong (or writes what its caller vouched for).
 *
 * Only reads `buf`, through its buffer, bounded by its length at every step, and `fields`, an exact list of exact
 * tuples of exact bytes, through borrowed references, calling no Python code while it reads them.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static Py_ssize_t
clamp(Py_ssize_t i, Py_ssize_t n)
{
    return i < 0 ? 0 : (i > n ? n : i);
}

/* args[1] and args[2] as sizes (0 or -1 with an exception set). */
static int
two_sizes(PyObject *const *args, Py_ssize_t *first, Py_ssize_t *second)
{
    *first = PyLong_AsSsize_t(args[1]);
    if (*first == -1 && PyErr_Occurred())
        return -1;
    *second = PyLong_AsSsize_t(args[2]);
    return *second == -1 && PyErr_Occurred() ? -1 : 0;
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
    if (two_sizes(args, &max_head, &max_line) < 0 || PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
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

static char
ascii_lower(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c + ('a' - 'A')) : c;
}

/* Whether p[0:n] in ASCII lower case is `w` (w[0:n]). */
static int
lower_equals(const char *p, const char *w, Py_ssize_t n)
{
    Py_ssize_t j;

    for (j = 0; j < n && ascii_lower(p[j]) == w[j]; j++)
        ;
    return j == n;
}

/* The name in `wanted` (lower case) that p[0:n] is in ASCII lower case, or NULL (borrowed). */
static PyObject *
wanted_name(PyObject *wanted, const char *p, Py_ssize_t n)
{
    Py_ssize_t i, count = PyTuple_GET_SIZE(wanted);
    PyObject *name;

    for (i = 0; i < count; i++) {
        name = PyTuple_GET_ITEM(wanted, i);
        if (PyBytes_GET_SIZE(name) == n && lower_equals(p, PyBytes_AS_STRING(name), n))
            return name;
    }
    return NULL;
}

static int
append_pair(PyObject *list, PyObject *first, PyObject *second)
{
    PyObject *pair = PyTuple_New(2);
    int failed;

    if (pair == NULL)
        return -1;
    Py_INCREF(first);
    PyTuple_SET_ITEM(pair, 0, first);
    Py_INCREF(second);
    PyTuple_SET_ITEM(pair, 1, second);
    failed = PyList_Append(list, pair);
    Py_DECREF(pair);
    return failed;
}

/* One field line, p[0:n], appended to `fields` as (name, value), and to `picked` if `wanted` names it. */
static int
add_line(PyObject *fields, PyObject *picked, PyObject *wanted, const char *p, Py_ssize_t n)
{
    const char *colon = memchr(p, ':', (size_t)n);
    Py_ssize_t from, to;
    PyObject *name, *value, *known;
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
    failed = append_pair(fields, name, value);
    if (!failed && (known = wanted_name(wanted, p, colon - p)) != NULL)
        failed = append_pair(picked, known, value);
    Py_DECREF(name);
    Py_DECREF(value);
    return failed;
}

static PyObject *
split(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start, stop, at;
    const char *p, *cr;
    PyObject *fields, *picked, *wanted, *result;
    Py_ssize_t i;

    if (nargs != 4 || !PyTuple_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "split(buf, start, stop, wanted: tuple[bytes, ...])");
        return NULL;
    }
    wanted = args[3];
    for (i = 0; i < PyTuple_GET_SIZE(wanted); i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(wanted, i))) {
            PyErr_SetString(PyExc_TypeError, "split: wanted names are bytes");
            return NULL;
        }
    }
    if (two_sizes(args, &start, &stop) < 0)
        return NULL;
    fields = PyList_New(0);
    picked = PyList_New(0);
    if (fields == NULL || picked == NULL || PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        Py_XDECREF(fields);
        Py_XDECREF(picked);
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
        if (add_line(fields, picked, wanted, p + at, line_end - at) < 0) {
            PyBuffer_Release(&view);
            Py_DECREF(fields);
            Py_DECREF(picked);
            return NULL;
        }
        at = line_end + 2;
    }
    PyBuffer_Release(&view);
    result = PyTuple_Pack(2, fields, picked);
    Py_DECREF(fields);
    Py_DECREF(picked);
    return result;
}

/* A pair (name, value) of exact bytes, or NULL. */
static PyObject *
field_name(PyObject *pair)
{
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 0))
        || !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 1)))
        return NULL;
    return PyTuple_GET_ITEM(pair, 0);
}

/* `name` in ASCII lower case: itself (a new reference) when it has no upper-case letter. */
static PyObject *
lowered(PyObject *name)
{
    Py_ssize_t i, n = PyBytes_GET_SIZE(name);
    const char *p = PyBytes_AS_STRING(name);
    PyObject *low;
    char *out;

    for (i = 0; i < n && !(p[i] >= 'A' && p[i] <= 'Z'); i++)
        ;
    if (i == n) {
        Py_INCREF(name);
        return name;
    }
    low = PyBytes_FromStringAndSize(NULL, n);
    if (low == NULL)
        return NULL;
    out = PyBytes_AS_STRING(low);
    for (i = 0; i < n; i++)
        out[i] = ascii_lower(p[i]);
    return low;
}

static PyObject *
keep(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *fields, *drop, *kept, *connection, *pair, *low, *result;
    Py_ssize_t i;
    int dropped, failed;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "keep(fields, drop)");
        return NULL;
    }
    fields = args[0];
    drop = args[1];
    if (!PyList_CheckExact(fields) || !PyFrozenSet_CheckExact(drop))
        Py_RETURN_NONE;
    kept = PyList_New(0);
    connection = PyList_New(0);
    if (kept == NULL || connection == NULL) {
        Py_XDECREF(kept);
        Py_XDECREF(connection);
        return NULL;
    }
    /* The list's size is read again at each step, and each pair held while it is used: a set lookup could in
     * principle run Python code (never with the names of bytes that pep/headers.py passes). */
    for (i = 0; i < PyList_GET_SIZE(fields); i++) {
        pair = PyList_GET_ITEM(fields, i);
        if (field_name(pair) == NULL) {
            Py_DECREF(kept);
            Py_DECREF(connection);
            Py_RETURN_NONE;
        }
        Py_INCREF(pair);
        low = lowered(PyTuple_GET_ITEM(pair, 0));
        failed = low == NULL;
        if (!failed && PyBytes_GET_SIZE(low) == 10 && lower_equals(PyBytes_AS_STRING(low), "connection", 10))
            failed = PyList_Append(connection, PyTuple_GET_ITEM(pair, 1)) < 0;
        if (!failed) {
            dropped = PySet_Contains(drop, low);
            failed = dropped < 0 || (!dropped && PyList_Append(kept, pair) < 0);
        }
        Py_XDECREF(low);
        Py_DECREF(pair);
        if (failed) {
            Py_DECREF(kept);
            Py_DECREF(connection);
            return NULL;
        }
    }
    result = PyTuple_Pack(2, kept, connection);
    Py_DECREF(kept);
    Py_DECREF(connection);
    return result;
}

/* RFC 9110 5.6.2 tchar, and 5.5 field-vchar with SP and HTAB: 1 for the bytes allowed. */
static unsigned char token_byte[256];
static unsigned char value_byte[256];

static void
fill_tables(void)
{
    const char *tchar = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    int c;

    for (; *tchar; tchar++)
        token_byte[(unsigned char)*tchar] = 1;
    for (c = 0; c < 256; c++)
        value_byte[c] = c == '\t' || (c >= 0x20 && c != 0x7F);
}

static PyObject *
join(PyObject *self, PyObject *fields)
{
    Py_ssize_t count, i, j, size = 0, n;
    PyObject *pair, *name, *value, *block;
    const unsigned char *p;
    char *out;

    if (!PyList_CheckExact(fields))
        Py_RETURN_NONE;
    count = PyList_GET_SIZE(fields);
    for (i = 0; i < count; i++) {
        pair = PyList_GET_ITEM(fields, i);
        name = field_name(pair);
        if (name == NULL)
            Py_RETURN_NONE;
        value = PyTuple_GET_ITEM(pair, 1);
        n = PyBytes_GET_SIZE(name);
        p = (const unsigned char *)PyBytes_AS_STRING(name);
        if (n == 0)
            Py_RETURN_NONE;
        for (j = 0; j < n; j++)
            if (!token_byte[p[j]])
                Py_RETURN_NONE;
        size += n + 4;
        n = PyBytes_GET_SIZE(value);
        p = (const unsigned char *)PyBytes_AS_STRING(value);
        for (j = 0; j < n; j++)
            if (!value_byte[p[j]])
                Py_RETURN_NONE;
        size += n;
    }
    block = PyBytes_FromStringAndSize(NULL, size);
    if (block == NULL)
        return NULL;
    out = PyBytes_AS_STRING(block);
    for (i = 0; i < count; i++) {
        pair = PyList_GET_ITEM(fields, i);
        name = PyTuple_GET_ITEM(pair, 0);
        value = PyTuple_GET_ITEM(pair, 1);
        memcpy(out, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name));
        out += PyBytes_GET_SIZE(name);
        memcpy(out, ": ", 2);
        out += 2;
        memcpy(out, PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value));
        out += PyBytes_GET_SIZE(value);
        memcpy(out, "\r\n", 2);
        out += 2;
    }
    return block;
}

static PyMethodDef methods[] = {
    {"bounds", (PyCFunction)(void (*)(void))bounds, METH_FASTCALL,
     "bounds(buf, max_head, max_line) -> (end, lf) or None: see pep/http1/_fieldlines.c."},
    {"split", (PyCFunction)(void (*)(void))split, METH_FASTCALL,
     "split(buf, start, stop, wanted) -> (fields, picked): see pep/http1/_fieldlines.c."},
    {"keep", (PyCFunction)(void (*)(void))keep, METH_FASTCALL,
     "keep(fields, drop) -> (kept, connection) or None: see pep/http1/_fieldlines.c."},
    {"join", (PyCFunction)join, METH_O, "join(fields) -> bytes or None: see pep/http1/_fieldlines.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pep.http1._fieldlines",
    "A message head's bounds and field lines, read and written (pep/http1/head.py, writer.py).", -1, methods, NULL,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fieldlines(void)
{
    fill_tables();
    return PyModule_Create(&module);
}
