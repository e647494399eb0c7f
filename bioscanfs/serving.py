"""What both engines share: the mount options, the cache timeouts, the mount's readahead,
and the errno a failed read maps to.

Why a module of its own: the native engine (``nativefs``) and the mfusepy engine (``fs``)
must answer alike, and the native one should not import mfusepy to get these.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Dict, List, Union

from .collection import CACHE_SECONDS, Collection
from .errors import BioscanError
from .mounts import mounts_at

log = logging.getLogger(__name__)

#: Archive content never changes while mounted, so the kernel may cache names,
#: attributes, misses and pages for as long as it likes (see docs/design.md).
CACHE_OPTIONS: Dict[str, Union[bool, int]] = {
    "ro": True,
    "kernel_cache": True,
    "entry_timeout": CACHE_SECONDS,
    "attr_timeout": CACHE_SECONDS,
    "negative_timeout": CACHE_SECONDS,
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


#: Both engines mount with this subtype: /proc/self/mountinfo then shows the filesystem
#: type ``fuse.bioscanfs``, by which ``bioscanfs umount`` knows a mount as its own.
SUBTYPE = "bioscanfs"


def mount_options(user_options: List[str], fsname: str) -> Dict[str, Union[bool, str, int]]:
    """Named, with the ``-o`` options the user gives (``a,b=c``); always read-only and of
    our subtype, whatever they say. ``fsname`` is the source the mount table shows, in
    option syntax (``,`` and ``\\`` escaped: mount_helper.source_name)."""
    options: Dict[str, Union[bool, str, int]] = {"fsname": fsname}
    for group in user_options:
        for item in filter(None, group.split(",")):
            key, sep, value = item.partition("=")
            options[key] = value if sep else True
    options.update(ro=True, subtype=SUBTYPE)
    options.pop("rw", None)
    return options


def options_text(options: Dict[str, Union[bool, str, int]]) -> str:
    """Options in libfuse's ``-o`` syntax; a False flag is left out."""
    return ",".join(k if v is True else f"{k}={v}" for k, v in options.items() if v is not False)


def max_workers() -> int:
    """How many requests the native engine answers at once, at most (its threads; each
    starts only when no other is free). A read waits on its archive's storage: under a
    millisecond on a local disk, several on a network file system, where a cluster keeps
    the zips. So the bound is how many reads can be in flight, not a count of cores.
    libfuse 3.12 and later stop at 10 unless told, which held 32 readers to about 1,600
    files/s on a 5 ms store; 16 workers served 2,900 (docs/design.md). Four per core this
    process may run on, at least 16: a loader has about one process per core, each
    reading one file at a time."""
    return max(16, 4 * len(os.sched_getaffinity(0)))


#: Readahead of the mount's own backing device, in KiB. The kernel's default (128 KiB)
#: cuts a sequential read, such as the loader's md5 of the metadata CSV, into 128 KiB
#: requests, each a round trip; 1 MiB, the largest request libfuse 3 takes, streams it
#: faster (docs/performance.md). Small files are not read further: readahead stops at a
#: file's end, and a random read starts with a small window whatever the maximum.
READAHEAD_KB = 1024


#: The readahead the server asks for in its INIT reply, in KiB: a page below the kernel's
#: 128 KiB default, which the reply can only lower, so that the mount's knob showing it
#: tells that the kernel has taken the reply (before that, a value written there is
#: lowered again by the reply).
INIT_READAHEAD_KB = 128 - os.sysconf("SC_PAGE_SIZE") // 1024
#: How long widen_readahead waits by default for the knob to show INIT_READAHEAD_KB, in
#: seconds: the reply goes out right after the ready callback, so this is only a bound.
INIT_WAIT = 2.0


def widen_readahead(mountpoint: str, wait: float = INIT_WAIT) -> None:
    """Set the readahead of the mount at ``mountpoint`` to READAHEAD_KB where this process
    may (as root), once the kernel has taken the server's INIT reply; otherwise the kernel's
    default stays, and the log says so at debug level. Each FUSE mount has a backing device
    of its own, so no other filesystem is touched.

    It reads only the mount table and the knob, never the mount itself: a server thread
    waiting on its own mount (a statvfs, as this once did) cannot be killed cleanly (after
    SIGKILL it waits for a reply no one will send, and the process is never reaped)."""
    mounts = mounts_at(mountpoint)
    knob = f"/sys/class/bdi/{mounts[-1].device}/read_ahead_kb" if mounts else None
    deadline = time.monotonic() + wait
    try:
        while knob and _read_kb(knob) != INIT_READAHEAD_KB:
            if time.monotonic() > deadline:
                raise OSError(f"{knob} never showed the INIT reply's {INIT_READAHEAD_KB} KiB")
            time.sleep(0.001)
        if knob:
            with open(knob, "w") as f:
                f.write(f"{READAHEAD_KB}\n")
    except (OSError, ValueError) as err:
        log.debug("readahead stays the kernel's: %s", err)


def _read_kb(knob: str) -> int:
    with open(knob) as f:
        return int(f.read())


def widen_readahead_soon(mountpoint: str) -> None:
    """``widen_readahead`` on a thread of its own, for a server in the foreground (it has no
    other process): called from its init callback, which must return before the INIT
    reply goes out."""
    threading.Thread(target=widen_readahead, args=(mountpoint,), name="bioscanfs-readahead", daemon=True).start()
