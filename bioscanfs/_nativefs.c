/* The native FUSE engine: libfuse 3's low-level API answering from the index arrays.
 *
 * Why C: through mfusepy every request costs tens of microseconds of ctypes callback
 * and GIL, and a cold file costs two of them (LOOKUP, READ). Here lookups, attributes,
 * listings (with attributes: READDIRPLUS) and whole reads of stored and deflated members
 * up to 1 MiB (inflated with libdeflate) run on libfuse's worker threads without the
 * GIL, straight from the memory-mapped tree; the isatty ioctl of Python's open() stores
 * small files in the page cache (op_ioctl).
 *
 * Everything else goes back to Python, which owns decoding, error messages and logs:
 * other methods, encrypted, large or remote members, partial reads, symlinks, and any
 * read whose checks fail here (local header, length, stream end or CRC-32): Python then
 * reads the member again and names the fault. So no byte is served that the Python
 * reader would refuse.
 *
 * Node ids never change while mounted, so FORGET needs no bookkeeping:
 * directory d is d + 1 (the root, directory 0, is FUSE_ROOT_ID); file row r is
 * n_dirs + 1 + r. A link (the views/ folder: docs/views.md) is its target row's node, a
 * hard link: its name and everything else come from the row (link_row).
 *
 * The tables come from the index folder, which is untrusted input: every value that a
 * request uses as an index, a length or an offset is bounded before it is used (bioscanfs/tree.py
 * checks the same bounds in Python; the layout is described there). check_tables bounds the
 * small tables once, before serving; the bulk ones (files, name_ends, names, links) are
 * checked in units of unit_rows rows (or links) the first time a request reads one of a
 * unit (rows_ready): the CRC-32 of their bytes, then their bounds. A unit that fails is
 * never served (EIO), and Python is told once (damaged), which logs it and removes the
 * index file.
 */
#define _GNU_SOURCE   /* O_DIRECT */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* setup.py asks for API 3.12 where the headers have it (the loop's worker bound, run_loop). */
#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 35
#endif
#include <fuse_lowlevel.h>
#include <fuse_log.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <libdeflate.h>
#include <pthread.h>

/* One row of the tree's ``files`` array (index.FILE_DTYPE, packed). */
#pragma pack(push, 1)
typedef struct {
    uint64_t header_offset, compressed_size, size;
    uint32_t crc32;
    int64_t mtime;
    uint16_t method, flags, mode;
    uint16_t name_length, archive, extra_room;
} member_t;
#pragma pack(pop)

enum {
    LOCAL_SIZE = 30,        /* APPNOTE 4.3.7 local file header, fixed part */
    EXTRA_SLACK = 128,      /* read past the name for the extra field: one pread, mostly */
    PUSH_MAX = 128 << 10,   /* pushed on open: no more than the kernel's first readahead */
    PUSH_SHARE = 4,         /* at most one worker in this many pushing at once (see op_ioctl) */
    DIRECT_ALIGN = 4096,    /* O_DIRECT offsets, lengths and buffers: enough for any block size up to a page */
    METHOD_STORED = 0,
    METHOD_DEFLATE = 8,
    FLAG_ENCRYPTED = 1,
    FLAG_DESCRIPTOR = 8,
    NAME_MAX_BYTES = 255,
    IDLE_WORKERS = 10,      /* workers kept when idle, beyond them idle ones end (libfuse's loop) */
    WORKERS_MAX = 4096,     /* a bound on serve()'s workers, far above any core count's need */
};

/* The tables, by the keys of the dict that Python passes (nativefs.tables). */
enum { B_FILES, B_NAMES, B_NAME_ENDS, B_DIR_LO, B_DIR_HI, B_DIR_MTIME, B_DIR_PARENT, B_DIR_NAMES,
       B_DIR_ENDS, B_LINKS, B_LINK_LO, B_LINK_HI, B_FDS, B_DIRECT, B_ARCHIVE_SIZES, B_FILES_CRC, B_NAMES_CRC,
       B_NAME_ENDS_CRC, B_LINKS_CRC, B_LAZY, N_BUFFERS };
static const char *const TABLE_NAMES[N_BUFFERS] = {
    "files", "names", "name_ends", "dir_lo", "dir_hi", "dir_mtime", "dir_parent", "dir_names",
    "dir_ends", "links", "link_lo", "link_hi", "fds", "direct", "archive_sizes", "files_crc", "names_crc",
    "name_ends_crc", "links_crc", "lazy"};
/* Bytes per element of each table (0: raw bytes or rows, checked on their own). */
static const Py_ssize_t TABLE_ITEM[N_BUFFERS] = {0, 1, 4, 8, 8, 8, 8, 1, 8, 4, 8, 8, 8, 8, 8, 4, 4, 4, 4, 8};

/* Columns under a CRC-32 per crc_block bytes (bioscanfs/store.py Blocks): the column and
 * its CRCs, checked block by block on first use (verify_bytes). */
enum { C_FILES, C_NAMES, C_NAME_ENDS, C_LINKS, N_CRC_COLUMNS };
static const int CRC_COLUMN[N_CRC_COLUMNS][2] = {
    {B_FILES, B_FILES_CRC}, {B_NAMES, B_NAMES_CRC}, {B_NAME_ENDS, B_NAME_ENDS_CRC}, {B_LINKS, B_LINKS_CRC}};

/* Kinds of row units checked on first use (rows_ready): files rows with their names, and
 * links. A new bulk column plugs in as one more kind: its row count and the check of
 * rows lo..hi. */
enum { U_FILES, U_LINKS, N_UNIT_KINDS };

/* What is known of a CRC block or a unit. */
enum { UNCHECKED = 0, GOOD = 1, BAD = 2 };

typedef struct {
    Py_buffer views[N_BUFFERS];
    const member_t *files;
    uint64_t n_files;
    uint64_t live_files;        /* rows in some directory's range (an extended tree has others) */
    const char *names;          /* the files' own names end to end, sorted within each directory */
    const uint32_t *name_ends;  /* 32-bit: at most 4 GiB of names (tree.NAMES_MAX) */
    const uint64_t *dir_lo, *dir_hi, *dir_parent, *dir_ends, *archive_sizes;
    const uint32_t *links;      /* file rows shown again in other directories (views/) */
    const uint64_t *link_lo, *link_hi;   /* each directory's run of links, sorted by name */
    uint64_t n_links;
    uint64_t *sub_lo, *sub_hi;  /* each directory's subdirectories: ids sub_lo..sub_hi (derived) */
    const int64_t *dir_mtime, *fds;
    int *direct;                /* per archive: the same file opened with O_DIRECT, or -1 */
    const char *dir_names;      /* each directory's own name, end to end */
    uint64_t n_dirs, n_archives, whole_max, total_bytes;
    uint64_t read_around;       /* bytes around a buffered read brought into the page cache, or 0 */
    unsigned int init_readahead;  /* the readahead asked for in the INIT reply (serving.INIT_READAHEAD_KB) */
    double timeout;             /* how long the kernel may keep names and attributes (Python's choice) */
    uint64_t block_size;        /* st_blksize and f_bsize (Python's choice) */
    mode_t file_mode, dir_mode; /* st_mode of files and directories (Python's choice) */
    uid_t uid;
    gid_t gid;
    PyObject *read_cb, *attr_cb, *readlink_cb, *ready_cb;
    struct fuse_session *se;
    uint64_t crc_block;         /* bytes under one CRC-32 (a power of two: check_tables) */
    uint64_t unit_rows;         /* rows checked at once (a power of two: check_tables) */
    unsigned unit_shift;        /* log2(unit_rows) */
    uint8_t *crc_state[N_CRC_COLUMNS];   /* per CRC block: UNCHECKED, GOOD or BAD */
    uint8_t *unit_state[N_UNIT_KINDS];   /* per unit: UNCHECKED, GOOD or BAD */
    int damaged;                /* Python has been told of a failed unit */
    PyObject *damaged_cb;       /* told once: the problem, as text (None in check()) */
    uint8_t *pushed;            /* one bit per file row: bytes stored in the page cache once */
    int push_max;               /* workers allowed to push at once (0: the single-threaded loop) */
    int pushing;                /* workers inside a push now */
} server_t;

