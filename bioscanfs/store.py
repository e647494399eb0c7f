"""The index folder: named numpy arrays saved to one file each and mapped back without copying.

Owns the on-disk container of the index, the files' names, which folders and files are
trusted, and when old files go; knows nothing of what the arrays mean.

- **Whole or absent.** A file is only used when its magic, header and key match, every
  array lies inside it and the CRC-32 of all array bytes is the one saved; anything else
  (short, flipped bits, foreign, older version, another archive) reads as absent, so the
  caller rebuilds. Files are written to a temporary name and renamed, so mounts that build
  the same index at once never see half a file. A save that fails (full disk, read-only
  folder, a header over what ``load`` accepts) removes its temporary file and raises OSError.
- **Trusted or refused.** The CRC-32 guards against accidents, not people: a folder or a
  file that another user could have written raises UntrustedIndexError. Trusted means
  owned by this user or by root (root trusts only root), and not writable by group or
  others, except a folder with the sticky bit (others may add files there, not replace ours).
- **Named by slot and key**, ``SLOT-KEY.suffix``: the slot is what a file is for (an
  archive's paths), the key the state it was built from (sizes, mtimes, index version).
- **Tidied.** ``tidy`` removes this user's files that no mount will use again:
  temporaries older than GRACE (left by a killed build), files of a slot in use whose key
  is superseded once they are older than GRACE, and any index file unused for UNUSED.
  Files in use are touched once a day, so their mtime says when they were last used. The
  grace spares a mount that is writing or about to map a file; one that has mapped it
  keeps its mapping after the unlink (Linux).

Not supported: ACLs and extended permissions are not inspected; the checks read owner
and mode bits only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import stat
import tempfile
import time
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import numpy as np
from zlib_ng.zlib_ng import crc32

from .errors import UntrustedIndexError

MAGIC = b"BSFSIDX\x03"
_ALIGN = 64
_MAX_HEADER = 1 << 24
_CHECK_BLOCK = 8 << 20
SUFFIXES = (".members", ".tree")
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
def save(path: str, key: Any, arrays: Dict[str, np.ndarray], extra: Any = None) -> None:
    """Write ``arrays`` under ``key``, whole or not at all.

    Raises OSError when the file cannot be written, EFBIG when its header would be over
    what ``load`` accepts (a file that no mount could read back is never written); no
    temporary file is left behind either way.
    """
    layout: Dict[str, Any] = {}
    offset = 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        arrays[name] = array
        offset = -(-offset // _ALIGN) * _ALIGN
        layout[name] = [_dtype_to_json(array.dtype), list(array.shape), offset]
        offset += array.nbytes
    checksum = 0
    for array in arrays.values():
        checksum = crc32(memoryview(array).cast("B"), checksum)
    header = json.dumps({"key": key, "arrays": layout, "extra": extra, "crc32": checksum}).encode()
    if len(header) > _MAX_HEADER:
        raise OSError(errno.EFBIG, f"its header of {len(header):,} bytes is over the {_MAX_HEADER:,} "
                                   "that a mount reads back", path)
    base = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), _FILE_MODE)
            out.write(MAGIC + len(header).to_bytes(8, "little") + header)
            for name, array in arrays.items():
                out.seek(base + layout[name][2])
                out.write(memoryview(array).cast("B"))
            out.truncate(base + offset)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _file_crc(fd: int, start: int, length: int, checksum: int) -> int:
    """CRC-32 of a file range read with pread: the pages go through the page cache, not
    through this process's mapping, so checking does not count in the daemon's RSS."""
    end = start + length
    while start < end:
        block = os.pread(fd, min(_CHECK_BLOCK, end - start), start)
        if not block:
            break
        checksum = crc32(block, checksum)
        start += len(block)
    return checksum


def load(path: str, key: Any) -> Optional[Dict[str, Any]]:
    """Map a saved file; None unless it is whole and was saved under exactly ``key``.

    Returns the arrays (read-only views of the mapping) and ``"__extra__"``. Raises
    UntrustedIndexError for a file that another user could have written (checked on the
    open descriptor, so the file checked is the file read).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # NONBLOCK: a FIFO cannot hang us
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        why = _untrusted_because(st)
        if why:
            raise UntrustedIndexError(path, f"index file could be written by another user ({why}); "
                                            "remove it, or use another --index-dir")
        size = st.st_size
        if not stat.S_ISREG(st.st_mode) or size < len(MAGIC) + 8:
            return None
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        if mapped[:len(MAGIC)] != MAGIC:
            return None
        header_len = int.from_bytes(mapped[len(MAGIC):len(MAGIC) + 8], "little")
        if header_len > min(_MAX_HEADER, size):
            return None
        header = json.loads(mapped[len(MAGIC) + 8:len(MAGIC) + 8 + header_len])
        if header.get("key") != json.loads(json.dumps(key)):
            return None
        base = -(-(len(MAGIC) + 8 + header_len) // _ALIGN) * _ALIGN
        out: Dict[str, Any] = {"__extra__": header.get("extra")}
        checksum = 0
        for name, (spec, shape, offset) in header["arrays"].items():
            dtype = _dtype_from_json(spec)
            count = int(np.prod(shape)) if shape else 1
            start = base + int(offset)
            if offset < 0 or start + count * dtype.itemsize > size:
                return None
            checksum = _file_crc(fd, start, count * dtype.itemsize, checksum)
            out[name] = np.frombuffer(mapped, dtype=dtype, count=count, offset=start).reshape(shape)
        return out if checksum == header.get("crc32") else None
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


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
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            age = now - st.st_mtime
            if entry.name in keep:
                if age > _TOUCH_AFTER:
                    os.utime(entry.path)
            elif _expired(entry.name, age, slots):
                os.unlink(entry.path)
        except OSError:
            continue


def _expired(name: str, age: float, slots: Set[Tuple[str, str]]) -> bool:
    """Whether a file that is not in use, ``age`` seconds after its last use, may go."""
    if name.startswith(_TEMP_PREFIX):
        return age > GRACE
    slot = _slot_of(name)
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
