/* The hot loop of reading a zip's central directory (APPNOTE.TXT 4.3.12), without the GIL.
 *
 * Why C: a 5 M-member directory walked with numpy costs about 2 us a member, most of it
 * holding the GIL, so the thread that parses the next archive stalls the merge of the
 * previous one. This walk copies each record's 46 fixed bytes, its name and where it
 * starts, and marks the names that need cleaning, in one pass and with the GIL released.
 *
 * It does only the common case. When the records do not chain exactly from offset 0 to
 * the end of the directory, or their number is not the expected one, it returns -1 and
 * zipdir's numpy walk (the reference: same outputs, and it names the fault) takes over.
 * Everything after the walk (ZIP64 extras, offsets, name cleaning) stays in zipdir.py.
 *
 * The directory is untrusted input: every length read from it is bounded by the
 * directory's size before it is used, and every write by its output buffer's size.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define CENTRAL_SIZE 46            /* 4.3.12, fixed part of a central directory header */
#define CENTRAL_SIG 0x02014B50u
#define NAME_LENGTH_AT 28          /* then extra length (30) and comment length (32) */

static uint16_t u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t u32(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8) |
                                               ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24); }

/* A name is plain (needs no cleaning: zipdir._suspect_names says the same in numpy) when
 * it is not empty, at most name_max bytes, printable ASCII without a backslash, does not
 * start with '/' or '.', does not end with '/', and has no '/' followed by '/' or '.'. */
static int needs_cleaning(const uint8_t *name, size_t length, size_t name_max)
{
    if (length == 0 || length > name_max || name[0] == '/' || name[0] == '.' || name[length - 1] == '/')
        return 1;
    for (size_t i = 0; i < length; i++) {
        uint8_t c = name[i];
        if (c < 0x20 || c > 0x7E || c == '\\')
            return 1;
        if (c == '/' && i + 1 < length && (name[i + 1] == '/' || name[i + 1] == '.'))
            return 1;
    }
    return 0;
}

typedef struct {
    const uint8_t *dir; size_t dir_size; size_t count; size_t name_max;
    uint8_t *head; int64_t *starts; uint8_t *names; size_t names_size; uint64_t *ends; uint8_t *suspect;
} scan_job;

/* The walk; returns the name bytes written, or -1 when the directory is not `count`
 * records chained end to end (or the names do not fit the output). */
static Py_ssize_t walk(const scan_job *job)
{
    size_t pos = 0, written = 0;
    for (size_t i = 0; i < job->count; i++) {
        if (job->dir_size - pos < CENTRAL_SIZE)
            return -1;
        const uint8_t *rec = job->dir + pos;
        if (u32(rec) != CENTRAL_SIG)
            return -1;
        size_t name_length = u16(rec + NAME_LENGTH_AT);
        size_t record = CENTRAL_SIZE + name_length + u16(rec + NAME_LENGTH_AT + 2) + u16(rec + NAME_LENGTH_AT + 4);
        if (job->dir_size - pos < record || job->names_size - written < name_length)
            return -1;
        memcpy(job->head + i * CENTRAL_SIZE, rec, CENTRAL_SIZE);
        memcpy(job->names + written, rec + CENTRAL_SIZE, name_length);
        job->suspect[i] = (uint8_t)needs_cleaning(rec + CENTRAL_SIZE, name_length, job->name_max);
        job->starts[i] = (int64_t)pos;
        written += name_length;
        job->ends[i] = written;
        pos += record;
    }
    return pos == job->dir_size ? (Py_ssize_t)written : -1;
}

/* The output buffers must be writable and hold `count` entries (names: any size). */
static int big_enough(const Py_buffer *buf, size_t count, size_t item, const char *what)
{
    if (buf->readonly || (size_t)buf->len / item < count) {
        PyErr_Format(PyExc_ValueError, "scan: %s must be writable and hold %zu entries", what, count);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(scan_doc,
"scan(directory, count, name_max, head, starts, names, ends, suspect) -> int\n\n"
"Walk `count` central directory records of `directory` (bytes-like). Fills head (46 bytes a\n"
"record), starts (int64), names (the names end to end), ends (uint64, where each name ends\n"
"in names) and suspect (one byte a name: 1 when it needs cleaning). Returns the name bytes\n"
"written, or -1 when the records do not chain exactly over the directory.");

static PyObject *scan(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer dir, head, starts, names, ends, suspect;
    Py_ssize_t count, name_max;
    if (!PyArg_ParseTuple(args, "y*nnw*w*w*w*w*", &dir, &count, &name_max, &head, &starts, &names, &ends,
                          &suspect))
        return NULL;
    Py_ssize_t written = -1;
    int ok = count >= 0 && name_max >= 0;
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "scan: count and name_max must not be negative");
    ok = ok && big_enough(&head, (size_t)count, CENTRAL_SIZE, "head") && big_enough(&starts, (size_t)count, 8, "starts")
         && big_enough(&names, 0, 1, "names") && big_enough(&ends, (size_t)count, 8, "ends")
         && big_enough(&suspect, (size_t)count, 1, "suspect");
    if (ok) {
        scan_job job = {dir.buf, (size_t)dir.len, (size_t)count, (size_t)name_max, head.buf, starts.buf,
                        names.buf, (size_t)names.len, ends.buf, suspect.buf};
        Py_BEGIN_ALLOW_THREADS
        written = walk(&job);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&dir); PyBuffer_Release(&head); PyBuffer_Release(&starts);
    PyBuffer_Release(&names); PyBuffer_Release(&ends); PyBuffer_Release(&suspect);
    return ok ? PyLong_FromSsize_t(written) : NULL;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "bioscanfs._cdscan",
    "The central directory walk of zipdir.read_members, in C and without the GIL.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cdscan(void) { return PyModule_Create(&module); }