static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const unsigned char *p) { return (uint32_t)le16(p) | (uint32_t)le16(p + 2) << 16; }

static int is_dir(const server_t *s, fuse_ino_t ino) { return ino >= 1 && ino <= s->n_dirs; }
static int is_file(const server_t *s, fuse_ino_t ino) { return ino > s->n_dirs && ino - s->n_dirs - 1 < s->n_files; }
static uint64_t row_of(const server_t *s, fuse_ino_t ino) { return ino - s->n_dirs - 1; }
static fuse_ino_t file_ino(const server_t *s, uint64_t row) { return s->n_dirs + 1 + row; }

static int rows_ready(server_t *s, int kind, uint64_t lo, uint64_t hi);

/* Directory d's own name (checked: at most NAME_MAX_BYTES, inside dir_names). */
static const char *dir_base(const server_t *s, uint64_t d, size_t *len)
{
    uint64_t start = d ? s->dir_ends[d - 1] : 0;
    *len = (size_t)(s->dir_ends[d] - start);
    return s->dir_names + start;
}

/* The file row that link i names in *row (checked on first use: below n_files): 0, or
 * EIO when the unit of links holding it fails its check. */
static int link_row(server_t *s, uint64_t i, uint64_t *row)
{
    int err = rows_ready(s, U_LINKS, i, i + 1);
    *row = err ? 0 : s->links[i];
    return err;
}

/* File row r's own name (checked by rows_ready: 1..NAME_MAX_BYTES, inside names). */
static const char *file_name(const server_t *s, uint64_t row, size_t *len)
{
    uint64_t start = row ? s->name_ends[row - 1] : 0;
    *len = (size_t)(s->name_ends[row] - start);
    return s->names + start;
}

static int compare_bytes(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    return c ? c : (alen > blen) - (alen < blen);
}

/* Calls into Python hold the GIL; an unexpected exception is logged and becomes EIO. */
static int errno_from_exception(PyObject *where)
{
    PyErr_WriteUnraisable(where);
    return EIO;
}

/* (mode, size) of a symlink row: only Python knows whether its target stays inside. */
static int link_attr(server_t *s, uint64_t row, mode_t *mode, uint64_t *size)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int err = 0;
    unsigned int m = 0;
    unsigned long long n = 0;
    PyObject *r = PyObject_CallFunction(s->attr_cb, "K", (unsigned long long)row);
    if (!r || !PyArg_ParseTuple(r, "IK", &m, &n))
        err = errno_from_exception(s->attr_cb);
    Py_XDECREF(r);
    PyGILState_Release(gil);
    *mode = m;
    *size = n;
    return err;
}

static int fill_attr(server_t *s, fuse_ino_t ino, struct stat *st)
{
    int64_t mtime;
    uint64_t size = 0;
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_uid = s->uid;
    st->st_gid = s->gid;
    st->st_blksize = (blksize_t)s->block_size;
    if (is_dir(s, ino)) {
        uint64_t d = ino - 1;
        st->st_mode = s->dir_mode;
        st->st_nlink = 2 + (s->sub_hi[d] - s->sub_lo[d]);
        mtime = s->dir_mtime[d];
    } else if (is_file(s, ino)) {
        int err = rows_ready(s, U_FILES, row_of(s, ino), row_of(s, ino) + 1);
        if (err)
            return err;
        const member_t *m = &s->files[row_of(s, ino)];
        st->st_mode = s->file_mode;
        st->st_nlink = 1;
        size = m->size;
        mtime = m->mtime;
        if (S_ISLNK(m->mode)) {
            mode_t mode;
            int err = link_attr(s, row_of(s, ino), &mode, &size);
            if (err)
                return err;
            st->st_mode = mode;
        }
    } else {
        return ENOENT;
    }
    st->st_size = (off_t)size;
    st->st_blocks = (blkcnt_t)((size + 511) / 512);
    st->st_mtim.tv_sec = st->st_atim.tv_sec = st->st_ctim.tv_sec = mtime;
    return 0;
}

/* Entry i of one of a directory's runs: its name and node, or an errno (a row or link
 * that fails its check on first use). */
typedef int (*entry_at)(server_t *s, uint64_t i, const char **name, size_t *len, fuse_ino_t *ino);

static int subdir_at(server_t *s, uint64_t i, const char **name, size_t *len, fuse_ino_t *ino)
{
    *name = dir_base(s, i, len);
    *ino = i + 1;
    return 0;
}

static int file_at(server_t *s, uint64_t row, const char **name, size_t *len, fuse_ino_t *ino)
{
    int err = rows_ready(s, U_FILES, row, row + 1);
    if (err)
        return err;
    *name = file_name(s, row, len);
    *ino = file_ino(s, row);
    return 0;
}

static int link_at(server_t *s, uint64_t i, const char **name, size_t *len, fuse_ino_t *ino)
{
    uint64_t row;
    int err = link_row(s, i, &row);
    return err ? err : file_at(s, row, name, len, ino);
}

/* A directory's entries after "." and "..": three runs, each sorted by name, listed in
 * this order: its subdirectories (ids), its files (rows), its links (positions in links). */
enum { RUN_SUBDIRS, RUN_FILES, RUN_LINKS, N_RUNS };
static const entry_at RUN_ENTRY[N_RUNS] = {subdir_at, file_at, link_at};

static void run_bounds(const server_t *s, uint64_t d, int run, uint64_t *lo, uint64_t *hi)
{
    const uint64_t *los[N_RUNS] = {s->sub_lo, s->dir_lo, s->link_lo}, *his[N_RUNS] = {s->sub_hi, s->dir_hi, s->link_hi};
    *lo = los[run][d];
    *hi = his[run][d];
}

/* The child named ``name`` of directory ``d`` in *ino (0 when there is none): 0, or EIO
 * when an entry the search reads fails its check. */
