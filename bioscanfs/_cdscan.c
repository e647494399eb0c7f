/* The byte loops of an index build, in C and without the GIL: the walk of a zip's central
 * directory (APPNOTE.TXT 4.3.12), and the gather and comparison of name segments that
 * the merge does for every member (splitting paths at their last '/', grouping the equal
 * directory parts, sorting each folder by name).
 *
 * Why C: a 5 M-member directory walked with numpy costs about 2 us a member, most of it
 * holding the GIL, so the thread that parses the next archive stalls the merge of the
 * previous one. The walk copies each record's 46 fixed bytes, its name and where it
 * starts, and marks the names that need cleaning, in one pass and with the GIL released.
 * Gathering segments with numpy needs an index per byte; here it is one memcpy a segment.
 *
 * It does only the common case. When the records do not chain exactly from offset 0 to
 * the end of the directory, or their number is not the expected one, it returns -1 and
 * zipdir's numpy walk (the reference: same outputs, and it names the fault) takes over.
 * Everything after the walk (ZIP64 extras, offsets, name cleaning) stays in zipdir.py.
 *
 * The directory is untrusted input: every length read from it is bounded by the
 * directory's size before it is used, and every write by its output buffer's size; the
 * merge's arrays are bounded the same way (each row, offset and length against the
 * array it indexes) before a byte is read.
 */
#define _GNU_SOURCE   /* memrchr */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
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

/* Segments (begin, length) of `buf`, int64 each, checked against buf before any is read. */
typedef struct {
    Py_buffer buf, begins, lengths, out;
    size_t n;
} segments;

static void free_segments(segments *s)
{
    PyBuffer_Release(&s->buf); PyBuffer_Release(&s->begins);
    PyBuffer_Release(&s->lengths); PyBuffer_Release(&s->out);
}

/* Parses (buf, begins, lengths, out) and bounds every segment by buf. */
static int get_segments(PyObject *args, segments *s)
{
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &s->buf, &s->begins, &s->lengths, &s->out))
        return 0;
    s->n = (size_t)s->begins.len / 8;
    const int64_t *b = s->begins.buf, *n = s->lengths.buf;
    int ok = s->begins.len % 8 == 0 && s->lengths.len == s->begins.len;
    for (size_t i = 0; ok && i < s->n; i++)
        ok = b[i] >= 0 && n[i] >= 0 && n[i] <= s->buf.len && b[i] <= s->buf.len - n[i];
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "segments: begins and lengths must be int64 pairs inside the buffer");
        free_segments(s);
    }
    return ok;
}

static PyObject *release_segments(segments *s, int ok, const char *message)
{
    free_segments(s);
    if (ok)
        Py_RETURN_NONE;
    PyErr_SetString(PyExc_ValueError, message);
    return NULL;
}

PyDoc_STRVAR(gather_doc,
"gather(buf, begins, lengths, out)\n\n"
"Copy the segments buf[begin:begin+length] (begins, lengths: int64) end to end into out.");

static PyObject *gather(PyObject *self, PyObject *args)
{
    (void)self;
    segments s;
    if (!get_segments(args, &s))
        return NULL;
    const int64_t *b = s.begins.buf, *n = s.lengths.buf;
    size_t total = 0;
    int ok = 1;
    for (size_t i = 0; ok && i < s.n; i++) {
        ok = (size_t)s.out.len - total >= (size_t)n[i];
        total += (size_t)n[i];
    }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        uint8_t *to = s.out.buf;
        for (size_t i = 0; i < s.n; i++) {
            memcpy(to, (const uint8_t *)s.buf.buf + b[i], (size_t)n[i]);
            to += n[i];
        }
        Py_END_ALLOW_THREADS
    }
    return release_segments(&s, ok, "gather: out is smaller than the segments");
}

/* Equal directory parts, grouped through an open-addressing hash table (exact: a hit is
 * compared byte for byte). */
