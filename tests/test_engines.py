"""Both engines, one contract (issue 16): the C engine and the mfusepy one, mounting the
same archives at once, answer stat, statvfs, listings, readlink and errors alike.

Attributes are written twice (``fill_attr``/``op_statfs`` in _nativefs.c, ``getattr``/
``statfs`` in fs.py); this is the test that holds them together. Every field a caller
sees is compared except ``st_ino`` and ``st_dev``, which differ by design (the C engine
numbers directories, then file rows; libfuse's high-level layer numbers nodes as it
meets them; each mount is its own device), and ``f_fsid`` likewise.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
from conftest import Mount, errno_of, mounted
from craft import DIR_ATTR, Entry, deflated, dos_stamp, symlink, write_zip

ENGINES = ("native", "python")
STAT_FIELDS = ("st_mode", "st_size", "st_nlink", "st_mtime_ns", "st_atime_ns", "st_ctime_ns",
               "st_blocks", "st_blksize", "st_uid", "st_gid")
STATVFS_FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                  "f_favail", "f_flag", "f_namemax")


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one archive of what the fake set lacks: symlinks (inside, and leaving
    the tree), explicit directory entries (an empty one; one dated after its files), an
    empty file, a 255-byte name, and members of different dates."""
    folder = tmp_path_factory.mktemp("crafted")
    write_zip(folder / "crafted.zip", [
        Entry(b"crafted/dated/", external_attr=DIR_ATTR, **dos_stamp(2030, 6, 1)),
        Entry(b"crafted/dated/old.txt", b"old\n", **dos_stamp(2001, 2, 3, 4, 5, 6)),
        deflated(b"crafted/dated/sub/newer.txt", b"newer\n" * 100, **dos_stamp(2011, 7, 8, 9, 10, 12)),
        Entry(b"crafted/empty-dir/", external_attr=DIR_ATTR, **dos_stamp(2020, 1, 1)),
        Entry(b"crafted/empty.txt", b""),
        Entry(b"crafted/" + b"N" * 255, b"a name of 255 bytes\n"),
        symlink(b"crafted/links/inside", b"../dated/old.txt"),
        symlink(b"crafted/links/to-dir", b"../dated"),
        symlink(b"crafted/links/leaves", b"../../../etc/passwd"),
    ])
    return folder


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, fake_set: Path, crafted: Path) -> Iterator[Dict[str, Mount]]:
    """The fake set and the crafted archive, mounted once per engine, at the same time."""
    with contextlib.ExitStack() as stack:
        mounts = {engine: stack.enter_context(mounted([fake_set, crafted], tmp_path_factory.mktemp(engine),
                                                      engine=engine))
                  for engine in ENGINES}
        for live in mounts.values():
            live.expect_log("crafted/links/leaves.*leaves the tree")
        yield mounts


def listing(root: Path) -> Dict[str, List[str]]:
    """Directory -> its names in the order the kernel lists them."""
    tree: Dict[str, List[str]] = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        tree[rel] = os.listdir(root / rel)
        pending += [f"{rel}/{n}" if rel else n for n in tree[rel]
                    if stat.S_ISDIR(os.lstat(root / rel / n).st_mode)]
    return tree


def all_paths(tree: Dict[str, List[str]]) -> List[str]:
    """The root and every entry of a listing, in listing order."""
    return [""] + [f"{d}/{n}" if d else n for d, names in tree.items() for n in names]


def read_dir_fd(path: Path) -> bytes:
    """read(2) on a directory's descriptor (open() in Python refuses before any read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1)
    finally:
        os.close(fd)


def differences(mounts: Dict[str, Mount], paths: List[str],
                answer: Callable[[Path], object]) -> List[Tuple[str, object, object]]:
    """(path, native answer, python answer) wherever the two engines answer differently;
    of answers that are dicts, only the keys that differ."""
    out = []
    for path in paths:
        native, python = (answer(mounts[e].point / path) for e in ENGINES)
        if isinstance(native, dict) and isinstance(python, dict):
            native, python = ({k: v for k, v in mine.items() if theirs.get(k) != v}
                              for mine, theirs in ((native, python), (python, native)))
        if native != python:
            out.append((path, native, python))
    return out


def lstat_fields(path: Path) -> Dict[str, int]:
    st = os.lstat(path)
    return {name: getattr(st, name) for name in STAT_FIELDS}


def link_or_errno(path: Path) -> object:
    return errno_of(lambda: os.readlink(path)) or os.readlink(path)


def test_listings_are_equal_in_order(both: Dict[str, Mount]) -> None:
    """Every directory lists the same names in the same order (subdirectories, then files)."""
    native, python = (listing(both[e].point) for e in ENGINES)
    assert native.keys() == python.keys()
    assert [d for d in native if native[d] != python[d]] == []
    assert {"crafted/empty-dir", "crafted/links", "crafted/dated/sub"} <= native.keys()


def test_lstat_is_equal_for_every_path(both: Dict[str, Mount]) -> None:
    """mode, size, nlink, times, blocks, blksize, owner: equal for every path."""
    paths = all_paths(listing(both["native"].point))
    assert len(paths) > 1000
    assert differences(both, paths, lstat_fields)[:10] == []
    modes = {stat.S_IFMT(os.lstat(both["native"].point / p).st_mode) for p in paths}
    assert modes == {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK}  # every kind was compared


def test_statvfs_is_equal(both: Dict[str, Mount]) -> None:
    """statvfs of the roots, and of a file deep inside, field by field."""
    deep = "crafted/dated/sub/newer.txt"
    for path in ("", deep):
        native, python = (os.statvfs(both[e].point / path) for e in ENGINES)
        assert {f: getattr(native, f) for f in STATVFS_FIELDS} == {f: getattr(python, f) for f in STATVFS_FIELDS}


def test_readlink_is_equal_for_every_path(both: Dict[str, Mount]) -> None:
    """The same target for each link inside the tree, the same errno for everything else
    (the link leaving the tree is a regular file on both)."""
    paths = all_paths(listing(both["native"].point))
    assert differences(both, paths, link_or_errno)[:10] == []
    assert link_or_errno(both["native"].point / "crafted/links/inside") == "../dated/old.txt"
    assert link_or_errno(both["native"].point / "crafted/links/leaves") == errno.EINVAL


#: (what is asked, how): each answered by both engines with one errno.
ERROR_PROBES: Dict[str, Callable[[Path], object]] = {
    "missing at the root": lambda root: os.lstat(root / "nope"),
    "missing in a folder": lambda root: os.lstat(root / "crafted/dated/nope.txt"),
    "a name over 255 bytes": lambda root: os.lstat(root / "crafted" / ("N" * 300)),
    "below a file": lambda root: os.lstat(root / "crafted/empty.txt/x"),
    "read of a folder": lambda root: read_dir_fd(root / "crafted/dated"),
    "listing of a file": lambda root: os.listdir(root / "crafted/empty.txt"),
    "readlink of a folder": lambda root: os.readlink(root / "crafted/dated"),
    "write to a file": lambda root: open(root / "crafted/empty.txt", "r+b"),
}


@pytest.mark.parametrize("probe", sorted(ERROR_PROBES))
def test_errors_are_equal(both: Dict[str, Mount], probe: str) -> None:
    """A miss, a wrong kind of node, a write: the same errno from both engines, never 0."""
    native, python = (errno_of(lambda: ERROR_PROBES[probe](both[e].point)) for e in ENGINES)
    assert native == python != 0, (errno.errorcode.get(native), errno.errorcode.get(python))