static int find_child(server_t *s, uint64_t d, const char *name, fuse_ino_t *ino)
{
    size_t len = strlen(name);
    *ino = 0;
    for (int run = 0; run < N_RUNS; run++) {
        uint64_t lo, hi;
        run_bounds(s, d, run, &lo, &hi);
        while (lo < hi) {   /* binary search: each run is sorted by name */
            uint64_t mid = lo + (hi - lo) / 2;
            const char *found;
            size_t flen;
            fuse_ino_t node;
            int err = RUN_ENTRY[run](s, mid, &found, &flen, &node);
            if (err)
                return err;
            int c = compare_bytes(found, flen, name, len);
            if (c == 0) {
                *ino = node;
                return 0;
            }
            if (c < 0)
                lo = mid + 1;
            else
                hi = mid;
        }
    }
    return 0;
}

static unsigned char *read_whole(server_t *s, const member_t *m, const unsigned char **data);

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    server_t *s = userdata;
    /* Every listing carries attributes, so a walk needs no LOOKUP per entry. */
    if (conn->capable & FUSE_CAP_READDIRPLUS)
        conn->want |= FUSE_CAP_READDIRPLUS;
    conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO;
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
    /* The kernel can only lower its readahead here; the value tells serving.widen_readahead
     * that the reply has been taken. */
    if (s->init_readahead < conn->max_readahead)
        conn->max_readahead = s->init_readahead;

    if (s->ready_cb != Py_None) {
        PyGILState_STATE gil = PyGILState_Ensure();
        PyObject *r = PyObject_CallNoArgs(s->ready_cb);
        if (!r)
            PyErr_WriteUnraisable(s->ready_cb);
        Py_XDECREF(r);
        PyGILState_Release(gil);
    }
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    server_t *s = fuse_req_userdata(req);
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.entry_timeout = e.attr_timeout = s->timeout;
    if (!is_dir(s, parent)) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    int err = find_child(s, parent - 1, name, &e.ino);
    if (!err && e.ino)   /* else ino 0: a miss the kernel caches for entry_timeout */
        err = fill_attr(s, e.ino, &e.attr);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    server_t *s = fuse_req_userdata(req);
    struct stat st;
    int err = fill_attr(s, ino, &st);
    (void)fi;
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_attr(req, &st, s->timeout);
}

/* ENOSYS once: the kernel then opens files without asking (no OPEN or RELEASE per
 * file) and keeps their pages across opens. */
static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, ENOSYS);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    server_t *s = fuse_req_userdata(req);
    if (!is_dir(s, ino)) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    fi->cache_readdir = 1;  /* the kernel keeps listings, as it keeps pages */
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

/* Entry i of directory d in *ino and name: ".", "..", then its runs in order (RUN_*).
 * 0, or EIO when the entry fails its check. */
static int dir_entry(server_t *s, uint64_t d, uint64_t i, char name[NAME_MAX_BYTES + 1], fuse_ino_t *ino)
{
    if (i < 2) {
        strcpy(name, i ? ".." : ".");
        *ino = (i ? s->dir_parent[d] : d) + 1;
        return 0;
    }
    i -= 2;
    for (int run = 0; run < N_RUNS; run++) {
        uint64_t lo, hi;
        run_bounds(s, d, run, &lo, &hi);
        if (i < hi - lo) {
            const char *from;
            size_t len;
            int err = RUN_ENTRY[run](s, lo + i, &from, &len, ino);
            if (!err) {
                memcpy(name, from, len);   /* len <= NAME_MAX_BYTES: check_tables, rows_ready */
                name[len] = 0;
            }
            return err;
        }
        i -= hi - lo;
    }
    return ENOENT;   /* past the last entry: list_dir never asks */
}

static void list_dir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus)
{
    server_t *s = fuse_req_userdata(req);
    if (!is_dir(s, ino)) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    uint64_t d = ino - 1;
    uint64_t total = 2;   /* "." and "..", then the runs */
    for (int run = 0; run < N_RUNS; run++) {
        uint64_t lo, hi;
        run_bounds(s, d, run, &lo, &hi);
        total += hi - lo;
    }
    char *buf = malloc(size ? size : 1);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    size_t used = 0;
    for (uint64_t i = (uint64_t)off; i < total; i++) {
        char name[NAME_MAX_BYTES + 1];
        struct fuse_entry_param e;
        memset(&e, 0, sizeof e);
        e.entry_timeout = e.attr_timeout = s->timeout;
        int err = dir_entry(s, d, i, name, &e.ino);
        if (!err)
            err = fill_attr(s, e.ino, &e.attr);
        if (err) {
            free(buf);
            fuse_reply_err(req, err);
            return;
        }
        size_t len = plus ? fuse_add_direntry_plus(req, buf + used, size - used, name, &e, (off_t)(i + 1))
                          : fuse_add_direntry(req, buf + used, size - used, name, &e.attr, (off_t)(i + 1));
        if (len > size - used)
            break;
        used += len;
    }
    fuse_reply_buf(req, buf, used);
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    list_dir(req, ino, size, off, 0);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    list_dir(req, ino, size, off, 1);
}

/* ``len`` bytes from ``off`` when the page cache holds them all (most reads of an archive
 * read around are); otherwise -1, after asking the kernel for the read_around span (a power
 * of two, checked in serve) that holds them, so that the pread that follows starts it. Only
 * misses pay for the span's walk through the page cache (a sixth of the server's time when
 * every read asked for it). A filesystem without RWF_NOWAIT reads are misses every time. */
static ssize_t read_around(const server_t *s, int fd, void *buf, size_t len, uint64_t off)
{
    struct iovec v = {buf, len};
    ssize_t n = preadv2(fd, &v, 1, (off_t)off, RWF_NOWAIT);
    if (n == (ssize_t)len)
        return n;
    /* only a hint: its errors do not matter */
    posix_fadvise(fd, (off_t)(off & ~(s->read_around - 1)), (off_t)s->read_around, POSIX_FADV_WILLNEED);
    return -1;
}

/* ``len`` bytes of archive ``a`` from ``off`` in one pread: returns the block to free and
 * sets *at to the byte at ``off`` inside it and *got to the bytes read from there.
 *
 * Two ways, chosen per mount in nativefs.read_through_cache:
 * - archives that fit in memory are read through the page cache, with the read_around span
 *   around the read asked for ahead of it: a pass reads each block of the archive from disk
 *   once, in large reads, however its members are ordered;
 * - larger ones exactly, with O_DIRECT (``direct`` holds a descriptor): the bytes read here
 *   go on to the mount's page cache (the READ reply or the store), so reading them through
 *   the archive's page cache as well would keep every file in memory twice, and a random
 *   epoch would read neighbours that are evicted before their turn.
 * A filesystem that refuses O_DIRECT (at open, or EINVAL here) is read through the cache,
 * exactly, as is every read made in Python. */
