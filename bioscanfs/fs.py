"""The mfusepy engine, and what both engines share: errno mapping and mount options.

The mfusepy engine is a thin adapter over Collection, used when the native engine
(``nativefs``) is not built, or on request (``--engine python``). Only what a read-only
filesystem answers is overridden: mfusepy's base class answers every write-type call
with EROFS. ``open`` answers ENOSYS once, after which the kernel opens files without
asking; reads find their member by path. Knows nothing of ZIP.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import mfusepy

from .collection import Collection
from .errors import BioscanError, MountError, NotFound

log = logging.getLogger(__name__)

#: Archive content never changes while mounted, so the kernel may cache names,
#: attributes, misses and pages for as long as it likes (see README, "Design").
CACHE_OPTIONS: Dict[str, Union[bool, int]] = {
    "ro": True,
    "kernel_cache": True,
    "entry_timeout": 86400,
    "attr_timeout": 86400,
    "negative_timeout": 86400,
}


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
        try:
            return self.c.node(path)
        except NotFound:
            raise mfusepy.FuseOSError(errno.ENOENT) from None

    def getattr(self, path: str, fh: Any = None) -> Dict[str, int]:
        st = self.c.stat_node(self._node(path))
        ns = st.mtime * 1_000_000_000
        return {
            "st_mode": st.mode, "st_size": st.size, "st_nlink": st.nlink,
            "st_uid": self._uid, "st_gid": self._gid,
            "st_mtime": ns, "st_atime": ns, "st_ctime": ns,
            "st_blocks": -(-st.size // 512), "st_blksize": 65536,
        }

    def readdir(self, path: str, fh: Any) -> Iterator[str]:
        node = self._node(path)
        if node >= 0:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        yield "."
        yield ".."
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
        target = self.c.link_target(node) if node >= 0 else None
        if target is None:
            raise mfusepy.FuseOSError(errno.EINVAL)
        return target.decode("utf-8", "surrogateescape")

    def statfs(self, path: str) -> Dict[str, int]:
        tree = self.c.tree
        total = tree.total_bytes
        return {
            "f_bsize": 65536, "f_frsize": 65536, "f_blocks": -(-total // 65536),
            "f_bfree": 0, "f_bavail": 0, "f_files": len(tree.files) + len(tree.dir_paths),
            "f_ffree": 0, "f_favail": 0, "f_namemax": 255,
        }


def read_or_errno(c: Collection, node: int, size: int, offset: int, label: str) -> Union[bytes, int]:
    """A member's bytes, or the errno its failure maps to, logged once with its archive.

    Out of memory is EIO too: mfusepy would answer EINVAL, the native engine EIO.
    """
    try:
        return c.read_node(node, size, offset, label)
    except BioscanError as err:
        log.error("cannot read %s: %s", label, err)
        return err.errno
    except (OSError, MemoryError) as err:
        log.error("cannot read %s in %s: %s", label, c.archive_of(node), str(err) or "out of memory")
        return errno.EIO


def mount_options(user_options: List[str]) -> Dict[str, Union[bool, str, int]]:
    """Read-only and named, overridden by the ``-o`` options the user gives (``a,b=c``)."""
    options: Dict[str, Union[bool, str, int]] = {"fsname": "bioscanfs"}
    for group in user_options:
        for item in filter(None, group.split(",")):
            key, sep, value = item.partition("=")
            options[key] = value if sep else True
    options["ro"] = True
    options.pop("rw", None)
    return options


def options_text(options: Dict[str, Union[bool, str, int]]) -> str:
    """Options in libfuse's ``-o`` syntax; a False flag is left out."""
    return ",".join(k if v is True else f"{k}={v}" for k, v in options.items() if v is not False)


def serve(collection: Collection, mountpoint: str, options: Dict[str, Union[bool, str, int]],
          on_ready: Optional[Callable[[], None]] = None, threads: bool = True) -> None:
    """Mount and serve until unmounted or signalled (blocks; stays in the foreground)."""
    try:
        mfusepy.FUSE(BioscanFS(collection, on_ready), mountpoint, foreground=True, nothreads=not threads,
                     **dict(CACHE_OPTIONS, **options))
    except RuntimeError:  # fuse_main failed; libfuse printed why
        raise MountError(mountpoint, f"libfuse refused to mount with -o {options_text(options)}") from None