typedef struct {
    uint64_t *hash;
    int64_t *group;     /* -1: empty slot */
    size_t mask;
} dir_table;

static uint64_t hash_bytes(const uint8_t *p, size_t n)
{
    const uint64_t k = 0x9E3779B97F4A7C15u;
    uint64_t h = (uint64_t)n * k, w;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, p + i, 8);
        h = (h ^ w) * k;
        h ^= h >> 29;
    }
    w = 0;
    memcpy(&w, p + i, n - i);
    h = (h ^ w) * k;
    return h ^ (h >> 32);
}

static int table_init(dir_table *t, size_t slots)
{
    t->mask = slots - 1;
    t->hash = malloc(slots * sizeof *t->hash);
    t->group = malloc(slots * sizeof *t->group);
    if (t->group)
        memset(t->group, 0xFF, slots * sizeof *t->group);
    return t->hash && t->group;
}

static void table_free(dir_table *t) { free(t->hash); free(t->group); }

/* Doubles the table; 0 when out of memory (the old one is kept for table_free). */
static int table_grow(dir_table *t)
{
    dir_table bigger;
    if (!table_init(&bigger, 2 * (t->mask + 1))) {
        table_free(&bigger);
        return 0;
    }
    for (size_t i = 0; i <= t->mask; i++) {
        if (t->group[i] < 0)
            continue;
        size_t at = t->hash[i] & bigger.mask;
        while (bigger.group[at] >= 0)
            at = (at + 1) & bigger.mask;
        bigger.hash[at] = t->hash[i];
        bigger.group[at] = t->group[i];
    }
    table_free(t);
    *t = bigger;
    return 1;
}

typedef struct {
    const uint8_t *blob; const int64_t *begins, *ends; size_t n;
    int64_t *base, *group, *first;
} split_job;

/* The group of the directory part blob[begin:end) of row `row`; a new one (first = row)
 * when unseen. -1 when out of memory. */
static int64_t group_of(dir_table *t, const split_job *job, size_t row, int64_t *groups, int64_t begin,
                        int64_t end)
{
    size_t n = (size_t)(end - begin);
    uint64_t h = hash_bytes(job->blob + begin, n);
    size_t at = h & t->mask;
    for (; t->group[at] >= 0; at = (at + 1) & t->mask) {
        int64_t head = job->first[t->group[at]];
        int64_t head_end = job->base[head] > job->begins[head] ? job->base[head] - 1 : job->begins[head];
        if (t->hash[at] == h && (size_t)(head_end - job->begins[head]) == n
                && memcmp(job->blob + job->begins[head], job->blob + begin, n) == 0)
            return t->group[at];
    }
    int64_t g = (*groups)++;
    job->first[g] = (int64_t)row;
    t->hash[at] = h;
    t->group[at] = g;
    if ((size_t)*groups * 2 > t->mask && !table_grow(t))
        return -1;
    return g;
}

/* Returns the number of groups, or -1 when out of memory. */
static Py_ssize_t split(const split_job *job)
{
    dir_table t;
    int64_t groups = 0;
    if (!table_init(&t, 1024)) {
        table_free(&t);
        return -1;
    }
    for (size_t i = 0; i < job->n; i++) {
        int64_t begin = job->begins[i], end = job->ends[i];
        const uint8_t *slash = memrchr(job->blob + begin, '/', (size_t)(end - begin));
        int64_t dir_end = slash ? (int64_t)(slash - job->blob) : begin;
        job->base[i] = slash ? dir_end + 1 : begin;
        job->group[i] = group_of(&t, job, i, &groups, begin, dir_end);
        if (job->group[i] < 0) {
            table_free(&t);
            return -1;
        }
    }
    table_free(&t);
    return (Py_ssize_t)groups;
}