static unsigned char *read_span(server_t *s, uint16_t a, uint64_t off, size_t len,
                                const unsigned char **at, size_t *got)
{
    int fd = __atomic_load_n(&s->direct[a], __ATOMIC_RELAXED);
    if (fd >= 0) {
        uint64_t lo = off & ~(uint64_t)(DIRECT_ALIGN - 1);
        uint64_t hi = (off + len + DIRECT_ALIGN - 1) & ~(uint64_t)(DIRECT_ALIGN - 1);
        void *block;
        if (posix_memalign(&block, DIRECT_ALIGN, hi - lo))
            return NULL;
        ssize_t n = pread(fd, block, hi - lo, (off_t)lo);
        if (n >= 0 || errno != EINVAL) {
            size_t skip = (size_t)(off - lo);
            *at = (unsigned char *)block + skip;
            *got = n > (ssize_t)skip ? (size_t)n - skip : 0;
            if (*got > len)
                *got = len;
            return block;
        }
        free(block);
        __atomic_store_n(&s->direct[a], -1, __ATOMIC_RELAXED);
    }
    unsigned char *block = malloc(len);
    if (!block)
        return NULL;
    ssize_t n = s->read_around ? read_around(s, (int)s->fds[a], block, len, off) : -1;
    if (n < 0)
        n = pread((int)s->fds[a], block, len, (off_t)off);
    *at = block;
    *got = n > 0 ? (size_t)n : 0;
    return block;
}

/* The most compressed bytes a deflated member of ``size`` bytes is served with here: what
 * any usual encoder writes (stored blocks cost 5 bytes per 64 KiB). Longer streams are
 * valid deflate too (empty blocks), and go to Python, which reads them in bounded pieces. */
static uint64_t deflate_bound(uint64_t size) { return size + (size >> 3) + 4096; }

/* Whether a whole read of the member is served here; everything else goes to Python. */
static int served_here(const server_t *s, const member_t *m)
{
    if (m->flags & FLAG_ENCRYPTED || m->size == 0 || m->size > s->whole_max || S_ISLNK(m->mode)
        || m->archive >= s->n_archives || s->fds[m->archive] < 0)
        return 0;
    return (m->method == METHOD_STORED && m->compressed_size == m->size)
        || (m->method == METHOD_DEFLATE && m->compressed_size <= deflate_bound(m->size));
}

/* A member's local header, name, extra field and data, read in one pread (two when the
 * extra field is long) and checked against its central entry as the Python reader checks
 * them: returns the block (to free) and sets *data to the member's data, or NULL. */
static unsigned char *read_raw(server_t *s, const member_t *m, const unsigned char **data)
{
    size_t csize = (size_t)m->compressed_size;   /* bounded by served_here */
    size_t want = LOCAL_SIZE + m->name_length + EXTRA_SLACK + csize, got;
    const unsigned char *buf;
    unsigned char *block = read_span(s, m->archive, m->header_offset, want, &buf, &got);
    if (!block)
        return NULL;
    if (got < LOCAL_SIZE || le32(buf) != 0x04034b50)
        goto refuse;
    uint16_t flags = le16(buf + 6), method = le16(buf + 8);
    uint16_t name_len = le16(buf + 26), extra_len = le16(buf + 28);
    if (method != m->method || name_len != m->name_length || extra_len > m->extra_room)
        goto refuse;
    if (!(flags & FLAG_DESCRIPTOR)) {
        uint32_t local[3] = {le32(buf + 14), le32(buf + 18), le32(buf + 22)};
        uint32_t central[3] = {m->crc32, (uint32_t)m->compressed_size, (uint32_t)m->size};
        for (int i = 0; i < 3; i++)
            if (local[i] != 0xFFFFFFFFu && local[i] != central[i])
                goto refuse;
    }
    size_t start = LOCAL_SIZE + (size_t)name_len + extra_len;
    if (start + csize > got) {   /* a long extra field: read again, all of it */
        if (got < want)
            goto refuse;   /* the archive ends early */
        free(block);
        block = read_span(s, m->archive, m->header_offset, start + csize, &buf, &got);
        if (!block || got < start + csize)
            goto refuse;
    }
    *data = buf + start;
    return block;
refuse:
    free(block);
    return NULL;
}

/* One libdeflate decompressor per worker thread (they are not shared), freed with it. */
static pthread_key_t inflater_key;
static pthread_once_t inflater_once = PTHREAD_ONCE_INIT;

static void free_inflater(void *d) { libdeflate_free_decompressor(d); }
static void make_inflater_key(void) { pthread_key_create(&inflater_key, free_inflater); }

static struct libdeflate_decompressor *thread_inflater(void)
{
    pthread_once(&inflater_once, make_inflater_key);
    struct libdeflate_decompressor *d = pthread_getspecific(inflater_key);
    if (!d && (d = libdeflate_alloc_decompressor()))
        pthread_setspecific(inflater_key, d);
    return d;
}

/* Exactly m->size bytes inflated from exactly m->compressed_size: a stream that needs
 * more room, ends early, or leaves bytes after its end is refused (NULL). */
static unsigned char *inflate_member(const member_t *m, const unsigned char *in)
{
    struct libdeflate_decompressor *d = thread_inflater();
    unsigned char *out = d ? malloc((size_t)m->size) : NULL;
    size_t used = 0, made = 0;
    if (out && libdeflate_deflate_decompress_ex(d, in, (size_t)m->compressed_size, out, (size_t)m->size,
                                                &used, &made) == LIBDEFLATE_SUCCESS
        && used == m->compressed_size && made == m->size)
        return out;
    free(out);
    return NULL;
}

/* A whole stored or deflated member (see served_here), read and decoded, its CRC-32
 * checked as the Python reader checks it: returns a block (to free) and sets *data
 * inside it, or NULL to hand the member to Python, which serves it or names the fault. */
static unsigned char *read_whole(server_t *s, const member_t *m, const unsigned char **data)
{
    const unsigned char *raw = NULL;
    unsigned char *block = served_here(s, m) ? read_raw(s, m, &raw) : NULL;
    if (block && m->method == METHOD_DEFLATE) {
        unsigned char *plain = inflate_member(m, raw);
        free(block);
        block = plain;
        raw = plain;
    }
    if (block && libdeflate_crc32(0, raw, (size_t)m->size) != m->crc32) {
        free(block);
        block = NULL;
    }
    *data = raw;
    return block;
}

