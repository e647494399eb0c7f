"""The index folder: named numpy arrays saved to one file each and mapped back without copying.

Owns the on-disk container of the index, the files' names, which folders and files are
trusted, and when old files go; knows nothing of what the arrays mean.

- **Whole or absent.** A file is only used when its magic, header (under a CRC-32 of
  its own) and key match, every array lies inside it and the CRC-32 of each CRC_BLOCK
  bytes of each array is the one saved; anything else (short, flipped bits, foreign,
  older version, another archive) reads as absent, so the caller rebuilds. Columns the caller names ``lazy`` are checked
  block by block on first use instead (``Blocks``): a mount then reads only the index
  pages its requests need, and one that finds a bad block removes the file (``discard``).
  Files are written to a temporary name and renamed, so mounts that build the same
  index at once never see half a file. A save that fails (full disk, read-only
  folder, a header over what ``load`` accepts) removes its temporary file and raises OSError.
- **Trusted or refused.** The CRC-32 guards against accidents, not people: a folder or a
  file that another user could have written raises UntrustedIndexError. Trusted means
  owned by this user or by root (root trusts only root), and not writable by group or
  others, except a folder with the sticky bit (others may add files there, not replace ours).
- **Named by slot and key**, ``SLOT-KEY.suffix``: the slot is what a file is for (an
  archive's paths), the key the state it was built from (sizes, mtimes, index version).
- **Columns apart.** The columns a caller names ``apart`` live in files of their own
  (``SLOT-TOKEN.NAME.col``), which the tree file's header names. A later tree may extend
  them (``Extension``): it appends to them and names the same files, so a re-index writes
  only what it adds, and the bytes an earlier tree maps never change under it.
- **Tidied.** ``tidy`` removes this user's files that no mount will use again:
  temporaries older than GRACE (left by a killed build), files of a slot in use whose key
  is superseded once they are older than GRACE, and any index file unused for UNUSED.
  Files in use are touched once a day, so their mtime says when they were last used. A
  column file goes once no tree file names it, after GRACE. The grace spares a mount
  that is writing or about to map a file; one that has mapped it keeps its mapping after
  the unlink (Linux).

Not supported: ACLs and extended permissions are not inspected; the checks read owner
and mode bits only.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import mmap
import os
import secrets
import stat
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np
from zlib_ng.zlib_ng import crc32

from .errors import UntrustedIndexError

MAGIC = b"BSFSIDX\x06"
_ALIGN = 64
#: The columns start here, after MAGIC, the header's offset, its length and its CRC-32; the header follows them.
_DATA_START = 64
_MAX_HEADER = 1 << 24
_CHECK_BLOCK = 8 << 20
#: Bytes of a column under one CRC-32 (the last block of a column may be shorter): the
#: least a lazily checked column reads to check a byte of it (1 MiB reads in about a
#: millisecond from the page cache, a few from a disk), and the header holds one CRC per
#: MiB (about 1,400 at 20.6 M members).
CRC_BLOCK = 1 << 20
#: Chunks a ColumnWriter has handed to its writing thread and not yet seen written: the
#: caller prepares the next while the kernel copies these (each is tens of MB at most).
_WRITES_BEHIND = 2
#: CRC blocks a header may declare: powers of two from 64 bytes (tests) to 1 GiB.
_CRC_BLOCK_RANGE = (6, 30)
SUFFIXES = (".tree",)
#: Suffix of a column saved in a file of its own (``ColumnWriter``'s ``apart``).
COLUMN_SUFFIX = ".col"
#: Suffixes of files that older versions wrote and this one never reads: removed after GRACE.
RETIRED_SUFFIXES = (".members",)
_TEMP_PREFIX = ".tmp-"
GRACE = 3600.0            #: seconds before a temporary or superseded file may be removed
UNUSED = 30 * 86400.0     #: seconds without use before any index file may be removed
_TOUCH_AFTER = 86400.0    #: a file in use is touched when its mtime is older than this
#: Index files are readable by whoever may enter the folder: nobody else for the default
#: folder (created 0700), every user for a shared one (0755).
_FILE_MODE = 0o644


def _dtype_to_json(dtype: np.dtype) -> Any:
    return dtype.descr if dtype.names else dtype.str


def _dtype_from_json(spec: Any) -> np.dtype:
    if isinstance(spec, str):
        return np.dtype(spec)
    return np.dtype([tuple(field) for field in spec])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def file_path(folder: str, slot: Any, key: Any, suffix: str) -> str:
    """Where the file for ``slot`` (what it is for) built under ``key`` lives."""
    return os.path.join(folder, f"{_digest(slot)}-{_digest(key)}{suffix}")


def _slot_of(name: str) -> Tuple[str, str]:
    """(slot digest, suffix) of a file name made by ``file_path``."""
    stem, suffix = os.path.splitext(name)
    return stem.partition("-")[0], suffix


# -- trust -------------------------------------------------------------------------------------
def _untrusted_because(st: os.stat_result) -> Optional[str]:
    """Why another user could have written this folder or file, or None."""
    owners = {os.geteuid(), 0}
    if st.st_uid not in owners:
        return f"owned by uid {st.st_uid}"
    others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if others and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"mode {stat.S_IMODE(st.st_mode):04o}: writable by {'others' if others & stat.S_IWOTH else 'its group'}"
    return None


def _refuse_untrusted(path: str, st: os.stat_result) -> None:
    """Raise UntrustedIndexError when another user could have written the index file ``st``."""
    why = _untrusted_because(st)
    if why:
        raise UntrustedIndexError(path, f"index file could be written by another user ({why}); "
                                        "remove it, or use another --index-dir")


def prepare_folder(folder: str) -> None:
    """Create the index folder if missing (0700, whatever the umask) and refuse one that
    another user could write. A folder that cannot be created is left to ``save``, whose
    OSError makes the caller keep the index in memory."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
    except OSError:
        return
    why = _untrusted_because(st)
    if why:
        raise UntrustedIndexError(folder, f"index folder could be written by another user ({why}); "
                                          "use a folder only you can write (--index-dir)")


