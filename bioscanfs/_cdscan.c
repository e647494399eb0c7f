/* The byte loops of an index build, in C and without the GIL: the walk of a zip's central
 * directory (APPNOTE.TXT 4.3.12), and the gather and comparison of name segments that
 * the merge does for every member (splitting paths at their last '/', grouping the equal
 * directory parts, sorting each folder by name).
 *
 * Why C: a 5 M-member directory walked with numpy costs about 2 us a member, most of it
 * holding the GIL, so the thread that parses the next archive stalls the merge of the
 * previous one. The walk writes each record's member row (zipdir.MEMBER_DTYPE, ZIP64
 * extras applied, DOS times converted, the room for each local extra field), copies its
 * name and marks the names that need cleaning, in one pass with the GIL released,
 * straight into the arrays zipdir returns (no table of raw records in between).
 * Gathering segments with numpy needs an index per byte; here it is one memcpy a segment.
 *
 * It does only the common case. When the records do not chain exactly from offset 0 to
 * the end of the directory, their number is not the expected one, or a ZIP64 extra field
 * or a disk number cannot be read, it returns -1 and zipdir's numpy walk (the reference:
 * same outputs, and it names the fault) takes over; when the local headers are not in
 * directory order (or overlap, or lie past the data), zipdir computes the rooms. Name
 * cleaning stays in zipdir.py.
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

/* 4.3.12 fields of a central directory header, by offset. */
enum { AT_MADE_BY = 4, AT_FLAGS = 8, AT_METHOD = 10, AT_TIME = 12, AT_DATE = 14, AT_CRC = 16,
       AT_CSIZE = 20, AT_SIZE = 24, AT_DISK = 34, AT_EXTERNAL = 38, AT_OFFSET = 42 };
#define LOCAL_SIZE 30              /* 4.3.7, fixed part of a local header */
#define ZIP64_EXTRA_ID 0x0001      /* 4.5.3 */
#define MAX_EXTRA_BLOCKS 64        /* zipdir.MAX_EXTRA_BLOCKS */
#define MADE_BY_UNIX 3
#define MARK32 0xFFFFFFFFu
#define MARK16 0xFFFFu

/* A row of zipdir.MEMBER_DTYPE (packed, 48 bytes): where each field is. zipdir checks
 * at import that ROW_FIELDS, built from these, is its dtype's layout. */
enum { ROW_OFFSET = 0, ROW_CSIZE = 8, ROW_SIZE = 16, ROW_CRC = 24, ROW_MTIME = 28, ROW_METHOD = 36,
       ROW_FLAGS = 38, ROW_MODE = 40, ROW_NAME_LENGTH = 42, ROW_ARCHIVE = 44, ROW_ROOM = 46, ROW_BYTES = 48 };
#define DOS_CODES 65536            /* a DOS date or time is 16 bits: one table entry each */

/* Little-endian stores, as the dtype says ('<'), whatever the host. */
static void put_le(uint8_t *p, uint64_t v, int width)
{
    for (int k = 0; k < width; k++)
        p[k] = (uint8_t)(v >> (8 * k));
}
static void put16(uint8_t *p, uint64_t v) { put_le(p, v, 2); }
static void put32(uint8_t *p, uint64_t v) { put_le(p, v, 4); }
static void put64(uint8_t *p, uint64_t v) { put_le(p, v, 8); }
static uint64_t le64(const uint8_t *p) { return (uint64_t)u32(p) | (uint64_t)u32(p + 4) << 32; }

typedef struct {
    const uint8_t *dir; size_t dir_size; size_t count; size_t name_max;
    const uint64_t *bases; size_t n_bases; uint64_t prefix; uint64_t data_end;
    const int64_t *day_seconds, *time_seconds;   /* DOS_CODES each */
    uint8_t *table; uint8_t *names; size_t names_size; uint64_t *ends; uint8_t *suspect;
} scan_job;

/* The saturated fields of a record (values[0..3]: size, compressed size, offset, disk)
 * replaced by its ZIP64 extra field's (4.5.3), read from extra[0:length]; 0 when it has
 * none or it is too short (zipdir._apply_zip64 names the fault). */
static int apply_zip64(const uint8_t *extra, size_t length, const int saturated[4], uint64_t values[4])
{
    size_t block = 0;
    int k = 0;
    for (; k < MAX_EXTRA_BLOCKS && length >= 4 && block <= length - 4; k++) {
        if (u16(extra + block) == ZIP64_EXTRA_ID)
            break;
        block += 4 + (size_t)u16(extra + block + 2);
    }
    if (k == MAX_EXTRA_BLOCKS || length < 4 || block > length - 4)
        return 0;
    size_t cursor = block + 4, end = cursor + u16(extra + block + 2);
    if (end > length)
        return 0;
    for (int f = 0; f < 4; f++) {
        size_t width = f < 3 ? 8 : 4;
        if (!saturated[f])
            continue;
        if (end - cursor < width)
            return 0;
        values[f] = width == 8 ? le64(extra + cursor) : u32(extra + cursor);
        cursor += width;
    }
    return 1;
}

