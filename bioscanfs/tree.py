"""The merged tree's arrays: their layout, their checks, and lookups and listings over them.

Owns what the arrays mean once built; knows nothing of how they are built (``merge``),
saved (``index``, ``store``) or served (``fs``, ``nativefs``). No Python object per member.

Layout (all numpy; ``index`` saves them and maps them back on the next mount):

- ``files``: one FILE_DTYPE row per file, grouped by directory (in directory order) and
  sorted by name (bytes) inside each directory;
- ``names``/``name_ends``: the files' own names end to end, parallel to ``files``
  (32-bit ends: at most NAMES_MAX bytes of names in all, 4 bytes a file less); a
  lookup is a binary search inside the directory's row range ``dir_lo``..``dir_hi``;
- directories are numbered breadth first with siblings in name order, so a directory's
  subdirectories are one contiguous, sorted run of ids and ``dir_parent`` never
  decreases; each directory stores only its own name (``dir_names``/``dir_ends``), so
  a folder costs its own name, never its full path (a path 2,000 folders deep would
  otherwise be stored 2,000 times over);
- ``conflict_*``: paths present in several archives with different content, as arrays
  (the first archive listed is the one served);
- with views (docs/views.md), also ``links``: file rows shown again in other folders,
  each directory's run ``link_lo``..``link_hi`` sorted by its target's name (a link
  costs 4 bytes: its name is its target's), and ``views_zip``: the bytes of one more
  archive, in memory, holding the views' classes.txt files. A link is its target,
  inode included: a hard link.

An index folder is untrusted input: ``check`` bounds every value a lookup or a read
will trust before a tree is used, and the C engine checks the same bounds again.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import zipdir
from .bulk import for_chunks
from .errors import NotFound, SourceError
from .names import NAME_MAX

FILE_DTYPE = zipdir.MEMBER_DTYPE
#: Every archive of a tree is addressed by the ``archive`` column.
MAX_ARCHIVES = int(np.iinfo(FILE_DTYPE["archive"]).max) + 1
#: Bytes of file names (own names, end to end) that a tree can hold: its ends are 32-bit.
NAMES_MAX = (1 << 32) - 1
#: The arrays of a tree and their element types; ``check`` refuses anything else.
ARRAY_TYPES = {
    "files": FILE_DTYPE, "names": np.dtype(np.uint8), "name_ends": np.dtype("<u4"),
    "dir_lo": np.dtype("<u8"), "dir_hi": np.dtype("<u8"), "dir_mtime": np.dtype("<i8"),
    "dir_parent": np.dtype("<u8"), "dir_names": np.dtype(np.uint8), "dir_ends": np.dtype("<u8"),
    "conflict_paths": np.dtype(np.uint8), "conflict_path_ends": np.dtype("<u8"),
    "conflict_archives": np.dtype("<u2"), "conflict_archive_ends": np.dtype("<u8"),
}
#: The arrays of a tree with views: all of them or none.
VIEW_TYPES = {"links": np.dtype("<u4"), "link_lo": np.dtype("<u8"), "link_hi": np.dtype("<u8"),
              "views_zip": np.dtype(np.uint8)}
#: Links are 32-bit rows: a tree with views holds fewer files than this.
LINKED_FILES_MAX = 1 << 32


def check_archive_count(count: int) -> None:
    """Refuse more archives than the ``archive`` column numbers (before they are opened)."""
    if count > MAX_ARCHIVES:
        raise SourceError(f"{count:,} archives: at most {MAX_ARCHIVES:,} can be mounted together")


class Conflict(NamedTuple):
    path: str
    archives: List[str]   #: the first one is served


class BadTables(ValueError):
    """The arrays break a bound that lookups or reads rely on (a damaged or forged index)."""


def check(arrays: Dict[str, Any], archive_sizes: Sequence[int]) -> None:
    """Raise BadTables unless every bound the lookups and reads rely on holds.

    Checked: element types, lengths against each other, name lengths (1..255 bytes, no
    '/' or NUL), the directory tree (parents before children, a contiguous row range
    per directory), every row's archive and its data inside that archive, declared
    sizes within st_size, and the conflict lists. Order within a directory is not
    checked: a wrong order only makes lookups miss.
    """
    for name, dtype in ARRAY_TYPES.items():
        if name not in arrays or arrays[name].dtype != dtype or arrays[name].ndim != 1:
            raise BadTables(f"{name}: missing or not of type {dtype}")
    files, n_dirs = arrays["files"], len(arrays["dir_lo"])
    if n_dirs < 1 or any(len(arrays[k]) != n_dirs for k in ("dir_hi", "dir_mtime", "dir_parent", "dir_ends")):
        raise BadTables("directory tables disagree in length")
    if len(arrays["name_ends"]) != len(files):
        raise BadTables("name_ends: not one per file")
    _check_names(arrays["names"], arrays["name_ends"], "names")
    _check_names(arrays["dir_names"], arrays["dir_ends"], "dir_names", root=True)
    parent = arrays["dir_parent"]
    if parent[0] != 0 or (parent[1:] >= np.arange(1, n_dirs, dtype=np.uint64)).any() or (np.diff(parent[1:]) < 0).any():
        raise BadTables("dir_parent: not breadth-first order")
    lo, hi = arrays["dir_lo"], arrays["dir_hi"]
    if lo[0] != 0 or (lo > hi).any() or (lo[1:] != hi[:-1]).any() or hi[-1] != len(files):
        raise BadTables("dir_lo/dir_hi: not one contiguous row range per directory")
    _check_rows(files, archive_sizes)
    for ends, blob in (("conflict_path_ends", "conflict_paths"), ("conflict_archive_ends", "conflict_archives")):
        if (np.diff(arrays[ends].astype(np.int64), prepend=0) < 0).any() or \
                (int(arrays[ends][-1]) if len(arrays[ends]) else 0) != len(arrays[blob]):
            raise BadTables(f"{ends}: the ends do not tile {blob}")
    if len(arrays["conflict_path_ends"]) != len(arrays["conflict_archive_ends"]) or \
            (arrays["conflict_archives"] >= len(archive_sizes)).any():
        raise BadTables("conflicts: lists disagree or name an archive that is not there")
    _check_links(arrays)


def _check_links(arrays: Dict[str, Any]) -> None:
    """With views: every link names a file row, and the link runs tile ``links`` in
    directory order (as the row ranges tile ``files``). Order is not checked."""
    present = [name for name in VIEW_TYPES if name in arrays]
    if not present:
        return
    for name, dtype in VIEW_TYPES.items():
        if name not in arrays or arrays[name].dtype != dtype or arrays[name].ndim != 1:
            raise BadTables(f"{name}: missing or not of type {dtype}")
    links, lo, hi = arrays["links"], arrays["link_lo"], arrays["link_hi"]
    if len(lo) != len(arrays["dir_lo"]) or len(hi) != len(lo) or lo[0] != 0 or (lo > hi).any() \
            or (lo[1:] != hi[:-1]).any() or hi[-1] != len(links):
        raise BadTables("link_lo/link_hi: not one contiguous run of links per directory")
    n_files = len(arrays["files"])
    if not all(for_chunks(len(links), lambda rows: not (links[rows] >= n_files).any())):
        raise BadTables("links: a link names a file that is not there")


#: Bytes a name may not hold: NUL and '/'.
_BAD_BYTE = np.zeros(256, dtype=bool)
_BAD_BYTE[[0, ord("/")]] = True


def _check_names(blob: np.ndarray, ends: np.ndarray, what: str, root: bool = False) -> None:
    """Each name that ``ends`` cuts from ``blob`` is one path component the kernel takes:
    1..255 bytes, no '/' or NUL, not '.' or '..' (no name leads out of the mount). With
    ``root``, the first name is the root's and must be empty. Ends must tile the blob."""
    n = len(ends)
    if (int(ends[-1]) if n else 0) != len(blob) or (root and (n == 0 or ends[0] != 0)):
        raise BadTables(f"{what}: the ends do not tile the names")

    def chunk(rows: slice) -> bool:
        first = int(ends[rows.start - 1]) if rows.start else 0
        stop = ends[rows].astype(np.int64)
        lengths = np.diff(stop, prepend=first)
        if root and rows.start == 0:
            lengths = lengths[1:]
            stop = stop[1:]
        if ((lengths < 1) | (lengths > NAME_MAX)).any() or \
                _BAD_BYTE[blob[first:int(ends[rows.stop - 1])]].any():
            return False
        dots = np.flatnonzero(lengths <= 2)
        return not ((blob[stop[dots] - lengths[dots]] == ord(".")) & (blob[stop[dots] - 1] == ord("."))).any()

    if not all(for_chunks(n, chunk)):
        raise BadTables(f"{what}: a name is empty, longer than {NAME_MAX} bytes, holds '/' or NUL, "
                        "or is '.' or '..'")