/* Reply with the bytes a Python callback returned, or with the errno it returned. */
static void reply_from_python(fuse_req_t req, PyObject *cb, PyObject *r, int as_link)
{
    if (r && PyBytes_Check(r)) {
        if (as_link)
            fuse_reply_readlink(req, PyBytes_AS_STRING(r));
        else
            fuse_reply_buf(req, PyBytes_AS_STRING(r), (size_t)PyBytes_GET_SIZE(r));
        return;
    }
    int err = r && PyLong_Check(r) ? (int)PyLong_AsLong(r) : EIO;
    if (!r || PyErr_Occurred())
        err = errno_from_exception(cb);
    fuse_reply_err(req, err > 0 ? err : EIO);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    server_t *s = fuse_req_userdata(req);
    (void)fi;
    if (!is_file(s, ino)) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    uint64_t row = row_of(s, ino);
    int err = rows_ready(s, U_FILES, row, row + 1);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    const member_t *m = &s->files[row];
    const unsigned char *data;
    unsigned char *block = off == 0 && size >= m->size ? read_whole(s, m, &data) : NULL;
    if (block) {
        fuse_reply_buf(req, (const char *)data, m->size);
        free(block);
        return;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *r = PyObject_CallFunction(s->read_cb, "KnL", (unsigned long long)row, (Py_ssize_t)size,
                                        (long long)off);
    reply_from_python(req, s->read_cb, r, 0);
    Py_XDECREF(r);
    PyGILState_Release(gil);
}

/* No ioctl is supported, and the kernel forwards every one: Python's open() asks isatty
 * (TCGETS) on each open, so each open costs this round trip. It is put to use: the
 * first time a small file is opened, its checked bytes are stored in the kernel's
 * page cache before the answer, and the READ that would follow never comes.
 *
 * A store waits for any page of the file that another reader has locked, until that
 * reader's READ is answered, by another worker. So stores are skipped in the
 * single-threaded loop, and at most a PUSH_SHARE-th of the workers store at once: the
 * others stay free for READs. A skipped store costs nothing but the READ it would have
 * saved. */
static void push_to_page_cache(server_t *s, fuse_ino_t ino)
{
    uint64_t row = row_of(s, ino);
    if (rows_ready(s, U_FILES, row, row + 1))
        return;   /* the READ that follows gets EIO */
    const member_t *m = &s->files[row];
    uint8_t bit = (uint8_t)(1u << (row & 7));
    if (m->size > PUSH_MAX || __atomic_load_n(&s->pushed[row >> 3], __ATOMIC_RELAXED) & bit)
        return;
    if (__atomic_add_fetch(&s->pushing, 1, __ATOMIC_ACQ_REL) <= s->push_max
        && !(__atomic_fetch_or(&s->pushed[row >> 3], bit, __ATOMIC_ACQ_REL) & bit)) {
        const unsigned char *data;
        unsigned char *block = read_whole(s, m, &data);
        if (block) {   /* if the store fails, the READ comes as usual */
            struct fuse_bufvec bv = FUSE_BUFVEC_INIT(m->size);
            bv.buf[0].mem = (void *)data;
            fuse_lowlevel_notify_store(s->se, ino, 0, &bv, 0);
            free(block);
        }
    }
    __atomic_sub_fetch(&s->pushing, 1, __ATOMIC_ACQ_REL);
}

static void op_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg, struct fuse_file_info *fi,
                     unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
    server_t *s = fuse_req_userdata(req);
    (void)cmd, (void)arg, (void)fi, (void)flags, (void)in_buf, (void)in_bufsz, (void)out_bufsz;
    if (s->push_max && is_file(s, ino))
        push_to_page_cache(s, ino);
    fuse_reply_err(req, ENOTTY);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
    server_t *s = fuse_req_userdata(req);
    if (!is_file(s, ino)) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *r = PyObject_CallFunction(s->readlink_cb, "K", (unsigned long long)row_of(s, ino));
    reply_from_python(req, s->readlink_cb, r, 1);
    Py_XDECREF(r);
    PyGILState_Release(gil);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    server_t *s = fuse_req_userdata(req);
    struct statvfs st;
    (void)ino;
    memset(&st, 0, sizeof st);
    st.f_bsize = st.f_frsize = s->block_size;
    st.f_blocks = (s->total_bytes + s->block_size - 1) / s->block_size;
    st.f_files = s->live_files + s->n_dirs;
    st.f_namemax = NAME_MAX_BYTES;
    fuse_reply_statfs(req, &st);
}

/* ioctl, flush, getxattr...: left NULL; libfuse answers ENOSYS (the kernel stops asking,
 * except for ioctl). */
static const struct fuse_lowlevel_ops OPS = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .open = op_open,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .readdirplus = op_readdirplus,
    .read = op_read,
    .ioctl = op_ioctl,
    .readlink = op_readlink,
    .statfs = op_statfs,
};

static void release_tables(server_t *s)
{
    for (int i = 0; i < N_BUFFERS; i++)
        if (s->views[i].obj)
            PyBuffer_Release(&s->views[i]);
    free(s->sub_lo);
    free(s->sub_hi);
    s->sub_lo = s->sub_hi = NULL;
    for (int c = 0; c < N_CRC_COLUMNS; c++) {
        free(s->crc_state[c]);
        s->crc_state[c] = NULL;
    }
    for (int k = 0; k < N_UNIT_KINDS; k++) {
        free(s->unit_state[k]);
        s->unit_state[k] = NULL;
    }
}

/* Take a read-only view of every table of the dict; a missing key or a wrong element
 * size is a TypeError (a bug in nativefs.py, not bad input). */
static int take_tables(server_t *s, PyObject *tables)
{
    if (!PyDict_Check(tables)) {
        PyErr_SetString(PyExc_TypeError, "tables must be a dict");
        return -1;
    }
    for (int i = 0; i < N_BUFFERS; i++) {
        PyObject *obj = PyDict_GetItemString(tables, TABLE_NAMES[i]);
        if (!obj) {
            PyErr_Format(PyExc_TypeError, "tables: no %s", TABLE_NAMES[i]);
            return -1;
        }
        if (PyObject_GetBuffer(obj, &s->views[i], PyBUF_C_CONTIGUOUS) < 0)
            return -1;
        if (TABLE_ITEM[i] && s->views[i].len % TABLE_ITEM[i]) {
            PyErr_Format(PyExc_TypeError, "tables: %s is not of %zd-byte elements", TABLE_NAMES[i], TABLE_ITEM[i]);
            return -1;
        }
    }
    return 0;
}

static uint64_t count_of(const server_t *s, int b) { return (uint64_t)s->views[b].len / (uint64_t)TABLE_ITEM[b]; }

/* Element i of an array of 4- or 8-byte ends. */
static uint64_t end_at(const void *ends, size_t width, uint64_t i)
{
    return width == 4 ? ((const uint32_t *)ends)[i] : ((const uint64_t *)ends)[i];
}

/* ends[0..n) (of ``width`` bytes each) cut the blob from ``start`` to at most blob_len
 * into names of 1..NAME_MAX_BYTES bytes with no '/' or NUL (the first name may be empty
 * when first_may_be_empty: the root). */
static const char *check_names(const char *blob, uint64_t blob_len, const void *ends, size_t width, uint64_t n,
                               uint64_t start, int first_may_be_empty)
{
    for (uint64_t i = 0; i < n; i++) {
        uint64_t end = end_at(ends, width, i);
        if (end < start || end > blob_len)
            return "name ends out of order or past the names";
        uint64_t len = end - start;
        if ((len == 0 && !(first_may_be_empty && i == 0)) || len > NAME_MAX_BYTES
            || memchr(blob + start, '/', len) || memchr(blob + start, 0, len))
            return "a name is empty, over 255 bytes, or holds '/' or NUL";
        if ((len == 1 || len == 2) && blob[start] == '.' && blob[start + len - 1] == '.')
            return "a name is '.' or '..'";
        if (first_may_be_empty && i == 0 && len != 0)
            return "the root has a name";
        start = end;
    }
    return NULL;
}

static int by_start(const void *a, const void *b)
{
    uint64_t x = ((const uint64_t *)a)[0], y = ((const uint64_t *)b)[0];
    return (x > y) - (x < y);
}