PyDoc_STRVAR(split_dirs_doc,
"split_dirs(blob, begins, ends, base, group, first) -> int\n\n"
"Split each path blob[begin:end] (begins, ends: int64) at its last '/': base[i] is where\n"
"its own name starts (begin when it has no '/'), group[i] numbers its directory part\n"
"(equal parts, equal numbers, from 0 in order of first appearance) and first[g] is the\n"
"first row of group g. Returns the number of groups. base, group, first: int64, n each.");

static PyObject *split_dirs(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer blob, begins, ends, base, group, first;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*", &blob, &begins, &ends, &base, &group, &first))
        return NULL;
    size_t n = (size_t)begins.len / 8;
    const int64_t *b = begins.buf, *e = ends.buf;
    int ok = begins.len % 8 == 0 && ends.len == begins.len && (size_t)base.len / 8 >= n
             && (size_t)group.len / 8 >= n && (size_t)first.len / 8 >= n;
    for (size_t i = 0; ok && i < n; i++)
        ok = b[i] >= 0 && b[i] <= e[i] && e[i] <= blob.len;
    Py_ssize_t groups = -2;
    if (ok) {
        split_job job = {blob.buf, b, e, n, base.buf, group.buf, first.buf};
        Py_BEGIN_ALLOW_THREADS
        groups = split(&job);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&blob); PyBuffer_Release(&begins); PyBuffer_Release(&ends);
    PyBuffer_Release(&base); PyBuffer_Release(&group); PyBuffer_Release(&first);
    if (groups == -1)
        return PyErr_NoMemory();
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "split_dirs: paths must lie inside blob, outputs hold one int64 a path");
        return NULL;
    }
    return PyLong_FromSsize_t(groups);
}

/* Rows ahead of the one in hand whose memory is asked for (__builtin_prefetch). */
#define PREFETCH_AHEAD 16

/* Names to sort: the first 8 bytes as a big-endian key (so most comparisons are one
 * integer compare), and the position in the input (equal names keep their order). */
typedef struct {
    uint64_t key;
    int64_t at;
} sort_item;

typedef struct {
    const uint8_t *blob; const int64_t *begins, *lengths;
} sort_names_job;

/* Names whose keys tie: their bytes, then their lengths, then their input order. */
static int compare_names(const sort_item *x, const sort_item *y, const sort_names_job *job)
{
    int64_t nx = job->lengths[x->at], ny = job->lengths[y->at];
    int order = memcmp(job->blob + job->begins[x->at], job->blob + job->begins[y->at], (size_t)(nx < ny ? nx : ny));
    if (order)
        return order;
    if (nx != ny)
        return nx < ny ? -1 : 1;
    return x->at < y->at ? -1 : x->at > y->at;
}

static int item_less(const sort_item *x, const sort_item *y, const sort_names_job *job)
{
    if (x->key != y->key)
        return x->key < y->key;
    return compare_names(x, y, job) < 0;
}

static void insertion_sort(sort_item *a, size_t n, const sort_names_job *job)
{
    for (size_t i = 1; i < n; i++) {
        sort_item v = a[i];
        size_t j = i;
        for (; j > 0 && item_less(&v, &a[j - 1], job); j--)
            a[j] = a[j - 1];
        a[j] = v;
    }
}

/* A bottom-up merge sort with the key compared inline (qsort's call per comparison cost
 * three times as much); returns where the sorted items are, `a` or `tmp`. */
static sort_item *merge_sort(sort_item *a, sort_item *tmp, size_t n, const sort_names_job *job)
{
    const size_t run = 16;
    for (size_t lo = 0; lo < n; lo += run)
        insertion_sort(a + lo, n - lo < run ? n - lo : run, job);
    sort_item *src = a, *dst = tmp;
    for (size_t width = run; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = n - lo < width ? n : lo + width, hi = n - lo < 2 * width ? n : lo + 2 * width;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                dst[k++] = item_less(&src[j], &src[i], job) ? src[j++] : src[i++];
            while (i < mid)
                dst[k++] = src[i++];
            while (j < hi)
                dst[k++] = src[j++];
        }
        sort_item *swap = src;
        src = dst;
        dst = swap;
    }
    return src;
}

