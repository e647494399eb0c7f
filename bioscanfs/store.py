"""Persisting named numpy arrays to one file and mapping them back without copying.

Owns the on-disk container of the index; knows nothing of what the arrays mean.
A file is only used when its magic, header and key match, every array lies inside it and
the CRC-32 of all array bytes is the one saved; anything else (truncated, flipped bits,
foreign, older version, another archive) reads as absent, so the caller rebuilds. Files are written to a temporary name and renamed, so two
mounts that build the same index at once never see half a file.
"""
from __future__ import annotations

import json
import mmap
import os
import tempfile
from typing import Any, Dict, Optional

import numpy as np
from zlib_ng.zlib_ng import crc32

MAGIC = b"BSFSIDX\x03"
_ALIGN = 64
_MAX_HEADER = 1 << 24
_CHECK_BLOCK = 8 << 20


def _dtype_to_json(dtype: np.dtype) -> Any:
    return dtype.descr if dtype.names else dtype.str


def _dtype_from_json(spec: Any) -> np.dtype:
    if isinstance(spec, str):
        return np.dtype(spec)
    return np.dtype([tuple(field) for field in spec])


def save(path: str, key: Any, arrays: Dict[str, np.ndarray], extra: Any = None) -> None:
    """Write ``arrays`` under ``key``; raises OSError when the folder is not writable."""
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
    base = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC + len(header).to_bytes(8, "little") + header)
            for name, array in arrays.items():
                out.seek(base + layout[name][2])
                out.write(memoryview(array).cast("B"))
            out.truncate(base + offset)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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

    Returns the arrays (read-only views of the mapping) and ``"__extra__"``.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < len(MAGIC) + 8:
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