/* No file row is in two directories' ranges (each range is inside the files already). */
static const char *check_disjoint(const server_t *s)
{
    uint64_t n = 0, *ranges = malloc(2 * sizeof(uint64_t) * s->n_dirs);
    const char *problem = NULL;
    if (!ranges)
        return "out of memory";
    for (uint64_t d = 0; d < s->n_dirs; d++)
        if (s->dir_hi[d] > s->dir_lo[d]) {
            ranges[2 * n] = s->dir_lo[d];
            ranges[2 * n + 1] = s->dir_hi[d];
            n++;
        }
    qsort(ranges, n, 2 * sizeof(uint64_t), by_start);
    for (uint64_t i = 1; i < n && !problem; i++)
        if (ranges[2 * i] < ranges[2 * i - 1])
            problem = "directory row ranges overlap";
    free(ranges);
    return problem;
}

/* The directory tree: breadth-first (parents before children, parents never decreasing),
 * disjoint row ranges inside the files (rows outside every range are those an extended
 * tree no longer uses: tree.py); fills sub_lo/sub_hi and live_files. */
static const char *check_dirs(server_t *s)
{
    uint64_t n = s->n_dirs;
    if (s->dir_parent[0] != 0)
        return "directory tables do not start at the root";
    s->live_files = 0;
    for (uint64_t d = 0; d < n; d++) {
        if (s->dir_lo[d] > s->dir_hi[d] || s->dir_hi[d] > s->n_files)
            return "a directory's row range is not inside the files";
        s->live_files += s->dir_hi[d] - s->dir_lo[d];
        if (d && (s->dir_parent[d] >= d || (d > 1 && s->dir_parent[d] < s->dir_parent[d - 1])))
            return "directory parents are not in breadth-first order";
    }
    const char *problem = check_disjoint(s);
    if (problem)
        return problem;
    if (!(s->sub_lo = malloc(sizeof(uint64_t) * n)) || !(s->sub_hi = malloc(sizeof(uint64_t) * n)))
        return "out of memory";
    for (uint64_t d = 0, child = 1; d < n; d++) {   /* children of d: the run whose parent is d */
        s->sub_lo[d] = child;
        while (child < n && s->dir_parent[child] == d)
            child++;
        s->sub_hi[d] = child;
    }
    return NULL;
}

/* Every row of lo..hi names an archive that is there, and its data lies inside that archive. */
static const char *check_rows(const server_t *s, uint64_t lo, uint64_t hi)
{
    for (uint64_t r = lo; r < hi; r++) {
        const member_t *m = &s->files[r];
        if (m->archive >= s->n_archives)
            return "a file names an archive that is not there";
        uint64_t size = s->archive_sizes[m->archive];
        if (m->header_offset > size || m->compressed_size > size - m->header_offset || m->size >= (UINT64_C(1) << 63))
            return "a file lies past the end of its archive or declares an impossible size";
    }
    return NULL;
}

/* The links' runs: one per directory, tiling the links in directory order (the links
 * themselves are units: check_link_unit). */
static const char *check_links(server_t *s)
{
    s->links = s->views[B_LINKS].buf;
    s->link_lo = s->views[B_LINK_LO].buf;
    s->link_hi = s->views[B_LINK_HI].buf;
    s->n_links = count_of(s, B_LINKS);
    if (count_of(s, B_LINK_LO) != s->n_dirs || count_of(s, B_LINK_HI) != s->n_dirs)
        return "link_lo, link_hi: not one per directory";
    for (uint64_t d = 0; d < s->n_dirs; d++)
        if (s->link_lo[d] > s->link_hi[d] || s->link_lo[d] != (d ? s->link_hi[d - 1] : 0))
            return "link runs are not contiguous";
    if (s->link_hi[s->n_dirs - 1] != s->n_links)
        return "link runs do not cover the links";
    return NULL;
}

/* Whether bytes lo..hi of CRC column c match their CRC-32s (each block checked once). */
static int verify_bytes(server_t *s, int c, uint64_t lo, uint64_t hi)
{
    const Py_buffer *v = &s->views[CRC_COLUMN[c][0]];
    const uint32_t *crcs = s->views[CRC_COLUMN[c][1]].buf;   /* one per block: check_lazy */
    uint64_t len = (uint64_t)v->len, block = s->crc_block;
    if (hi <= lo)
        return 1;
    if (hi > len)
        return 0;
    for (uint64_t b = lo / block; b <= (hi - 1) / block; b++) {
        uint8_t state = __atomic_load_n(&s->crc_state[c][b], __ATOMIC_ACQUIRE);
        if (state == UNCHECKED) {
            uint64_t at = b * block, n = len - at < block ? len - at : block;
            state = libdeflate_crc32(0, (const char *)v->buf + at, (size_t)n) == crcs[b] ? GOOD : BAD;
            __atomic_store_n(&s->crc_state[c][b], state, __ATOMIC_RELEASE);
        }
        if (state == BAD)
            return 0;
    }
    return 1;
}

/* File rows lo..hi (hi > lo): the CRCs of their rows, name ends (and the end before lo,
 * where the first name starts) and names, then their bounds. NULL, or what is wrong. */
static const char *check_file_unit(server_t *s, uint64_t lo, uint64_t hi)
{
    if (!verify_bytes(s, C_FILES, lo * sizeof(member_t), hi * sizeof(member_t))
        || !verify_bytes(s, C_NAME_ENDS, (lo ? lo - 1 : 0) * 4, hi * 4))
        return "a block of files or name_ends does not match its CRC-32";
    uint64_t first = lo ? s->name_ends[lo - 1] : 0, last = s->name_ends[hi - 1];
    uint64_t names_len = (uint64_t)s->views[B_NAMES].len;
    if (first > last || last > names_len || (hi == s->n_files && last != names_len))
        return "name ends out of order or past the names";
    if (!verify_bytes(s, C_NAMES, first, last))
        return "a block of names does not match its CRC-32";
    const char *problem = check_names(s->names, last, s->name_ends + lo, 4, hi - lo, first, 0);
    return problem ? problem : check_rows(s, lo, hi);
}

/* Links lo..hi (hi > lo): the CRCs of their bytes, then each names a file row that is
 * there (that row is checked as a file unit when it is read). NULL, or what is wrong. */
static const char *check_link_unit(server_t *s, uint64_t lo, uint64_t hi)
{
    if (!verify_bytes(s, C_LINKS, lo * 4, hi * 4))
        return "a block of links does not match its CRC-32";
    for (uint64_t i = lo; i < hi; i++)
        if (s->links[i] >= s->n_files)
            return "a link names a file that is not there";
    return NULL;
}

static uint64_t file_count(const server_t *s) { return s->n_files; }
static uint64_t link_count(const server_t *s) { return s->n_links; }

/* Each kind of unit: its rows, and the check of rows lo..hi (by U_* order). */
static const struct {
    uint64_t (*rows)(const server_t *s);
    const char *(*check)(server_t *s, uint64_t lo, uint64_t hi);
} UNIT_KINDS[N_UNIT_KINDS] = {{file_count, check_file_unit}, {link_count, check_link_unit}};

