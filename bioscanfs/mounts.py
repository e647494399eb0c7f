"""The system's mount table as this process sees it (/proc/self/mountinfo).

Owns reading that table: which mounts sit at a folder, their type, source and device.
Never touches the mounted filesystem itself, so it answers for a mount whose server is
busy, not yet answering, or dead (ENOTCONN).
"""
from __future__ import annotations

import os
import re
from typing import List, NamedTuple


class MountEntry(NamedTuple):
    """One line of /proc/self/mountinfo (proc(5)): ID PARENT MAJ:MIN ROOT POINT OPTIONS
    [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS."""

    id: int
    device: str     #: ``MAJ:MIN``, also the name of its backing device in /sys/class/bdi
    fstype: str     #: ``fuse.bioscanfs`` for ours (serving.SUBTYPE), ``tmpfs``, ...
    source: str


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


def mounts_at(point: str) -> List[MountEntry]:
    """The mounts at ``point`` (a resolved path), bottom first: the last one is on top."""
    found = []
    with open("/proc/self/mountinfo", errors="surrogateescape") as table:
        for line in table:
            head, _, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if len(fields) >= 5 and len(rest) >= 2 and _unescape(fields[4]) == point:
                found.append(MountEntry(int(fields[0]), fields[2], _unescape(rest[0]), _unescape(rest[1])))
    return found


def is_mounted(mountpoint: str) -> bool:
    """True for live and dead (ENOTCONN) mounts alike, unlike os.path.ismount; a path
    through a symlink counts as the folder it leads to."""
    return bool(mounts_at(os.path.realpath(mountpoint)))
