"""The mfusepy engine: a thin adapter over Collection, used when the native engine
(``nativefs``) is not built, or on request (``--engine python``). Only what a read-only
filesystem answers is overridden: mfusepy's base class answers every write-type call
with EROFS. ``open`` answers ENOSYS once, after which the kernel opens files without
asking; reads find their member by path. Knows nothing of ZIP.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import tempfile
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Union

import mfusepy

from .collection import BLOCK_SIZE, Collection
from .errors import BioscanError, MountError
from .names import NAME_MAX
from .serving import CACHE_OPTIONS, INIT_READAHEAD_KB, options_text, read_or_errno

log = logging.getLogger(__name__)

class BioscanFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, collection: Collection, on_ready: Optional[Callable[[], None]] = None) -> None:
        self.c = collection
        self._on_ready = on_ready
        self._uid, self._gid = os.getuid(), os.getgid()

    def init(self, path: str) -> None:
        if self._on_ready:
            self._on_ready()

    def open(self, path: str, flags: int) -> int:
        """Answer ENOSYS once: the kernel then opens files without asking (no OPEN or
        RELEASE round trip per file) and keeps their page cache (FOPEN_KEEP_CACHE)."""
        raise mfusepy.FuseOSError(errno.ENOSYS)

    def _node(self, path: str) -> int:
        with _answering():
            return self.c.node(path)

    def getattr(self, path: str, fh: Any = None) -> Dict[str, int]:
        with _answering():
            st = self.c.stat_node(self._node(path))
        ns = st.mtime * 1_000_000_000
        return {
            "st_mode": st.mode, "st_size": st.size, "st_nlink": st.nlink,
            "st_uid": self._uid, "st_gid": self._gid,
            "st_mtime": ns, "st_atime": ns, "st_ctime": ns,
            "st_blocks": -(-st.size // 512), "st_blksize": BLOCK_SIZE,
        }

    def readdir(self, path: str, fh: Any) -> Iterator[str]:
        node = self._node(path)
        if node >= 0:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        yield "."
        yield ".."
        with _answering():
            dirs, files = self.c.tree.listdir(-1 - node)
        for name in dirs:
            yield name.decode("utf-8", "surrogateescape")
        for name in files:
            yield name.decode("utf-8", "surrogateescape")

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        node = self._node(path)
        if node < 0:
            raise mfusepy.FuseOSError(errno.EISDIR)
        data = read_or_errno(self.c, node, size, offset, path.lstrip("/"))
        if isinstance(data, int):
            raise mfusepy.FuseOSError(data)
        return data

    def readlink(self, path: str) -> str:
        node = self._node(path)
        with _answering():
            target = self.c.link_target(node) if node >= 0 else None
        if target is None:
            raise mfusepy.FuseOSError(errno.EINVAL)
        return target.decode("utf-8", "surrogateescape")

    def statfs(self, path: str) -> Dict[str, int]:
        tree = self.c.tree
        total = tree.total_bytes
        return {
            "f_bsize": BLOCK_SIZE, "f_frsize": BLOCK_SIZE, "f_blocks": -(-total // BLOCK_SIZE),
            "f_bfree": 0, "f_bavail": 0, "f_files": tree.n_files + tree.n_dirs,
            "f_ffree": 0, "f_favail": 0, "f_namemax": NAME_MAX,
        }


def serve(collection: Collection, mountpoint: str, options: Dict[str, Union[bool, str, int]],
          on_ready: Optional[Callable[[], None]] = None, threads: bool = True,
          cache_archives: Optional[bool] = None) -> None:
    """Mount and serve until unmounted or signalled (blocks; stays in the foreground).
    ``cache_archives`` is the C engine's choice: every read made here goes through the
    page cache, with the kernel's readahead."""
    with _libfuse_setup_output() as setup, _default_signals(signal.SIGTERM, signal.SIGHUP):
        def ready() -> None:
            setup.done()
            if on_ready:
                on_ready()

        try:
            mfusepy.FUSE(BioscanFS(collection, ready), mountpoint, foreground=True, nothreads=not threads,
                         max_readahead=INIT_READAHEAD_KB << 10, **dict(CACHE_OPTIONS, **options))
        except RuntimeError:  # fuse_main failed; libfuse said why on stderr, which setup kept
            why = setup.done() or "libfuse refused to mount"
            raise MountError(mountpoint, f"{why} with -o {options_text(options)}") from None


class _SetupOutput:
    """libfuse prints its setup errors (an unknown option, a bad mount point) to stderr
    itself; until the mount is up, stderr goes to a file, so the user gets one line."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self._saved: Optional[int] = os.dup(2)
        self._lock = threading.Lock()
        os.dup2(self._file.fileno(), 2)

    def done(self) -> str:
        """Give stderr back (once); returns what libfuse printed, as one line."""
        with self._lock:
            if self._saved is not None:
                os.dup2(self._saved, 2)
                os.close(self._saved)
                self._saved = None
        self._file.seek(0)
        return " ".join(self._file.read().decode(errors="replace").split())


@contextlib.contextmanager
def _answering() -> Iterator[None]:
    """A BioscanError as the errno it stands for (NotFound: ENOENT; DamagedIndex, a part of
    the index that failed its check: EIO); mfusepy would answer any other exception EINVAL."""
    try:
        yield
    except BioscanError as err:
        raise mfusepy.FuseOSError(err.errno) from None


@contextlib.contextmanager
def _libfuse_setup_output() -> Iterator[_SetupOutput]:
    setup = _SetupOutput()
    try:
        yield setup
    finally:
        setup.done()


@contextlib.contextmanager
def _default_signals(*signums: int) -> Iterator[None]:
    """libfuse installs its exit handlers only over the default action, and mfusepy
    resets SIGINT alone: an ignored SIGTERM or SIGHUP (as under nohup) would otherwise
    never end the mount. The C engine does the same in serve()."""
    saved = {signum: signal.signal(signum, signal.SIG_DFL) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