/* One member row from the record `rec` (already bounded: its name and extra field lie in
 * the directory); 0 when its ZIP64 extra is missing or short, or its disk is unknown. */
static int fill_row(const scan_job *job, const uint8_t *rec, size_t name_length, uint8_t *row)
{
    uint64_t values[4] = {u32(rec + AT_SIZE), u32(rec + AT_CSIZE), u32(rec + AT_OFFSET), u16(rec + AT_DISK)};
    int saturated[4] = {values[0] == MARK32, values[1] == MARK32, values[2] == MARK32, values[3] == MARK16};
    if ((saturated[0] || saturated[1] || saturated[2] || saturated[3])
            && !apply_zip64(rec + CENTRAL_SIZE + name_length, u16(rec + NAME_LENGTH_AT + 2), saturated, values))
        return 0;
    if (values[3] >= job->n_bases)
        return 0;
    uint32_t external = u32(rec + AT_EXTERNAL);
    put64(row + ROW_OFFSET, job->bases[values[3]] + values[2] + job->prefix);   /* wraps as numpy's uint64 */
    put64(row + ROW_CSIZE, values[1]);
    put64(row + ROW_SIZE, values[0]);
    put32(row + ROW_CRC, u32(rec + AT_CRC));
    put64(row + ROW_MTIME, (uint64_t)job->day_seconds[u16(rec + AT_DATE)] + (uint64_t)job->time_seconds[u16(rec + AT_TIME)]);
    put16(row + ROW_METHOD, u16(rec + AT_METHOD));
    put16(row + ROW_FLAGS, u16(rec + AT_FLAGS));
    put16(row + ROW_MODE, u16(rec + AT_MADE_BY) >> 8 == MADE_BY_UNIX ? external >> 16 : 0);
    put16(row + ROW_NAME_LENGTH, name_length);
    put16(row + ROW_ARCHIVE, 0);
    put16(row + ROW_ROOM, 0);
    return 1;
}

/* The walk; returns the name bytes written, or -1 when the directory is not `count`
 * records chained end to end, a record's ZIP64 fields or disk cannot be read, or the
 * names do not fit the output. */
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
        if (!fill_row(job, rec, name_length, job->table + i * ROW_BYTES))
            return -1;
        memcpy(job->names + written, rec + CENTRAL_SIZE, name_length);
        job->suspect[i] = (uint8_t)needs_cleaning(rec + CENTRAL_SIZE, name_length, job->name_max);
        written += name_length;
        job->ends[i] = written;
        pos += record;
    }
    return pos == job->dir_size ? (Py_ssize_t)written : -1;
}

/* Each member's room for its local extra field (zipdir._extra_room, in the common case
 * of local headers in directory order): 1 when set, 0 when a member lies past the data
 * area, overlaps the next, or the offsets are not in order (then zipdir does it). */
static int set_rooms(const scan_job *job)
{
    const uint64_t limit = job->data_end;
    for (size_t i = 0; i < job->count; i++) {
        uint8_t *row = job->table + i * ROW_BYTES;
        uint64_t offset = le64(row + ROW_OFFSET), csize = le64(row + ROW_CSIZE);
        uint64_t stop = offset + LOCAL_SIZE + u16(row + ROW_NAME_LENGTH) + csize;   /* wraps as numpy's */
        uint64_t next = i + 1 < job->count ? le64(row + ROW_BYTES + ROW_OFFSET) : limit;
        if (offset > limit || csize > limit || stop > limit || next < offset || stop > next)
            return 0;
        put16(row + ROW_ROOM, next - stop < 0xFFFF ? next - stop : 0xFFFF);
    }
    return 1;
}

/* An input or output buffer holds `count` entries of `item` bytes (and is writable if an
 * output). */