# -- saving and loading --------------------------------------------------------------------------
class ColumnWriter:
    """Named arrays of known type and length, filled chunk by chunk in any order of names.

    Why chunks: the merged tree of 20 million members is larger than a mount should
    hold twice, so it is written out as it is produced. With a ``path``, the columns
    go straight into a temporary file beside it, which ``commit`` names ``path`` (whole or
    not at all); without one, into arrays in memory. A CRC-32 is kept for each ``block``
    bytes of each column, so ``load`` and ``Blocks`` can check any part of a column alone.
    The columns named in ``apart`` go to files of their own (see the module's docstring),
    or are appended to those of an earlier tree (``extension``: they are then filled from
    its length on, and ``abort`` cuts them back).

    Chunks are written by a thread of the writer's own, up to _WRITES_BEHIND behind
    ``write`` (which folds the CRCs at once): the caller gathers the next chunk while the
    kernel copies the last (a 1.4 GB index takes about a second to write). So a chunk
    must not change once handed over; ``then`` runs a function once it is written.
    """

    def __init__(self, path: Optional[str], layout: Dict[str, Tuple[np.dtype, int]], block: int = CRC_BLOCK,
                 apart: Iterable[str] = (), extension: Optional["Extension"] = None) -> None:
        self.path = path
        self.layout = {name: (np.dtype(dtype), int(count)) for name, (dtype, count) in layout.items()}
        self.block = extension.block if extension else block
        self._crcs: Dict[str, List[int]] = {name: [] for name in layout}
        self._crc = {name: 0 for name in layout}       # of the block being filled
        self._in_block = {name: 0 for name in layout}  # its bytes so far
        self._filled = {name: 0 for name in layout}
        self._offsets: Dict[str, int] = {}
        self._fd = -1
        self._tmp: Optional[str] = None
        self._fds: Dict[str, int] = {}                 # the file each column is written to
        self._made: List[Tuple[str, str]] = []         # (temporary, final name) of each new column file
        self._files: Dict[str, str] = {}               # the final file of each column apart
        self._extension = extension
        self._queued: Deque[Future] = deque()
        self._thread: Optional[ThreadPoolExecutor] = None
        self.arrays: Dict[str, np.ndarray] = {}
        if path is None:
            self.arrays = {name: np.empty(count, dtype) for name, (dtype, count) in self.layout.items()}
            return
        apart = set(apart) & set(self.layout)
        offset = _DATA_START
        for name, (dtype, count) in self.layout.items():
            if name not in apart:
                self._offsets[name] = offset = -(-offset // _ALIGN) * _ALIGN
                offset += dtype.itemsize * count
        self._end = offset
        try:
            self._fd, self._tmp = _temporary_beside(path)
            for name in sorted(apart):
                self._offsets[name] = 0
                if extension is not None and name in extension.columns:
                    self._fds[name] = self._continue(name, extension.columns[name])
                    self._files[name] = extension.columns[name].path
                else:
                    self._fds[name], tmp = _temporary_beside(path)
                    self._files[name] = column_path(path, name)
                    self._made.append((tmp, self._files[name]))
        except BaseException:
            self.abort()
            raise

    def _continue(self, name: str, column: "_Continued") -> int:
        """Fill column ``name`` on from the end of an earlier tree's file of it."""
        dtype, count = self.layout[name]
        if column.size % dtype.itemsize or column.size // dtype.itemsize > count:
            raise ValueError(f"{name}: {column.size:,} bytes there already, {count:,} elements declared")
        self._filled[name] = column.size // dtype.itemsize
        self._crcs[name] = list(column.crcs)
        self._crc[name], self._in_block[name] = column.crc, column.in_block
        return column.fd

    def write(self, name: str, chunk: np.ndarray) -> None:
        """Append ``chunk`` to column ``name``."""
        dtype, count = self.layout[name]
        chunk = np.ascontiguousarray(chunk, dtype=dtype).reshape(-1)
        at = self._filled[name]
        if at + len(chunk) > count:
            raise ValueError(f"{name}: {at + len(chunk):,} elements written, {count:,} declared")
        self._filled[name] = at + len(chunk)
        data = memoryview(chunk.view(np.uint8)).cast("B")
        self._add_crc(name, data)
        if self.path is None:
            self.arrays[name][at:at + len(chunk)] = chunk
            return
        fd = self._fds.get(name, self._fd)
        self._queue(functools.partial(_pwrite_all, fd, data, self._offsets[name] + at * dtype.itemsize))

    def then(self, job: Callable[[], Any]) -> None:
        """Run ``job`` once every chunk handed to ``write`` so far is written (at once in memory)."""
        if self.path is None:
            job()
        else:
            self._queue(job)

    def _queue(self, job: Callable[[], Any]) -> None:
        """Give ``job`` to the writing thread, after waiting for the oldest (raising its
        error) while _WRITES_BEHIND are queued."""
        while len(self._queued) >= _WRITES_BEHIND:
            self._queued.popleft().result()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer")
        self._queued.append(self._thread.submit(job))

    def _drain(self, raising: bool = True) -> None:
        """Wait until every job queued is done, then raise the first error if ``raising``."""
        error = None
        while self._queued:
            error = error or self._queued.popleft().exception()
        if self._thread is not None:
            self._thread.shutdown()
            self._thread = None
        if error is not None and raising:
            raise error

    def _add_crc(self, name: str, data: memoryview) -> None:
        """Fold ``data`` into the CRCs of column ``name``, closing each full block."""
        while len(data):
            take = min(len(data), self.block - self._in_block[name])
            self._crc[name] = crc32(data[:take], self._crc[name])
            self._in_block[name] += take
            data = data[take:]
            if self._in_block[name] == self.block:
                self._crcs[name].append(self._crc[name])
                self._crc[name], self._in_block[name] = 0, 0

    def commit(self, key: Any, extra: Any = None) -> Dict[str, Any]:
        """Finish: every column must be full. Returns the arrays, ``"__extra__"`` and
        ``"__blocks__"`` (their CRCs) when in memory; with a path, names the column files,
        writes the header after the columns and renames the file into place ({} is
        returned: ``load`` maps it). Raises OSError as ``save`` does."""
        short = [name for name, (_, count) in self.layout.items() if self._filled[name] != count]
        if short:
            self.abort()
            raise ValueError(f"columns not filled: {', '.join(short)}")
        for name, part in self._in_block.items():
            if part:
                self._crcs[name].append(self._crc[name])
                self._crc[name], self._in_block[name] = 0, 0
        if self.path is None:
            crcs = {name: np.array(values, np.uint32) for name, values in self._crcs.items()}
            return dict(self.arrays, __extra__=extra, __blocks__=Blocks(self.arrays, crcs, self.block))
        try:
            self._drain()
            for at, (tmp, final) in enumerate(self._made):
                os.replace(tmp, final)
                self._made[at] = (final, final)   # removed by abort from now on
            layout = {name: [_dtype_to_json(dtype), [count], self._offsets[name]] for name, (dtype, count)
                      in self.layout.items()}
            for name, file in self._files.items():
                layout[name].append(os.path.basename(file))
            _write_header(self._fd, self._end, {"key": key, "arrays": layout, "extra": extra,
                                                "crc_block": self.block, "crc32": self._crcs}, str(self.path))
            os.close(self._fd)
            self._fd = -1
            os.replace(self._tmp, str(self.path))
        except BaseException:
            self.abort()
            raise
        self._close_columns()
        return {}

    def abort(self) -> None:
        """Drop what was written (no temporary or new column file is left behind, and a
        column file that was extended is cut back to what it held)."""
        self._drain(False)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for path in [self._tmp] + [made for made, _ in self._made]:
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._made = []
        if self._extension is not None:
            self._extension.cut_back()
        self._close_columns()

    def _close_columns(self) -> None:
        for name, fd in self._fds.items():
            if self._extension is None or name not in self._extension.columns:
                os.close(fd)
        self._fds = {}
        if self._extension is not None:
            self._extension.close()


def column_path(path: str, name: str) -> str:
    """A new file for column ``name`` of the tree file ``path``: of its slot, never used before."""
    folder, base = os.path.split(path)
    return os.path.join(folder, f"{_slot_of(base)[0]}-{secrets.token_hex(8)}.{name}{COLUMN_SUFFIX}")


class _Continued(NamedTuple):
    """An earlier tree's column file, locked, that a ColumnWriter appends to."""

    path: str
    fd: int
    size: int           #: bytes the earlier tree has in it (the file holds nothing after them)
    crcs: List[int]     #: their full blocks' CRCs
    crc: int            #: the CRC of the last, partial block so far
    in_block: int       #: its bytes


class Extension:
    """Column files of a saved tree that a new tree may extend (``extension``): each is
    locked (flock) until ``close``, so that no other build appends to it meanwhile."""

    def __init__(self, columns: Dict[str, _Continued], block: int) -> None:
        self.columns = columns
        self.block = block

    def cut_back(self) -> None:
        """Cut each file back to what the earlier tree holds (a build that failed)."""
        for column in self.columns.values():
            with contextlib.suppress(OSError):
                os.ftruncate(column.fd, column.size)

    def close(self) -> None:
        for column in self.columns.values():
            with contextlib.suppress(OSError):
                os.close(column.fd)
        self.columns = {}


def extension(blocks: "Blocks", names: Sequence[str]) -> Optional[Extension]:
    """The column files ``names`` of the tree that ``blocks`` were loaded from, opened to be
    extended; None when one cannot be: it is not a column file of its own, another build
    holds it, something was appended to it since (an extension of another state), or the
    bytes of its last, partial CRC block do not match their CRC."""
    columns: Dict[str, _Continued] = {}
    try:
        for name in names:
            columns[name] = _continued(blocks, name)
    except (OSError, ValueError):
        Extension(columns, blocks.block).close()
        return None
    return Extension(columns, blocks.block)


def _continued(blocks: "Blocks", name: str) -> _Continued:
    """One column file of ``extension``, locked; ValueError or OSError when it cannot be extended."""
    path, offset, identity = blocks.sources[name]
    if not path.endswith(COLUMN_SUFFIX) or offset:
        raise ValueError(f"{name}: not in a column file of its own")
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        _refuse_untrusted(path, st)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        nbytes, block = len(blocks.bytes_of(name)), blocks.block
        crcs = [int(c) for c in blocks.crcs[name]]
        full, partial = divmod(nbytes, block)
        if (st.st_dev, st.st_ino) != identity or st.st_size != nbytes or len(crcs) != full + bool(partial):
            raise ValueError(f"{name}: its file changed since it was loaded")
        crc = crc32(os.pread(fd, partial, full * block)) if partial else 0
        if partial and crc != crcs[-1]:
            raise ValueError(f"{name}: its last block does not match its CRC-32")
        return _Continued(path, fd, nbytes, crcs[:full], crc, partial)
    except BaseException:
        os.close(fd)
        raise


def _temporary_beside(path: str) -> Tuple[int, str]:
    """(descriptor, name) of a new temporary file in ``path``'s folder, readable as index files are."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=_TEMP_PREFIX)
    try:
        os.fchmod(fd, _FILE_MODE)
    except OSError:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _write_header(fd: int, end: int, header: Dict[str, Any], path: str) -> None:
    """Write ``header`` after the columns (which end at ``end``) of the file being written,
    and where it is in its first bytes. Raises EFBIG for a header over what ``load`` reads
    back (``path`` names the file in that error)."""
    data = json.dumps(header).encode()
    if len(data) > _MAX_HEADER:
        raise OSError(errno.EFBIG, f"its header of {len(data):,} bytes is over the {_MAX_HEADER:,} "
                                   "that a mount reads back", path)
    os.pwrite(fd, MAGIC + end.to_bytes(8, "little") + len(data).to_bytes(8, "little")
              + crc32(data).to_bytes(4, "little"), 0)
    _pwrite_all(fd, data, end)
    os.ftruncate(fd, end + len(data))


def rekey(old: str, path: str, key: Any, extra: Any) -> None:
    """Save the file ``old`` again at ``path`` under ``key`` and ``extra``: its columns and
    their CRCs as they are (those in the file copied in the kernel, its column files named
    again), so ``load`` checks them there as it would have here. For a file whose columns
    are still right for a new key (the caller says when). Whole or not at all; raises
    OSError as ``save`` does (EINVAL when ``old`` is not an index file),
    UntrustedIndexError as ``load`` does."""
    src = os.open(old, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(src)
        _refuse_untrusted(old, st)
        header, end = _header_of(src, st)
        fd, tmp = _temporary_beside(path)
        try:
            try:
                _copy_range(src, fd, end)
                _write_header(fd, end, dict(header, key=key, extra=extra), path)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        os.close(src)


def _header_of(fd: int, st: os.stat_result) -> Tuple[Dict[str, Any], int]:
    """(header, where the columns end) of an open index file; OSError EINVAL when it has none."""
    try:
        if stat.S_ISREG(st.st_mode) and st.st_size >= _DATA_START:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
                header, end = _header(data, st.st_size)
            if header is not None:
                return header, end
    except (ValueError, UnicodeDecodeError):
        pass
    raise OSError(errno.EINVAL, "not an index file")


def _copy_range(src: int, dst: int, length: int) -> None:
    """Copy the first ``length`` bytes of ``src`` to ``dst``, in the kernel where it can."""
    done = 0
    try:
        while done < length:
            copied = os.copy_file_range(src, dst, length - done, done, done)
            if copied == 0:
                raise OSError(errno.EIO, "index file shrank while it was copied")
            done += copied
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        for at in range(done, length, _CHECK_BLOCK):
            _pwrite_all(dst, os.pread(src, min(_CHECK_BLOCK, length - at), at), at)


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while len(view):
        done = os.pwrite(fd, view, position)
        view, position = view[done:], position + done


def save(path: str, key: Any, arrays: Dict[str, np.ndarray], extra: Any = None, block: int = CRC_BLOCK) -> None:
    """Write ``arrays`` under ``key``, whole or not at all, with a CRC-32 per ``block`` bytes.

    Raises OSError when the file cannot be written, EFBIG when its header would be over
    what ``load`` accepts (a file that no mount could read back is never written); no
    temporary file is left behind either way.
    """
    writer = ColumnWriter(path, {name: (array.dtype, array.size) for name, array in arrays.items()}, block)
    try:
        for name, array in arrays.items():
            writer.write(name, array)
    except BaseException:
        writer.abort()
        raise
    writer.commit(key, extra)


def _file_crcs(fd: int, start: int, length: int, block: int) -> List[int]:
    """CRC-32 of each ``block`` bytes of a file range, read with pread: the pages go through
    the page cache, not through this process's mapping, so checking does not count in the
    daemon's RSS."""
    out = []
    for at in range(start, start + length, block):
        data = os.pread(fd, min(block, start + length - at), at)
        out.append(crc32(data))
    return out


def _crc_list(values: Any, nbytes: int, block: int) -> Optional[np.ndarray]:
    """A header's CRC list for a column of ``nbytes`` bytes, or None unless it holds one
    32-bit value per block."""
    if not isinstance(values, list) or len(values) != -(-nbytes // block) or \
            not all(type(v) is int and 0 <= v < 1 << 32 for v in values):
        return None
    return np.array(values, dtype=np.uint32)


def _header(data: Any, size: int) -> Tuple[Optional[Dict[str, Any]], int]:
    """(the header, where it starts) of a file's bytes, or (None, 0) when its magic or
    bounds are wrong. The header follows the columns: it is written last."""
    if size < _DATA_START or data[:len(MAGIC)] != MAGIC:
        return None, 0
    header_at = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    header_len = int.from_bytes(data[len(MAGIC) + 8:len(MAGIC) + 16], "little")
    if header_len > _MAX_HEADER or header_at + header_len != size or header_at < _DATA_START or \
            crc32(data[header_at:size]) != int.from_bytes(data[len(MAGIC) + 16:len(MAGIC) + 20], "little"):
        return None, 0   # the CRC: a flipped byte in the header (its extra included) is found too
    header = json.loads(data[header_at:size])
    return (header, header_at) if isinstance(header, dict) else (None, 0)


def read_header(path: str) -> Optional[Dict[str, Any]]:
    """The JSON header of an index file (its key, each array's [dtype, shape, offset in the
    file], extra, CRCs), or None; for inspection: ``load`` is what checks a file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # NONBLOCK: a FIFO cannot hang us
    except OSError:
        return None
    try:
        return _header_of(fd, os.fstat(fd))[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def load(path: str, key: Any, lazy: Iterable[str] = ()) -> Optional[Dict[str, Any]]:
    """Map a saved file (and the column files it names); None unless it is whole and was
    saved under exactly ``key``.

    Returns the arrays (read-only views of the mapping), ``"__extra__"`` and ``"__blocks__"``
    (a ``Blocks``). Every column is checked against its CRCs here except those named in
    ``lazy``, which the caller checks through ``Blocks.verify`` before it reads them.
    Raises UntrustedIndexError for a file that another user could have written (checked
    on the open descriptor, so the file checked is the file read).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # NONBLOCK: a FIFO cannot hang us
    except OSError:
        return None
    files = _Mapped(os.path.dirname(path))
    try:
        st = os.fstat(fd)
        _refuse_untrusted(path, st)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode) or size < _DATA_START:
            return None
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        header, header_at = _header(mapped, size)
        if header is None or header.get("key") != json.loads(json.dumps(key)):
            return None
        block = header["crc_block"]
        if type(block) is not int or block not in _CRC_BLOCKS:
            return None
        out: Dict[str, Any] = {"__extra__": header.get("extra")}
        crcs: Dict[str, np.ndarray] = {}
        sources: Dict[str, Tuple[str, int, Tuple[int, int]]] = {}
        lazy = set(lazy)
        for name, (spec, shape, offset, *apart) in header["arrays"].items():
            dtype = _dtype_from_json(spec)
            count = int(np.prod(shape)) if shape else 1
            nbytes = count * dtype.itemsize
            where = files.open(apart[0]) if apart else _Opened(path, fd, mapped, (st.st_dev, st.st_ino),
                                                                _DATA_START, header_at)
            if len(apart) > 1 or offset < where.start or count < 0 or offset + nbytes > where.end:
                return None
            crcs[name] = sums = _crc_list(header["crc32"][name], nbytes, block)
            if sums is None or (name not in lazy and _file_crcs(where.fd, offset, nbytes, block) != sums.tolist()):
                return None
            out[name] = np.frombuffer(where.data, dtype=dtype, count=count, offset=offset).reshape(shape)
            sources[name] = (where.path, offset, where.identity)
        arrays = {name: out[name] for name in crcs}
        out["__blocks__"] = Blocks(arrays, crcs, block, checked=set(crcs) - lazy, path=path,
                                   sources=dict(sources, __tree__=(path, 0, (st.st_dev, st.st_ino))))
        return out
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
        files.close()


class _Opened(NamedTuple):
    """A file that ``load`` maps arrays from, and the bytes of it they may lie in."""

    path: str
    fd: int
    data: Any                   #: its mapping
    identity: Tuple[int, int]   #: (device, inode)
    start: int
    end: int


class _Mapped:
    """The column files that one tree file names, each opened, checked and mapped once."""

    def __init__(self, folder: str) -> None:
        self._folder = folder
        self._open: Dict[str, _Opened] = {}

    def open(self, name: Any) -> _Opened:
        """The column file ``name`` (a name in the tree's folder: nothing else is opened);
        raises ValueError or OSError when it is not a regular file, UntrustedIndexError
        as ``load`` does."""
        if name not in self._open:
            if not (isinstance(name, str) and name.endswith(COLUMN_SUFFIX) and os.path.basename(name) == name
                    and not name.startswith(".")):
                raise ValueError(f"{name!r}: not a column file's name")
            path = os.path.join(self._folder, name)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
            self._open[name] = _Opened(path, fd, b"", (0, 0), 0, 0)   # closed by ``close`` from here on
            st = os.fstat(fd)
            _refuse_untrusted(path, st)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{name}: not a regular file")
            data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else b""
            self._open[name] = _Opened(path, fd, data, (st.st_dev, st.st_ino), 0, st.st_size)
        return self._open[name]

    def close(self) -> None:
        for opened in self._open.values():
            os.close(opened.fd)


_UNKNOWN, _GOOD, _BAD = 0, 1, 2
_CRC_BLOCKS = frozenset(1 << bits for bits in range(_CRC_BLOCK_RANGE[0], _CRC_BLOCK_RANGE[1] + 1))


class Blocks:
    """The CRC-32 of each ``block`` bytes of some arrays, and which blocks have been found
    good or bad so far: a block is checked the first time a caller asks for a byte of it.

    Why: checking a 1.4 GB index before serving reads all of it (seconds with a cold page
    cache, and every page in the daemon's RSS); a request needs a few MiB of it. The
    native engine keeps its own states (``_nativefs.c``) and is handed ``crcs``.
    Thread-safe without a lock: a block checked twice at once gets the same answer twice.
    """

    def __init__(self, arrays: Dict[str, np.ndarray], crcs: Dict[str, np.ndarray], block: int,
                 checked: Iterable[str] = (), path: Optional[str] = None,
                 sources: Optional[Dict[str, Tuple[str, int, Tuple[int, int]]]] = None) -> None:
        self.block = block
        self.crcs = crcs
        self.path = path            #: the tree file the arrays are mapped from (None: in memory)
        #: when mapped: each array's (file, offset in it, the file's (device, inode)); the
        #: tree file itself under "__tree__"
        self.sources = sources or {}
        self._bytes = {name: array.reshape(-1).view(np.uint8) for name, array in arrays.items()}
        self._states = {name: np.full(len(sums), _GOOD if name in set(checked) else _UNKNOWN, np.uint8)
                        for name, sums in crcs.items()}

    @classmethod
    def computed(cls, arrays: Dict[str, np.ndarray], block: int = CRC_BLOCK) -> "Blocks":
        """The blocks of arrays held in memory, their CRCs computed now (for checks of
        tables that were never saved: tests, and the C engine's ``check``)."""
        crcs = {}
        for name, array in arrays.items():
            data = array.reshape(-1).view(np.uint8)
            crcs[name] = np.array([crc32(data[at:at + block]) for at in range(0, len(data), block)], np.uint32)
        return cls(arrays, crcs, block)

    def verify(self, name: str, lo: int, hi: int) -> bool:
        """Whether bytes lo..hi of array ``name`` match their CRCs (checked on first use)."""
        states, data, block = self._states[name], self._bytes[name], self.block
        if hi <= lo:
            return True
        for b in range(lo // block, (hi - 1) // block + 1):
            if states[b] == _UNKNOWN:
                states[b] = _GOOD if crc32(data[b * block:(b + 1) * block]) == int(self.crcs[name][b]) else _BAD
            if states[b] == _BAD:
                return False
        return True

    def bytes_of(self, name: str) -> np.ndarray:
        """Array ``name`` as bytes."""
        return self._bytes[name]

    def discard(self) -> None:
        """Remove the files these blocks were mapped from (the tree file and its column
        files), each if it is still that file (a mount may have rebuilt it since): the next
        mount builds the index again. This mount keeps its mapping (Linux)."""
        for path, _, identity in {source[0]: source for source in self.sources.values()}.values():
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == identity:
                    os.unlink(path)
            except OSError:
                pass


# -- tidying -------------------------------------------------------------------------------------
def tidy(folder: str, in_use: Sequence[str], now: Optional[float] = None) -> None:
    """Remove this user's files in ``folder`` that no mount will use again, and touch the
    files ``in_use`` (this mount's, whether they exist yet or not) once a day.

    Best effort: a file another process removed first, or one this user may not change
    (a shared folder of root's), is left as it is.
    """
    now = time.time() if now is None else now
    keep = {os.path.basename(p) for p in in_use}
    slots = {_slot_of(name) for name in keep}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    columns = [entry for entry in entries if entry.name.endswith(COLUMN_SUFFIX)]
    for entry in entries:
        if entry.name.endswith(COLUMN_SUFFIX):
            continue
        st = _ours(entry)
        if st is None:
            continue
        age = now - st.st_mtime
        with contextlib.suppress(OSError):
            if entry.name in keep:
                if age > _TOUCH_AFTER:
                    os.utime(entry.path)
            elif _expired(entry.name, age, slots):
                os.unlink(entry.path)
    named = _named_columns(folder) if columns else set()   # once the trees that go are gone
    for entry in columns:
        st = _ours(entry)
        if st is not None and entry.name not in named and now - st.st_mtime > GRACE:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _ours(entry: os.DirEntry) -> Optional[os.stat_result]:
    """The stat of a regular file of this user's, or None."""
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() else None


def _named_columns(folder: str) -> Set[str]:
    """The column files that the tree files in ``folder`` name (whoever wrote them)."""
    named: Set[str] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.endswith(SUFFIXES):
                named |= _columns_of(entry.path)
    return named


def _columns_of(path: str) -> Set[str]:
    """The column files that the tree file ``path`` names."""
    arrays = (read_header(path) or {}).get("arrays")
    if not isinstance(arrays, dict):
        return set()
    return {spec[3] for spec in arrays.values()
            if isinstance(spec, list) and len(spec) == 4 and isinstance(spec[3], str)}


def remove(path: str) -> None:
    """Remove a tree file that no mount will use again, and at once the column files that
    no other tree file names (best effort): they need not wait for ``tidy``."""
    own = _columns_of(path)
    with contextlib.suppress(OSError):
        os.unlink(path)
    folder = os.path.dirname(path)
    for name in own - _named_columns(folder):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, name))


def _expired(name: str, age: float, slots: Set[Tuple[str, str]]) -> bool:
    """Whether a file that is not in use, ``age`` seconds after its last use, may go."""
    if name.startswith(_TEMP_PREFIX):
        return age > GRACE
    slot = _slot_of(name)
    if slot[1] in RETIRED_SUFFIXES:
        return age > GRACE
    if slot[1] not in SUFFIXES:
        return False
    return age > (GRACE if slot in slots else UNUSED)


def release_pages(arrays: Dict[str, Any]) -> None:
    """Drop this process's page mappings of loaded arrays (MADV_DONTNEED) after a pass
    over all of them, such as a check: the file's pages stay in the page cache and come
    back on the next access, but the daemon's RSS again counts only what it touches."""
    maps = {}
    for array in arrays.values():
        base = array
        while base is not None and not isinstance(base, mmap.mmap):   # array -> ... -> memoryview -> mmap
            inner = getattr(base, "base", None)
            base = inner if inner is not None else getattr(base, "obj", None)
        if base is not None:
            maps[id(base)] = base
    for mapped in maps.values():
        mapped.madvise(mmap.MADV_DONTNEED)
