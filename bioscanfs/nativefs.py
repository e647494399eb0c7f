"""The native engine: the tree's arrays handed to a libfuse 3 low-level server in C.

Why: through mfusepy each request costs tens of microseconds in Python, and a cold file
costs a LOOKUP and a READ. ``_nativefs`` answers lookups, attributes, listings and whole
reads of stored and deflated members up to 1 MiB from the memory-mapped tree without the
GIL; it calls back here only for what needs the reader (other methods, encrypted, large
or remote members, partial reads, reads whose checks fail in C) and for symlinks; with
``-vv`` each such read is logged. See docs/design.md.
"""
from __future__ import annotations

import errno
import importlib.util
import logging
import os
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .collection import BLOCK_SIZE, CACHE_SECONDS, DIR_MODE, FILE_MODE, Collection
from .errors import MountError
from .names import NAME_MAX
from .reader import WHOLE_READ_MAX
from .serving import INIT_READAHEAD_KB, max_workers, options_text, read_or_errno
from .store import Blocks
from .tree import FILE_DTYPE, LAZY_COLUMNS, UNIT_ROWS

log = logging.getLogger(__name__)

try:
    from . import _nativefs
    _IMPORT_ERROR = ""
except ImportError as _err:  # not built, or a library it links (libfuse 3, libdeflate) is not here
    _nativefs = None
    _IMPORT_ERROR = str(_err)

#: The C side reads rows of the tree's files array as this exact packed layout.
_C_LAYOUT = [("header_offset", "<u8"), ("compressed_size", "<u8"), ("size", "<u8"), ("crc32", "<u4"),
             ("mtime", "<i8"), ("method", "<u2"), ("flags", "<u2"), ("mode", "<u2"),
             ("name_length", "<u2"), ("archive", "<u2"), ("extra_room", "<u2")]


def available() -> bool:
    return (_nativefs is not None and FILE_DTYPE == np.dtype(_C_LAYOUT) and FILE_DTYPE.itemsize == _nativefs.MEMBER_SIZE
            and _nativefs.NAME_MAX == NAME_MAX)


def unavailable_reason() -> str:
    """What keeps the native engine from serving here, as words after "the native engine",
    with the command that fixes it ('' when nothing does).

    Why: the mfusepy engine reads several times slower, and an install can lose the
    engine in three ways that have different fixes."""
    if _nativefs is None and importlib.util.find_spec(f"{__package__}._nativefs") is None:
        return ("was not built when bioscanfs was installed (no gcc, python3-dev, libfuse3-dev or "
                "libdeflate-dev then): install the binary wheel (scripts/wheel), or apt install gcc python3-dev "
                "libfuse3-dev libdeflate-dev and install bioscanfs again")
    if _nativefs is None:
        return f"cannot be loaded ({_IMPORT_ERROR}): apt install libfuse3-3 libdeflate0"
    if not available():
        return "was built from another version of bioscanfs (its member layout differs): install bioscanfs again"
    return ""


def tables(arrays: Dict[str, np.ndarray], blocks: Optional[Blocks], unit_rows: int, fds: np.ndarray,
           direct: np.ndarray, archive_sizes: Sequence[int]) -> Dict[str, np.ndarray]:
    """What the C engine serves from (a tree's arrays, the CRCs of its LAZY_COLUMNS, which
    it checks unit by unit on first use, one descriptor pair and size per archive), by the
    names _nativefs.c's TABLE_NAMES gives them. Tables without ``blocks`` (never saved)
    get their CRCs computed here."""
    served = {name: arrays[name] for name in ("files", "names", "name_ends", "dir_lo", "dir_hi", "dir_mtime",
                                              "dir_parent", "dir_names", "dir_ends")}
    no_links = np.zeros(len(arrays["dir_lo"]), dtype=np.uint64)   # a tree without views
    served.update((name, arrays.get(name, default)) for name, default in
                  (("links", np.zeros(0, np.uint32)), ("link_lo", no_links), ("link_hi", no_links)))
    if blocks is None:
        blocks = Blocks.computed({name: served[name] for name in LAZY_COLUMNS})
    # a tree saved without views has no links, so no CRCs of them (none are needed)
    crcs = {f"{name}_crc": blocks.crcs.get(name, np.zeros(0, np.uint32)) for name in LAZY_COLUMNS}
    return dict(served, **crcs, lazy=np.array([blocks.block, unit_rows], dtype=np.uint64), fds=fds,
                direct=direct, archive_sizes=np.asarray(archive_sizes, dtype=np.uint64))