/* Unit u of kind k: rows *lo..*hi. */
static void unit_range(const server_t *s, int k, uint64_t u, uint64_t *lo, uint64_t *hi)
{
    uint64_t n = UNIT_KINDS[k].rows(s);
    *lo = u << s->unit_shift;
    *hi = n - *lo < s->unit_rows ? n : *lo + s->unit_rows;
}

/* Tell Python (once) that a unit failed: it logs the index file and removes it. */
static void report_damage(server_t *s, const char *problem)
{
    if (!s->damaged_cb || s->damaged_cb == Py_None || __atomic_exchange_n(&s->damaged, 1, __ATOMIC_ACQ_REL))
        return;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *r = PyObject_CallFunction(s->damaged_cb, "s", problem);
    if (!r)
        PyErr_WriteUnraisable(s->damaged_cb);
    Py_XDECREF(r);
    PyGILState_Release(gil);
}

/* Rows lo..hi of kind k may be read: each unit they touch checked on first use (several
 * workers may check one at once: the same answer). 0, or EIO when a unit failed. */
static int rows_ready(server_t *s, int k, uint64_t lo, uint64_t hi)
{
    for (uint64_t u = lo >> s->unit_shift; lo < hi && u <= (hi - 1) >> s->unit_shift; u++) {
        uint8_t state = __atomic_load_n(&s->unit_state[k][u], __ATOMIC_ACQUIRE);
        if (state == UNCHECKED) {
            uint64_t first, last;
            unit_range(s, k, u, &first, &last);
            const char *problem = UNIT_KINDS[k].check(s, first, last);
            state = problem ? BAD : GOOD;
            __atomic_store_n(&s->unit_state[k][u], state, __ATOMIC_RELEASE);
            if (problem)
                report_damage(s, problem);
        }
        if (state == BAD)
            return EIO;
    }
    return 0;
}

/* The lazy checks' parameters and states: CRC block and unit sizes (powers of two), one
 * CRC per block of each CRC column. NULL, or what is wrong. */
static const char *check_lazy(server_t *s)
{
    const uint64_t *lazy = s->views[B_LAZY].buf;
    if (count_of(s, B_LAZY) != 2)
        return "lazy: not (CRC block, unit rows)";
    s->crc_block = lazy[0];
    s->unit_rows = lazy[1];
    if (s->crc_block < 64 || s->crc_block > (UINT64_C(1) << 30) || (s->crc_block & (s->crc_block - 1))
        || !s->unit_rows || s->unit_rows > (UINT64_C(1) << 24) || (s->unit_rows & (s->unit_rows - 1)))
        return "lazy: CRC block or unit rows out of range";
    while ((UINT64_C(1) << s->unit_shift) < s->unit_rows)
        s->unit_shift++;
    for (int c = 0; c < N_CRC_COLUMNS; c++) {
        uint64_t blocks = ((uint64_t)s->views[CRC_COLUMN[c][0]].len + s->crc_block - 1) / s->crc_block;
        if (count_of(s, CRC_COLUMN[c][1]) != blocks)
            return "CRC lists: not one per block";
        if (!(s->crc_state[c] = calloc(blocks + 1, 1)))
            return "out of memory";
    }
    for (int k = 0; k < N_UNIT_KINDS; k++)
        if (!(s->unit_state[k] = calloc((UNIT_KINDS[k].rows(s) >> s->unit_shift) + 1, 1)))
            return "out of memory";
    return NULL;
}

/* Every unit of every kind checked now (for check()): NULL, or the first problem. */
static const char *check_all_units(server_t *s)
{
    for (int k = 0; k < N_UNIT_KINDS; k++)
        for (uint64_t u = 0; u << s->unit_shift < UNIT_KINDS[k].rows(s); u++) {
            uint64_t lo, hi;
            unit_range(s, k, u, &lo, &hi);
            const char *problem = UNIT_KINDS[k].check(s, lo, hi);
            if (problem)
                return problem;
        }
    return NULL;
}

/* Bounds the small tables must meet before any request trusts them, and the lazy checks'
 * set-up (the bulk tables are checked by rows_ready): NULL, or what is wrong. */
static const char *check_tables(server_t *s)
{
    const char *problem;
    if (s->views[B_FILES].len % (Py_ssize_t)sizeof(member_t))
        return "files: rows are not the native member layout";
    s->files = s->views[B_FILES].buf;
    s->n_files = (uint64_t)s->views[B_FILES].len / sizeof(member_t);
    s->n_dirs = count_of(s, B_DIR_LO);
    s->n_archives = count_of(s, B_FDS);
    if (s->n_dirs < 1 || count_of(s, B_DIR_HI) != s->n_dirs || count_of(s, B_DIR_MTIME) != s->n_dirs
        || count_of(s, B_DIR_PARENT) != s->n_dirs || count_of(s, B_DIR_ENDS) != s->n_dirs)
        return "directory tables disagree in length";
    if (count_of(s, B_NAME_ENDS) != s->n_files)
        return "name_ends: not one per file";
    if (count_of(s, B_DIRECT) != s->n_archives || count_of(s, B_ARCHIVE_SIZES) != s->n_archives)
        return "direct, archive_sizes: not one per archive";
    s->names = s->views[B_NAMES].buf;
    s->name_ends = s->views[B_NAME_ENDS].buf;
    s->dir_lo = s->views[B_DIR_LO].buf;
    s->dir_hi = s->views[B_DIR_HI].buf;
    s->dir_mtime = s->views[B_DIR_MTIME].buf;
    s->dir_parent = s->views[B_DIR_PARENT].buf;
    s->dir_names = s->views[B_DIR_NAMES].buf;
    s->dir_ends = s->views[B_DIR_ENDS].buf;
    s->fds = s->views[B_FDS].buf;
    s->archive_sizes = s->views[B_ARCHIVE_SIZES].buf;
    uint64_t dir_names_len = (uint64_t)s->views[B_DIR_NAMES].len;
    if ((problem = check_names(s->dir_names, dir_names_len, s->dir_ends, 8, s->n_dirs, 0, 1)))
        return problem;
    if (s->dir_ends[s->n_dirs - 1] != dir_names_len)
        return "names do not end where the blob does";
    if ((problem = check_dirs(s)))
        return problem;
    if ((problem = check_links(s)))
        return problem;
    return check_lazy(s);
}

/* libfuse's own message while mounting (an unknown option, a bad mount point), kept for
 * the one-line error instead of printed; only the thread in serve() logs then. */
static char setup_message[512];

static void keep_message(enum fuse_log_level level, const char *fmt, va_list ap)
{
    size_t used = strlen(setup_message);   /* libfuse may write one line in pieces */
    (void)level;
    vsnprintf(setup_message + used, sizeof setup_message - used, fmt, ap);
    for (char *c = setup_message; *c; c++)
        if (*c == '\n')
            *c = ' ';
    for (size_t end = strlen(setup_message); end && setup_message[end - 1] == ' ';)
        setup_message[--end] = 0;
}

/* SIGINT, SIGTERM and SIGHUP end the loop (libfuse installs its handlers only over the
 * default action, and Python has its own SIGINT handler). */
static const int EXIT_SIGNALS[] = {SIGINT, SIGTERM, SIGHUP};

