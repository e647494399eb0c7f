"""One positional byte source per archive, however many files it spans.

Owns file descriptors and the mapping of archive offsets to pieces; knows nothing of
the zip structure. A raw byte split (``NAME.zip.001`` ...) is one disk whose bytes are the
concatenation of its pieces; a spanned set (``NAME.z01`` ... ``NAME.zip``) is the same
concatenation with one disk per piece, so central-directory (disk, offset) pairs map to
``disk_bases[disk] + offset``.

Descriptors stay open for the life of the mount: an archive deleted or replaced under a
live mount keeps serving the bytes that were indexed; one truncated in place gives short
reads, which the reader turns into EIO. So the open-file limit (``ulimit -n``) bounds
the number of archives; ``open_sources`` checks it before opening any.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import os
import resource
from typing import List, Optional, Sequence, Tuple

from .errors import ArchiveError, SourceError
from .remote import RangeCache, RemoteSource, is_url
from .zipdir import Source

log = logging.getLogger(__name__)

#: Descriptors left free for what opens after the archives: the tree's index file, the
#: log, /dev/fuse, the daemon's pipe, libfuse's and Python's own.
SPARE_DESCRIPTORS = 64


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


def open_sources(groups: Sequence[Tuple[Sequence[str], bool]], cache_dir: Optional[str] = None,
                 cache_max: int = 10 << 30, skip_bad: bool = False) -> List[FileSource]:
    """One FileSource (or RemoteSource, for a URL) per archive: (piece paths, spanned?),
    in the given order.

    An archive that cannot be opened (no read permission, gone, a URL that does not answer)
    raises its ArchiveError; the archives past what the open-file limit allows raise one
    SourceError. With ``skip_bad`` they are left out instead, with one warning per archive
    (one for all those past the limit), as ``load_tree`` leaves out archives it cannot
    read. Whatever was opened before a failure is closed. Remote sources share one disk
    cache of ranges when ``cache_dir``.
    """
    room = _descriptor_room()
    needed = list(itertools.accumulate(_descriptors(paths) for paths, _ in groups))
    fits = bisect.bisect_right(needed, room)
    if fits < len(groups):
        why = (f"{len(groups)} archives need {needed[-1]} open files; the limit (ulimit -n {_soft_limit()}) "
               f"leaves room for {max(room, 0)}")
        if not skip_bad:
            raise SourceError(f"{why}: raise it to {_soft_limit() + needed[-1] - room} "
                              f"or give --skip-bad to use the first {fits} archives")
        log.warning("skipping %d archives, %s to %s: %s; raise it to use them all",
                    len(groups) - fits, groups[fits][0][0], groups[-1][0][0], why)
    cache = RangeCache(cache_dir, cache_max) if cache_dir and any(is_url(p[0]) for p, _ in groups) else None
    sources: List[FileSource] = []
    try:
        for paths, spanned in groups[:fits]:
            try:
                sources.append(_open_source(paths, spanned, cache))
            except ArchiveError as err:
                if not skip_bad:
                    raise
                log.warning("skipping %s", err)
    except BaseException:
        for src in sources:
            src.close()
        raise
    return sources


def _open_source(paths: Sequence[str], spanned: bool, cache: Optional[RangeCache]) -> FileSource:
    if not is_url(paths[0]):
        return FileSource(paths, spanned)
    if len(paths) > 1:
        raise ArchiveError(paths[0], f"remote archives split in {len(paths)} pieces are not supported; "
                                     "mount a local copy")
    return RemoteSource(paths[0], cache)  # type: ignore[return-value]  # the same Source interface


def _descriptors(paths: Sequence[str]) -> int:
    """Descriptors an archive holds while mounted: one per local piece, plus one for its
    mapped member index while the tree is built, or for the O_DIRECT twin through which
    the native engine reads a one-file archive while it serves."""
    return (0 if is_url(paths[0]) else len(paths)) + 1


def _soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _descriptor_room() -> int:
    """Descriptors the archives may take: the soft limit, less those open now and the spare."""
    if _soft_limit() == resource.RLIM_INFINITY:
        return 1 << 62
    return _soft_limit() - len(os.listdir("/proc/self/fd")) - SPARE_DESCRIPTORS