/* 0 when out of memory. */
static int sort_names_run(const sort_names_job *job, size_t n, int64_t *order, uint8_t *same)
{
    sort_item *buffer = malloc((n ? 2 * n : 1) * sizeof *buffer), *items;
    if (!buffer)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n)   /* the names lie all over the blob: overlap the cache misses */
            __builtin_prefetch(job->blob + job->begins[i + PREFETCH_AHEAD]);
        uint8_t word[8] = {0};
        memcpy(word, job->blob + job->begins[i], job->lengths[i] < 8 ? (size_t)job->lengths[i] : 8);
        uint64_t key = 0;
        for (int k = 0; k < 8; k++)
            key = key << 8 | word[k];
        buffer[i] = (sort_item){key, (int64_t)i};
    }
    items = merge_sort(buffer, buffer + n, n, job);
    for (size_t i = 0; i < n; i++) {
        order[i] = items[i].at;
        same[i] = 0;
        if (i > 0) {
            int64_t a = items[i - 1].at, b = items[i].at;
            same[i] = items[i - 1].key == items[i].key && job->lengths[a] == job->lengths[b] &&
                      memcmp(job->blob + job->begins[a], job->blob + job->begins[b], (size_t)job->lengths[a]) == 0;
        }
    }
    free(buffer);
    return 1;
}

/* An integer column of 2, 4 or 8 bytes a value (the merge keeps its arrays narrow). */
typedef struct {
    uint8_t *p;
    size_t n;
    size_t width;
} column;

static int column_of(Py_buffer *buf, Py_ssize_t width, column *c)
{
    c->p = buf->buf;
    c->width = (size_t)width;
    c->n = width > 0 ? (size_t)buf->len / (size_t)width : 0;
    return (width == 2 || width == 4 || width == 8) && buf->len % width == 0;
}

static uint64_t column_get(const column *c, size_t i)
{
    uint16_t v2; uint32_t v4; uint64_t v8;
    switch (c->width) {
    case 2: memcpy(&v2, c->p + 2 * i, 2); return v2;
    case 4: memcpy(&v4, c->p + 4 * i, 4); return v4;
    default: memcpy(&v8, c->p + 8 * i, 8); return v8;
    }
}

static void column_put(column *c, size_t i, uint64_t v)
{
    uint16_t v2 = (uint16_t)v; uint32_t v4 = (uint32_t)v;
    switch (c->width) {
    case 2: memcpy(c->p + 2 * i, &v2, 2); break;
    case 4: memcpy(c->p + 4 * i, &v4, 4); break;
    default: memcpy(c->p + 8 * i, &v, 8); break;
    }
}

typedef struct {
    const uint8_t *blob; size_t blob_size;
    column begins, lengths, order;
    const int64_t *bounds; size_t n_bounds;
    uint8_t *same;
} sort_dirs_job;

/* One folder's rows order[lo:hi] sorted by name; `scratch` holds 4 int64 a row.
 * -2 when a row, a name or the range lies outside its array. */
static int sort_dir(sort_dirs_job *job, size_t lo, size_t hi, int64_t *scratch)
{
    size_t m = hi - lo;
    int64_t *rows = scratch, *begins = scratch + m, *lengths = scratch + 2 * m, *by_name = scratch + 3 * m;
    for (size_t i = 0; i < m; i++) {
        if (i + PREFETCH_AHEAD < m) {   /* the folder's rows lie all over the arrays */
            uint64_t ahead = column_get(&job->order, lo + i + PREFETCH_AHEAD);
            if (ahead < job->begins.n && ahead < job->lengths.n) {
                __builtin_prefetch(job->begins.p + ahead * job->begins.width);
                __builtin_prefetch(job->lengths.p + ahead * job->lengths.width);
            }
        }
        uint64_t row = column_get(&job->order, lo + i);
        if (row >= job->begins.n || row >= job->lengths.n)
            return -2;
        uint64_t begin = column_get(&job->begins, row), length = column_get(&job->lengths, row);
        if (begin > job->blob_size || length > job->blob_size - begin)
            return -2;
        rows[i] = (int64_t)row;
        begins[i] = (int64_t)begin;
        lengths[i] = (int64_t)length;
    }
    sort_names_job names = {job->blob, begins, lengths};
    if (!sort_names_run(&names, m, by_name, job->same + lo))
        return -1;
    for (size_t i = 0; i < m; i++)
        column_put(&job->order, lo + i, (uint64_t)rows[by_name[i]]);
    return 0;
}