/* check(tables): None, or ValueError naming what is wrong with the tables, every unit
 * checked (for tests, without FUSE). */
static PyObject *check(PyObject *self, PyObject *tables)
{
    server_t s;
    memset(&s, 0, sizeof s);
    (void)self;
    const char *problem = take_tables(&s, tables) < 0 ? NULL : check_tables(&s);
    if (!problem && !PyErr_Occurred())
        problem = check_all_units(&s);
    int failed = PyErr_Occurred() != NULL;
    release_tables(&s);
    if (failed)
        return NULL;
    if (problem)
        return PyErr_Format(PyExc_ValueError, "native engine: %s", problem);
    Py_RETURN_NONE;
}

/* Bounds the tables (check_tables) and sets up what serving needs besides them; NULL or why not. */
static const char *prepare_server(server_t *s, PyObject *tables)
{
    if (take_tables(s, tables) < 0)
        return "";   /* a Python exception is set */
    const char *problem = check_tables(s);
    if (!problem && (!(s->pushed = calloc(s->n_files / 8 + 1, 1))
                     || !(s->direct = malloc(sizeof(int) * (s->n_archives + 1)))))
        problem = "out of memory";
    const int64_t *direct = s->views[B_DIRECT].buf;
    for (uint64_t a = 0; !problem && a < s->n_archives; a++)
        s->direct[a] = (int)direct[a];
    return problem;
}

static void free_server(server_t *s)
{
    free(s->pushed);
    free(s->direct);
    release_tables(s);
}

/* libfuse's request loop: on `workers` threads (0: this one only). A worker waits for
 * its archive read, so the bound is how many reads can be in flight at once: libfuse
 * 3.12 and later start at most 10 unless told (serving.max_workers says why more);
 * before 3.12 it starts one whenever none is idle, with no bound to set. */
static int run_loop(struct fuse_session *se, unsigned workers)
{
    if (!workers)
        return fuse_session_loop(se);
#if FUSE_USE_VERSION >= FUSE_MAKE_VERSION(3, 12)
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    if (!config)
        return -ENOMEM;
    fuse_loop_cfg_set_max_threads(config, workers);
    fuse_loop_cfg_set_idle_threads(config, IDLE_WORKERS);
    int rc = fuse_session_loop_mt(se, config);
    fuse_loop_cfg_destroy(config);
    return rc;
#else
    struct fuse_loop_config config = {.clone_fd = 0, .max_idle_threads = IDLE_WORKERS};
    return fuse_session_loop_mt(se, &config);
#endif
}

/* Mounts and runs libfuse's request loop until unmounted or signalled (called without the
   GIL). Returns the loop's result; *failed says why when the mount could not be made. */
static int run_session(server_t *s, const char *mountpoint, const char *options, unsigned workers,
                       const char **failed)
{
    char *argv[] = {"bioscanfs", "-o", (char *)options, NULL};
    struct fuse_args fargs = FUSE_ARGS_INIT(3, argv);
    struct sigaction saved[3], dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    int rc = 0;
    setup_message[0] = 0;
    fuse_set_log_func(keep_message);
    struct fuse_session *se = fuse_session_new(&fargs, &OPS, sizeof OPS, s);
    s->se = se;
    s->push_max = workers / PUSH_SHARE;
    if (!se) {
        *failed = "the mount options were refused";
    } else {
        for (int i = 0; i < 3; i++)
            sigaction(EXIT_SIGNALS[i], &dfl, &saved[i]);
        if (fuse_set_signal_handlers(se) != 0) {
            *failed = "cannot install signal handlers";
        } else {
            if (fuse_session_mount(se, mountpoint) != 0) {
                *failed = "cannot mount";
            } else {
                fuse_set_log_func(NULL);   /* from now on libfuse logs to stderr (the log file) */
                rc = run_loop(se, workers);
                fuse_session_unmount(se);
            }
            fuse_remove_signal_handlers(se);
        }
        for (int i = 0; i < 3; i++)
            sigaction(EXIT_SIGNALS[i], &saved[i], NULL);
        fuse_session_destroy(se);
    }
    fuse_set_log_func(NULL);
    fuse_opt_free_args(&fargs);
    return rc;
}

static PyObject *serve(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"mountpoint", "options", "tables", "whole_max", "total_bytes", "timeout",
                               "block_size", "file_mode", "dir_mode", "read_around", "init_readahead", "read", "attr",
                               "readlink", "ready", "damaged", "workers", NULL};
    const char *mountpoint, *options;
    PyObject *tables;
    server_t s;
    unsigned int workers = 0, file_mode, dir_mode;
    unsigned long long whole_max, total_bytes, block_size, read_around;
    memset(&s, 0, sizeof s);
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ssOKKdKIIKIOOOOO|I", keywords, &mountpoint, &options, &tables,
                                     &whole_max, &total_bytes, &s.timeout, &block_size, &file_mode,
                                     &dir_mode, &read_around, &s.init_readahead, &s.read_cb, &s.attr_cb, &s.readlink_cb, &s.ready_cb, &s.damaged_cb,
                                     &workers))
        return NULL;
    if (block_size == 0 || block_size > (1u << 30) || !S_ISREG(file_mode) || !S_ISDIR(dir_mode)
        || read_around > (1u << 30) || (read_around & (read_around - 1)) || workers > WORKERS_MAX) {
        PyErr_SetString(PyExc_ValueError, "block_size, file_mode, dir_mode, read_around or workers out of range");
        return NULL;
    }
    s.block_size = block_size;
    s.file_mode = (mode_t)file_mode;
    s.dir_mode = (mode_t)dir_mode;
    s.whole_max = whole_max;
    s.read_around = read_around;
    s.total_bytes = total_bytes;
    s.uid = getuid();
    s.gid = getgid();
    const char *problem = prepare_server(&s, tables);
    if (problem) {
        free_server(&s);
        if (*problem)
            PyErr_Format(PyExc_ValueError, "native engine: %s", problem);
        return NULL;
    }
    const char *failed = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_session(&s, mountpoint, options, workers, &failed);
    Py_END_ALLOW_THREADS
    free_server(&s);
    if (failed) {   /* MountError in nativefs: one line for the user */
        PyErr_Format(PyExc_OSError, "%s (%s)", failed, setup_message[0] ? setup_message : "libfuse said nothing");
        return NULL;
    }
    if (rc < 0)
        return PyErr_Format(PyExc_RuntimeError, "the FUSE request loop failed: %s", strerror(-rc));
    Py_RETURN_NONE;
}

static PyMethodDef METHODS[] = {
    {"check", check, METH_O, "Check the tables' bounds as serve() does: None, or ValueError naming the fault."},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_VARARGS | METH_KEYWORDS,
     "Mount the tables at mountpoint and serve until unmounted or signalled (releases the GIL)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = "_nativefs", .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC PyInit__nativefs(void)
{
    PyObject *m = PyModule_Create(&MODULE);
    if (m && (PyModule_AddIntConstant(m, "MEMBER_SIZE", (long)sizeof(member_t)) < 0
              || PyModule_AddIntConstant(m, "NAME_MAX", NAME_MAX_BYTES) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
