"""One positional byte source per archive, however many files it spans.

Owns file descriptors and the mapping of archive offsets to pieces; knows nothing of
the zip structure. A raw byte split (``NAME.zip.001`` ...) is one disk whose bytes are the
concatenation of its pieces; a spanned set (``NAME.z01`` ... ``NAME.zip``) is the same
concatenation with one disk per piece, so central-directory (disk, offset) pairs map to
``disk_bases[disk] + offset``.

Descriptors stay open for the life of the mount: an archive deleted or replaced under a
live mount keeps serving the bytes that were indexed; one truncated in place gives short
reads, which the reader turns into EIO.
"""
from __future__ import annotations

import bisect
import os
from typing import List, Optional, Sequence, Tuple

from .errors import ArchiveError
from .zipdir import Source


class FileSource(Source):
    """A zip archive stored as one or more local files."""

    def __init__(self, paths: Sequence[str], spanned: bool = False) -> None:
        if not paths:
            raise ValueError("a source needs at least one file")
        self.paths = [os.path.abspath(p) for p in paths]
        self.name = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} pieces)"
        self._fds: List[int] = []
        self._starts: List[int] = []
        identity: List[Tuple[str, int, int, int]] = []
        total = 0
        try:
            for path in self.paths:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self._fds.append(fd)
                st = os.fstat(fd)
                self._starts.append(total)
                identity.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
                total += st.st_size
        except OSError as err:
            self.close()
            raise ArchiveError(err.filename or self.name, err.strerror or str(err)) from None
        self.size = total
        self.identity = identity
        self.disk_bases = list(self._starts) if spanned else [0]

    @property
    def fd(self) -> Optional[int]:
        """The descriptor when the archive is one local file (the native engine preads it)."""
        return self._fds[0] if len(self._fds) == 1 else None

    def pread(self, size: int, offset: int) -> bytes:
        """Read ``size`` bytes; shorter only at the end of the source (or of a piece
        truncated under a live mount). Loops, since Linux returns at most 0x7ffff000
        bytes per pread(2); never reads a piece past the length it had when opened."""
        chunks = []
        size = min(size, self.size - offset)
        while size > 0:
            piece = bisect.bisect_right(self._starts, offset) - 1
            end = self._starts[piece + 1] if piece + 1 < len(self._starts) else self.size
            got = os.pread(self._fds[piece], min(size, end - offset), offset - self._starts[piece])
            if not got:
                break  # the end of the source, or of a piece that shrank after it was opened
            chunks.append(got)
            size -= len(got)
            offset += len(got)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class BytesSource(Source):
    """An archive held in memory (tests, benchmarks, archives fetched whole)."""

    def __init__(self, data: bytes, name: str = "<memory>") -> None:
        self.data, self.size, self.name, self.disk_bases = data, len(data), name, [0]

    def pread(self, size: int, offset: int) -> bytes:
        return self.data[offset:offset + size]