def check_tables(arrays: Dict[str, np.ndarray], fds: np.ndarray, direct: np.ndarray,
                 archive_sizes: Sequence[int], unit_rows: int = UNIT_ROWS) -> None:
    """The C engine's own checks of every table and unit (the CRCs of arrays loaded with
    ``store.load`` included), without mounting: ValueError names what is wrong."""
    assert _nativefs is not None
    _nativefs.check(tables(arrays, arrays.get("__blocks__"), unit_rows, fds, direct, archive_sizes))


#: Archives that together fit in this share of the machine's memory are read through the
#: page cache, READ_AROUND bytes at a time; larger ones exactly, with O_DIRECT (why: read_span
#: in _nativefs.c).
CACHED_SHARE = 0.25
#: The aligned span brought into the page cache around each read of a cached archive: about
#: 25 images of 10 KB, so that a pass over a small archive reads it from disk about once.
READ_AROUND = 256 << 10


def memory_bytes() -> int:
    """This machine's memory, or less where this process's cgroup is limited (v2
    ``memory.max``, v1 ``memory.limit_in_bytes``): a job's page cache is charged to its
    cgroup (Slurm, containers), so that is the memory its archives must fit in. Limits of
    parent cgroups are not looked at."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return memory
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            limit = f"/sys/fs/cgroup{path}/memory.max"
        elif "memory" in controllers.split(","):
            limit = f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"
        else:
            continue
        try:
            with open(limit) as f:
                memory = min(memory, int(f.read()))
        except (OSError, ValueError):   # no such file, or "max"
            pass
    return memory


def read_through_cache(archive_sizes: Sequence[int], choice: Optional[bool] = None) -> bool:
    """Whether the C engine reads the archives through the page cache: as ``choice`` says,
    or (None) when they fit in CACHED_SHARE of memory_bytes(). Then a pass over an
    archive reads each of its blocks from disk once, in READ_AROUND spans, and its pages,
    read once and no more, are the first the kernel reclaims. Larger archives are read
    exactly, so that a random epoch reads no byte it does not serve and no file is held
    in memory twice."""
    if choice is not None:
        return choice
    return sum(archive_sizes) <= CACHED_SHARE * memory_bytes()


def _direct_fd(fd: int) -> int:
    """The archive behind ``fd`` opened again with O_DIRECT, or -1 where that is refused
    (why: read_span in _nativefs.c). Through /proc/self/fd, so that it is the same file even
    if its path has been replaced since."""
    if fd < 0 or not hasattr(os, "O_DIRECT"):
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def serve(collection: Collection, mountpoint: str, options: Dict[str, Union[bool, str, int]],
          on_ready: Optional[Callable[[], None]] = None, threads: bool = True,
          cache_archives: Optional[bool] = None) -> None:
    """Mount and serve until unmounted or signalled (blocks; stays in the foreground);
    ``cache_archives``: see read_through_cache."""
    assert _nativefs is not None
    c, tree = collection, collection.tree

    def read(row: int, size: int, offset: int) -> Union[bytes, int]:
        label = tree.path_of(row).decode("utf-8", "surrogateescape")
        log.debug("%s: %d bytes at %d read through Python", label, size, offset)
        return read_or_errno(c, row, size, offset, label)

    def attr(row: int) -> Tuple[int, int]:
        st = c.stat_node(row)
        return st.mode, st.size

    def readlink(row: int) -> Union[bytes, int]:
        return c.link_target(row) or errno.EINVAL

    option_string = options_text(options)
    fds = np.array([-1 if getattr(src, "fd", None) is None else src.fd for src in c.served], dtype=np.int64)
    sizes = [src.size for src in c.served]
    cached = read_through_cache(sizes, cache_archives)
    direct = np.array([-1 if cached else _direct_fd(int(fd)) for fd in fds], dtype=np.int64)
    try:
        _nativefs.serve(
            mountpoint=mountpoint, options=option_string,
            tables=tables(tree.arrays, tree.blocks, tree.unit_rows, fds, direct, sizes),
            whole_max=WHOLE_READ_MAX, total_bytes=min(tree.total_bytes, (1 << 64) - 1),
            timeout=float(CACHE_SECONDS), block_size=BLOCK_SIZE, file_mode=FILE_MODE, dir_mode=DIR_MODE,
            read_around=READ_AROUND if cached else 0, init_readahead=INIT_READAHEAD_KB << 10, read=read,
            attr=attr, readlink=readlink, ready=on_ready, damaged=tree.report_damage,
            workers=max_workers() if threads else 0)
    except OSError as err:
        raise MountError(mountpoint, f"{err} with -o {option_string}") from None
    finally:
        for fd in direct[direct >= 0]:
            os.close(int(fd))