def _check_rows(files: np.ndarray, archive_sizes: Sequence[int]) -> None:
    """Every row's archive is there and its data lies inside it; sizes fit st_size."""
    sizes = np.asarray(archive_sizes, dtype=np.uint64)

    def chunk(rows: slice) -> bool:
        part = files[rows]
        archive = part["archive"].astype(np.intp)
        if (archive >= len(sizes)).any():
            return False
        room = sizes[archive]
        offset = part["header_offset"]
        return not ((offset > room) | (part["compressed_size"] > room - np.minimum(offset, room))
                    | (part["size"] >= np.uint64(zipdir.SIZE_LIMIT))).any()

    if not all(for_chunks(len(files), chunk)):
        raise BadTables("files: a row names an archive that is not there, lies past its end, "
                        "or declares a size of 2^63 bytes or more")


def find_name(name_of: Callable[[int], bytes], lo: int, hi: int, name: bytes) -> int:
    """The first row in lo..hi whose name is not below ``name`` (rows sorted by name bytes)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if name_of(mid) < name:
            lo = mid + 1
        else:
            hi = mid
    return lo


class Tree:
    """Lookups and listings over the merged arrays (checked by the caller with ``check``)."""

    def __init__(self, arrays: Dict[str, Any], archives: List[str], persisted: bool = False) -> None:
        self.arrays = {name: arrays[name] for name in (*ARRAY_TYPES, *VIEW_TYPES) if name in arrays}
        self.archives = archives
        self.persisted = persisted  #: mapped from the index folder (else held in memory)
        self.files: np.ndarray = arrays["files"]
        self.names: np.ndarray = arrays["names"]
        self.name_ends: np.ndarray = arrays["name_ends"]
        self.dir_lo: np.ndarray = arrays["dir_lo"]
        self.dir_hi: np.ndarray = arrays["dir_hi"]
        self.dir_mtime: np.ndarray = arrays["dir_mtime"]
        self.dir_parent: np.ndarray = arrays["dir_parent"]
        extra = arrays.get("__extra__") or {}
        self.extra: Dict[str, Any] = dict(extra)   #: what the build recorded (see ``index``)
        self.warnings: List[str] = list(extra.get("warnings", []))
        self.total_bytes: int = int(extra.get("total_bytes", 0))
        self.duplicates: int = int(extra.get("duplicates", 0))  #: same path and content, repeated
        self.n_dirs = len(self.dir_lo)
        self.dir_names: np.ndarray = arrays["dir_names"]
        self.dir_ends: np.ndarray = arrays["dir_ends"]
        ids = np.arange(self.n_dirs, dtype=np.uint64)
        #: Each directory's subdirectories are the ids sub_lo..sub_hi (breadth-first order).
        self.sub_lo = np.searchsorted(self.dir_parent[1:], ids, side="left") + 1
        self.sub_hi = np.searchsorted(self.dir_parent[1:], ids, side="right") + 1
        views = "links" in arrays
        self.links: np.ndarray = arrays["links"] if views else np.zeros(0, VIEW_TYPES["links"])
        self.link_lo: np.ndarray = arrays["link_lo"] if views else np.zeros(self.n_dirs, np.uint64)
        self.link_hi: np.ndarray = arrays["link_hi"] if views else self.link_lo
        self.views_zip: Optional[bytes] = arrays["views_zip"].tobytes() if views else None

    def dir_base(self, dir_id: int) -> bytes:
        """A directory's own name (the root's is empty)."""
        begin = int(self.dir_ends[dir_id - 1]) if dir_id else 0
        return self.dir_names[begin:int(self.dir_ends[dir_id])].tobytes()

    def find_dir(self, dir_id: int, name: bytes) -> int:
        """The subdirectory ``name`` of a directory, or -1 (binary search: siblings are sorted)."""
        hi = int(self.sub_hi[dir_id])
        child = find_name(self.dir_base, int(self.sub_lo[dir_id]), hi, name)
        return child if child < hi and self.dir_base(child) == name else -1

    # A node is a file row (>= 0) or a directory (-1 - dir id); a link resolves to its row.
    def lookup(self, path: bytes) -> int:
        """Resolve a path relative to the root (no leading '/'); raises NotFound."""
        dir_id = 0
        if not path:
            return -1
        parts = path.split(b"/")
        for part in parts[:-1]:
            dir_id = self.find_dir(dir_id, part)
            if dir_id < 0:
                raise NotFound(path.decode("utf-8", "surrogateescape"))
        found = self.find_dir(dir_id, parts[-1])
        if found >= 0:
            return -1 - found
        row = self.find_file(dir_id, parts[-1])
        if row < 0:
            row = self.find_link(dir_id, parts[-1])
        if row < 0:
            raise NotFound(path.decode("utf-8", "surrogateescape"))
        return row

    def name(self, row: int) -> bytes:
        """A file's own name."""
        begin = int(self.name_ends[row - 1]) if row else 0
        return self.names[begin:int(self.name_ends[row])].tobytes()

    def find_file(self, dir_id: int, name: bytes) -> int:
        """The row of file ``name`` in a directory, or -1 (binary search by bytes)."""
        hi = int(self.dir_hi[dir_id])
        row = find_name(self.name, int(self.dir_lo[dir_id]), hi, name)
        return row if row < hi and self.name(row) == name else -1

    def find_link(self, dir_id: int, name: bytes) -> int:
        """The row that link ``name`` of a directory names, or -1 (binary search by bytes)."""
        hi = int(self.link_hi[dir_id])
        at = find_name(lambda i: self.name(int(self.links[i])), int(self.link_lo[dir_id]), hi, name)
        return int(self.links[at]) if at < hi and self.name(int(self.links[at])) == name else -1

    def n_subdirs(self, dir_id: int) -> int:
        return int(self.sub_hi[dir_id] - self.sub_lo[dir_id])

    def listdir(self, dir_id: int) -> Tuple[List[bytes], List[bytes]]:
        """(subdirectory names, file names) of one directory: subdirectories in name order,
        then files in name order, then links in name order."""
        subdirs = [self.dir_base(d) for d in range(int(self.sub_lo[dir_id]), int(self.sub_hi[dir_id]))]
        return subdirs, [name for _, name in self._entries(dir_id)]

    def _entries(self, dir_id: int) -> List[Tuple[int, bytes]]:
        """(row, name) of a directory's files, then of its links."""
        lo, hi = int(self.dir_lo[dir_id]), int(self.dir_hi[dir_id])
        linked = self.links[int(self.link_lo[dir_id]):int(self.link_hi[dir_id])].tolist()
        return list(zip(range(lo, hi), self._names(lo, hi))) + [(row, self.name(row)) for row in linked]

    def _names(self, lo: int, hi: int) -> List[bytes]:
        if lo >= hi:
            return []
        first = int(self.name_ends[lo - 1]) if lo else 0
        data = self.names[first:int(self.name_ends[hi - 1])].tobytes()
        ends = (self.name_ends[lo:hi].astype(np.int64) - first).tolist()
        return [data[a:b] for a, b in zip([0] + ends[:-1], ends)]

    def dir_path(self, dir_id: int) -> bytes:
        """A directory's path from the root (O(depth))."""
        parts = []
        while dir_id:
            parts.append(self.dir_base(dir_id))
            dir_id = int(self.dir_parent[dir_id])
        return b"/".join(reversed(parts))

    def file_dirs(self, prefix: bytes = b"", links: bool = False) -> Iterator[Tuple[int, bytes]]:
        """(id, path) of every directory holding files (or, with ``links``, links) under a
        directory path, depth first."""
        prefix = prefix.strip(b"/")
        try:
            start = -1 - self.lookup(prefix) if prefix else 0
        except NotFound:
            return
        if start < 0:
            return
        pending = [(start, prefix)]
        while pending:
            dir_id, path = pending.pop()
            if self.dir_hi[dir_id] > self.dir_lo[dir_id] or (links and self.link_hi[dir_id] > self.link_lo[dir_id]):
                yield dir_id, path
            head = path + b"/" if path else b""
            pending.extend((child, head + self.dir_base(child))
                           for child in reversed(range(int(self.sub_lo[dir_id]), int(self.sub_hi[dir_id]))))

    def file_rows(self, prefix: bytes = b"") -> Iterator[Tuple[bytes, int]]:
        """(path, row) of every file and link under a directory path, depth first."""
        for dir_id, path in self.file_dirs(prefix, links=True):
            head = path + b"/" if path else b""
            for row, base in self._entries(dir_id):
                yield head + base, row

    def member(self, row: int) -> zipdir.Member:
        """A file row as Python ints (one conversion instead of one per field)."""
        return zipdir.Member._make(self.files[row].item())

    def path_of(self, row: int) -> bytes:
        dir_id = int(np.searchsorted(self.dir_hi, row, side="right"))
        head = self.dir_path(dir_id)
        return head + b"/" + self.name(row) if head else self.name(row)

    @property
    def conflicts(self) -> List[Conflict]:
        """Paths that differ between archives, the served archive first (built on demand)."""
        a = self.arrays
        paths = a["conflict_paths"].tobytes()
        path_ends = a["conflict_path_ends"].tolist()
        archive_ends = a["conflict_archive_ends"].tolist()
        ids = a["conflict_archives"].tolist()
        return [Conflict(paths[p0:p1].decode("utf-8", "surrogateescape"), [self.archives[i] for i in ids[a0:a1]])
                for p0, p1, a0, a1 in zip([0] + path_ends[:-1], path_ends, [0] + archive_ends[:-1], archive_ends)]