static int big_enough(const Py_buffer *buf, size_t count, size_t item, int output, const char *what)
{
    if ((output && buf->readonly) || (size_t)buf->len / item < count) {
        PyErr_Format(PyExc_ValueError, "scan: %s must %shold %zu entries", what, output ? "be writable and " : "",
                     count);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(scan_doc,
"scan(directory, count, name_max, bases, prefix, data_end, day_seconds, time_seconds, table, names, ends,\n"
"     suspect) -> (int, bool)\n\n"
"Walk `count` central directory records of `directory` (bytes-like) into the member table:\n"
"table (zipdir.MEMBER_DTYPE rows; header_offset = bases[disk] + offset + prefix, bases:\n"
"uint64; mtime from day_seconds[date] + time_seconds[time], int64 tables of 65536), names\n"
"(the names end to end), ends (uint64, where each name ends in names) and suspect (one byte\n"
"a name: 1 when it needs cleaning). Returns (name bytes written, whether extra_room is set:\n"
"the members lie in order below data_end without overlapping); written is -1 when the\n"
"records do not chain exactly over the directory, or a ZIP64 extra or disk is missing.");

static PyObject *scan(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer dir, bases, days, times, table, names, ends, suspect;
    Py_ssize_t count, name_max;
    unsigned long long prefix, data_end;
    if (!PyArg_ParseTuple(args, "y*nny*KKy*y*w*w*w*w*", &dir, &count, &name_max, &bases, &prefix, &data_end,
                          &days, &times, &table, &names, &ends, &suspect))
        return NULL;
    Py_ssize_t written = -1;
    int rooms = 0, ok = count >= 0 && name_max >= 0;
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "scan: count and name_max must not be negative");
    ok = ok && big_enough(&bases, 1, 8, 0, "bases") && big_enough(&days, DOS_CODES, 8, 0, "day_seconds")
         && big_enough(&times, DOS_CODES, 8, 0, "time_seconds")
         && big_enough(&table, (size_t)count, ROW_BYTES, 1, "table") && big_enough(&names, 0, 1, 1, "names")
         && big_enough(&ends, (size_t)count, 8, 1, "ends") && big_enough(&suspect, (size_t)count, 1, 1, "suspect");
    if (ok) {
        scan_job job = {dir.buf, (size_t)dir.len, (size_t)count, (size_t)name_max, bases.buf, (size_t)bases.len / 8,
                        prefix, data_end, days.buf, times.buf, table.buf, names.buf, (size_t)names.len, ends.buf,
                        suspect.buf};
        Py_BEGIN_ALLOW_THREADS
        written = walk(&job);
        rooms = written >= 0 && set_rooms(&job);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&dir); PyBuffer_Release(&bases); PyBuffer_Release(&days); PyBuffer_Release(&times);
    PyBuffer_Release(&table); PyBuffer_Release(&names); PyBuffer_Release(&ends); PyBuffer_Release(&suspect);
    return ok ? Py_BuildValue("(nO)", written, rooms ? Py_True : Py_False) : NULL;
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

/* Bytes of a name's sort key: real processids share their first 8 bytes (BIOUG12345-A01,
 * BIOUG12346-...), so 8 would tie on most rows and fall back to the names' bytes, all
 * over the blob; 16 cover a processid and its '.jpg'. */
#define KEY_BYTES 16

/* Names to sort: the first KEY_BYTES bytes as two big-endian integers (so most
 * comparisons are one or two integer compares), and the position in the input (equal
 * names keep their order). */
typedef struct {
    uint64_t key[KEY_BYTES / 8];
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

static int same_key(const sort_item *x, const sort_item *y)
{
    return x->key[0] == y->key[0] && x->key[1] == y->key[1];
}

static int item_less(const sort_item *x, const sort_item *y, const sort_names_job *job)
{
    if (x->key[0] != y->key[0])
        return x->key[0] < y->key[0];
    if (x->key[1] != y->key[1])
        return x->key[1] < y->key[1];
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
        uint8_t word[KEY_BYTES] = {0};
        memcpy(word, job->blob + job->begins[i], job->lengths[i] < KEY_BYTES ? (size_t)job->lengths[i] : KEY_BYTES);
        sort_item item = {{0}, (int64_t)i};
        for (int k = 0; k < KEY_BYTES; k++)
            item.key[k / 8] = item.key[k / 8] << 8 | word[k];
        buffer[i] = item;
    }
    items = merge_sort(buffer, buffer + n, n, job);
    for (size_t i = 0; i < n; i++) {
        order[i] = items[i].at;
        same[i] = 0;
        if (i > 0) {
            int64_t a = items[i - 1].at, b = items[i].at;
            same[i] = same_key(&items[i - 1], &items[i]) && job->lengths[a] == job->lengths[b] &&
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

PyMODINIT_FUNC PyInit__cdscan(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *fields = Py_BuildValue("((si)(si)(si)(si)(si)(si)(si)(si)(si)(si)(si))", "header_offset", ROW_OFFSET,
                                     "compressed_size", ROW_CSIZE, "size", ROW_SIZE, "crc32", ROW_CRC,
                                     "mtime", ROW_MTIME, "method", ROW_METHOD, "flags", ROW_FLAGS, "mode", ROW_MODE,
                                     "name_length", ROW_NAME_LENGTH, "archive", ROW_ARCHIVE, "extra_room", ROW_ROOM);
    if (!fields || PyModule_AddObject(m, "ROW_FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "ROW_BYTES", ROW_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