/* Folders [first, last): 0, -1 when out of memory, -2 when something lies out of bounds. */
static int sort_dirs_run(sort_dirs_job *job, size_t first, size_t last)
{
    int64_t *scratch = NULL;
    size_t room = 0;
    int status = 0;
    for (size_t d = first; status == 0 && d < last; d++) {
        int64_t lo = job->bounds[d], hi = job->bounds[d + 1];
        if (lo < 0 || hi < lo || (uint64_t)hi > job->order.n) {
            status = -2;
            break;
        }
        size_t m = (size_t)(hi - lo);
        if (m < 2)
            continue;
        if (m > room) {
            free(scratch);
            room = m;
            scratch = malloc(4 * room * sizeof *scratch);
            if (!scratch) {
                status = -1;
                break;
            }
        }
        status = sort_dir(job, (size_t)lo, (size_t)hi, scratch);
    }
    free(scratch);
    return status;
}

PyDoc_STRVAR(sort_dirs_doc,
"sort_dirs(blob, begins, begins_width, lengths, lengths_width, order, order_width, bounds, same, first, last)\n\n"
"For each folder d in [first, last), sort its rows order[bounds[d]:bounds[d + 1]] in place by\n"
"their names blob[begins[row]:begins[row] + lengths[row]] (bytes, then length, equal names in\n"
"the order they come), and set same[i] (one byte a position) to 1 where the name equals the\n"
"one before it in its folder. begins, lengths and order are integer arrays of the given\n"
"widths (2, 4 or 8 bytes); bounds is int64. Every row and name is bounded before use.");

static PyObject *sort_dirs(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer blob, begins, lengths, order, bounds, same;
    Py_ssize_t begins_width, lengths_width, order_width, first, last;
    if (!PyArg_ParseTuple(args, "y*y*ny*nw*ny*w*nn", &blob, &begins, &begins_width, &lengths, &lengths_width,
                          &order, &order_width, &bounds, &same, &first, &last))
        return NULL;
    sort_dirs_job job = {blob.buf, (size_t)blob.len, {0}, {0}, {0}, bounds.buf, (size_t)bounds.len / 8, same.buf};
    int ok = column_of(&begins, begins_width, &job.begins) && column_of(&lengths, lengths_width, &job.lengths)
             && column_of(&order, order_width, &job.order) && bounds.len % 8 == 0
             && (size_t)same.len >= job.order.n && first >= 0 && first <= last && (size_t)last < job.n_bounds;
    int status = -2;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        status = sort_dirs_run(&job, (size_t)first, (size_t)last);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&blob); PyBuffer_Release(&begins); PyBuffer_Release(&lengths);
    PyBuffer_Release(&order); PyBuffer_Release(&bounds); PyBuffer_Release(&same);
    if (status == -1)
        return PyErr_NoMemory();
    if (status == -2) {
        PyErr_SetString(PyExc_ValueError, "sort_dirs: a folder, row or name lies outside its array");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {"gather", gather, METH_VARARGS, gather_doc},
    {"split_dirs", split_dirs, METH_VARARGS, split_dirs_doc},
    {"sort_dirs", sort_dirs, METH_VARARGS, sort_dirs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "bioscanfs._cdscan",
    "The byte loops of an index build (central directory walk, name segments), in C without the GIL.", -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cdscan(void) { return PyModule_Create(&module); }
