"""The merged tree's arrays: their layout, their checks, and lookups and listings over them.

Owns what the arrays mean once built; knows nothing of how they are built (``merge``),
saved (``index``, ``store``) or served (``fs``, ``nativefs``). No Python object per member.

Layout (all numpy; ``index`` saves them and maps them back on the next mount):

- ``files``: one FILE_DTYPE row per file, each directory's rows one range
  ``dir_lo``..``dir_hi`` sorted by name (bytes); a tree built whole has them in directory
  order, one range after the other. A tree extended by a re-index (``index``) has the rows
  of the folders it merged again after the others, and their earlier rows are still
  there, in no range: nothing reads them, but they are checked as the rest (``n_files``
  counts the files shown);
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

An index folder is untrusted input: every value a lookup or a read will trust is bounded
before it is used, in two steps (the C engine checks the same bounds again, its own way):

- up front (``check_tables``), what is small and what every request trusts: element
  types, lengths, the directory tables, the conflict lists;
- the bulk (``files``, ``name_ends``, ``names``, ``links``: LAZY_COLUMNS) in units of
  UNIT_ROWS rows (or links), the first time a request reads one (``Tree.rows_ready``):
  the CRC-32 of its bytes, then the same bounds as up front, restricted to its rows. A
  unit that fails makes that request fail (DamagedIndex, EIO) and removes the index
  file, once, with one log line: the next mount builds it again. So a mount reads only
  the pages its requests need (docs/scale.md), and no wrong byte is served.

``check`` runs both steps on every row, for tables held whole (tests, an earlier tree
that a re-index copies rows from).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import zipdir
from .bulk import for_chunks
from .errors import DamagedIndex, NotFound, SourceError
from .names import NAME_MAX

log = logging.getLogger(__name__)

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
#: The columns with one element per file row (and the names those end in): saved in files
#: of their own (``store``), so that a re-index can extend them where it merges only some
#: folders again (``index``) and write only the rows it adds.
ROW_COLUMNS = ("files", "names", "name_ends")
#: Links are 32-bit rows: a tree with views holds fewer files than this.
LINKED_FILES_MAX = 1 << 32
#: The columns checked unit by unit on first use (see the module's docstring); the store
#: checks the others' CRCs when it maps them. ``links`` (views only) is up to ~3 a file.
LAZY_COLUMNS = ("files", "name_ends", "names", "links")
#: Rows checked at once: 3 MiB of ``files``, 256 KiB of ``name_ends`` and about 1 MiB of
#: names for BIOSCAN-5M (a millisecond or two of CRC and bounds); a listing of an
#: 18,000-file folder checks one or two units. Saved in the tree's extra (``unit_rows``),
#: and a tree's own value is used: a power of two from 1 to 2^24.
UNIT_ROWS = 1 << 16
_UNIT_ROWS_MAX = 1 << 24


def check_archive_count(count: int) -> None:
    """Refuse more archives than the ``archive`` column numbers (before they are opened)."""
    if count > MAX_ARCHIVES:
        raise SourceError(f"{count:,} archives: at most {MAX_ARCHIVES:,} can be mounted together")


class Conflict(NamedTuple):
    path: str
    archives: List[str]   #: the first one is served


class BadTables(ValueError):
    """The arrays break a bound that lookups or reads rely on (a damaged or forged index)."""


def check_tables(arrays: Dict[str, Any], archive_sizes: Sequence[int]) -> int:
    """Raise BadTables unless the bounds checked up front hold; returns the tree's rows
    per unit (see the module's docstring for what is checked when).

    Up front: element types, lengths against each other, directory names (1..255 bytes,
    no '/' or NUL), the directory tree (parents before children, a row range per
    directory inside the files, no row in two), and the conflict lists. Order within a directory
    is never checked: a wrong order only makes lookups miss.
    """
    for name, dtype in ARRAY_TYPES.items():
        if name not in arrays or arrays[name].dtype != dtype or arrays[name].ndim != 1:
            raise BadTables(f"{name}: missing or not of type {dtype}")
    files, n_dirs = arrays["files"], len(arrays["dir_lo"])
    if n_dirs < 1 or any(len(arrays[k]) != n_dirs for k in ("dir_hi", "dir_mtime", "dir_parent", "dir_ends")):
        raise BadTables("directory tables disagree in length")
    if len(arrays["name_ends"]) != len(files) or (not len(files) and len(arrays["names"])):
        raise BadTables("name_ends: not one per file")
    _check_dir_names(arrays["dir_names"], arrays["dir_ends"])
    parent = arrays["dir_parent"]
    if parent[0] != 0 or (parent[1:] >= np.arange(1, n_dirs, dtype=np.uint64)).any() or (np.diff(parent[1:]) < 0).any():
        raise BadTables("dir_parent: not breadth-first order")
    _check_row_ranges(arrays["dir_lo"], arrays["dir_hi"], len(files))
    for ends, blob in (("conflict_path_ends", "conflict_paths"), ("conflict_archive_ends", "conflict_archives")):
        if (np.diff(arrays[ends].astype(np.int64), prepend=0) < 0).any() or \
                (int(arrays[ends][-1]) if len(arrays[ends]) else 0) != len(arrays[blob]):
            raise BadTables(f"{ends}: the ends do not tile {blob}")
    if len(arrays["conflict_path_ends"]) != len(arrays["conflict_archive_ends"]) or \
            (arrays["conflict_archives"] >= len(archive_sizes)).any():
        raise BadTables("conflicts: lists disagree or name an archive that is not there")
    _check_links(arrays)
    unit_rows = (arrays.get("__extra__") or {}).get("unit_rows", UNIT_ROWS)
    if type(unit_rows) is not int or not 0 < unit_rows <= _UNIT_ROWS_MAX or unit_rows & (unit_rows - 1):
        raise BadTables("unit_rows: not a power of two up to 2^24")
    return unit_rows


def _check_row_ranges(lo: np.ndarray, hi: np.ndarray, n_files: int) -> None:
    """Each directory's rows are a range inside the files, and no row is in two ranges."""
    if (lo > hi).any() or (hi > np.uint64(n_files)).any():
        raise BadTables("dir_lo/dir_hi: a row range is not inside the files")
    by_start = _by_first_row(lo, hi)
    if (lo[by_start[1:]] < hi[by_start[:-1]]).any():
        raise BadTables("dir_lo/dir_hi: row ranges overlap")


def _by_first_row(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The directories that hold rows, by their first row."""
    used = np.flatnonzero(hi > lo)
    return used[np.argsort(lo[used], kind="stable")]


def check(arrays: Dict[str, Any], archive_sizes: Sequence[int]) -> None:
    """Raise BadTables unless every bound the lookups and reads rely on holds, on every
    row: ``check_tables`` and every unit's check (CRCs are the store's, not checked here)."""
    check_tables(arrays, archive_sizes)
    sizes = np.asarray(archive_sizes, dtype=np.uint64)
    for kind in UNIT_KINDS.values():
        problems = for_chunks(_count(arrays, kind), lambda rows, kind=kind: kind.problem(
            arrays, sizes, _no_crc, rows.start, rows.stop), UNIT_ROWS)
        for problem in problems:
            if problem:
                raise BadTables(problem)


def _no_crc(name: str, lo: int, hi: int) -> bool:
    return True


#: Checks a byte range of a column against its CRCs: (column, lo, hi) -> matches.
Verify = Callable[[str, int, int], bool]


def _file_rows_problem(arrays: Dict[str, Any], sizes: np.ndarray, verify: Verify, lo: int, hi: int
                       ) -> Optional[str]:
    """What is wrong with file rows lo..hi (hi > lo), or None: the CRCs of their bytes in
    each LAZY_COLUMN, then the bounds a read or lookup trusts. The first name's start is
    the end before ``lo``, whose CRC is checked with the rest (not trusted)."""
    files, ends, names = arrays["files"], arrays["name_ends"], arrays["names"]
    width = files.dtype.itemsize
    if not (verify("files", lo * width, hi * width) and verify("name_ends", max(lo - 1, 0) * 4, hi * 4)):
        return "a block of files or name_ends does not match its CRC-32"
    first, last = (int(ends[lo - 1]) if lo else 0), int(ends[hi - 1])
    if not first <= last <= len(names) or (hi == len(files) and last != len(names)):
        return "names: the ends do not tile the names"
    if not verify("names", first, last):
        return "a block of names does not match its CRC-32"
    if not _names_ok(names, ends, slice(lo, hi)):
        return (f"names: a name is empty, longer than {NAME_MAX} bytes, holds '/' or NUL, "
                "or is '.' or '..'")
    if not _rows_ok(files[lo:hi], sizes):
        return ("files: a row names an archive that is not there, lies past its end, "
                "or declares a size of 2^63 bytes or more")
    return None


def _links_problem(arrays: Dict[str, Any], sizes: np.ndarray, verify: Verify, lo: int, hi: int) -> Optional[str]:
    """What is wrong with links lo..hi (hi > lo), or None: their CRCs, then each names a
    file row that is there (the row itself is checked as a ``files`` unit when read)."""
    if not verify("links", lo * 4, hi * 4):
        return "a block of links does not match its CRC-32"
    if (arrays["links"][lo:hi] >= len(arrays["files"])).any():
        return "links: a link names a file that is not there"
    return None


class UnitKind(NamedTuple):
    """Rows of some bulk columns checked together on first use."""

    rows: str   #: the column with one element per row (absent: none, as ``links`` without views)
    #: what is wrong with rows lo..hi (hi > lo): (arrays, archive sizes, verify, lo, hi) -> problem or None
    problem: Callable[[Dict[str, Any], np.ndarray, Verify, int, int], Optional[str]]


#: The kinds of units, by name. A new bulk column plugs in as one more kind (its CRCs
#: come with it when it is in LAZY_COLUMNS); _nativefs.c's UNIT_KINDS mirror these.
UNIT_KINDS = {"files": UnitKind("files", _file_rows_problem), "links": UnitKind("links", _links_problem)}


def _count(arrays: Dict[str, Any], kind: UnitKind) -> int:
    """Rows of a kind of unit in a tree."""
    return len(arrays[kind.rows]) if kind.rows in arrays else 0


def _check_links(arrays: Dict[str, Any]) -> None:
    """With views: the link runs tile ``links`` in directory order (as the row ranges of a
    tree built whole tile ``files``; a views tree is never extended). Order is not
    checked; the links themselves are a kind of unit (UNIT_KINDS)."""
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


#: Bytes a name may not hold.
_BAD_BYTES = (b"\0", b"/")


def _names_ok(blob: np.ndarray, ends: np.ndarray, rows: slice, root: bool = False) -> bool:
    """Each name that ``ends[rows]`` cuts from ``blob`` is one path component the kernel
    takes: 1..255 bytes, no '/' or NUL, not '.' or '..' (no name leads out of the mount).
    With ``root``, the first name (the root's) is not checked. The caller has bounded the
    last end of ``rows`` by the blob; lengths of at least 1 then bound every other."""
    first = int(ends[rows.start - 1]) if rows.start else 0
    stop = ends[rows].astype(np.int64)
    lengths = np.diff(stop, prepend=first)
    if root and rows.start == 0:
        lengths = lengths[1:]
        stop = stop[1:]
    if ((lengths < 1) | (lengths > NAME_MAX)).any() or _holds_bad_byte(blob[first:int(ends[rows.stop - 1])]):
        return False
    dots = np.flatnonzero(lengths <= 2)
    return not ((blob[stop[dots] - lengths[dots]] == ord(".")) & (blob[stop[dots] - 1] == ord("."))).any()


def _holds_bad_byte(part: np.ndarray) -> bool:
    """Whether NUL or '/' is in ``part``: searched in a copy as bytes (memchr), 10x faster
    than a table lookup per byte, which cost a remount with views 40 ms (740 K folders)."""
    data = part.tobytes()
    return any(bad in data for bad in _BAD_BYTES)


def _check_dir_names(blob: np.ndarray, ends: np.ndarray) -> None:
    """Directory names as ``_names_ok`` says, the root's empty; the ends tile the blob."""
    if int(ends[-1]) != len(blob) or ends[0] != 0 or not _names_ok(blob, ends, slice(0, len(ends)), root=True):
        raise BadTables(f"dir_names: the ends do not tile the names, or a name is empty, longer than "
                        f"{NAME_MAX} bytes, holds '/' or NUL, or is '.' or '..'")


def _rows_ok(files: np.ndarray, sizes: np.ndarray) -> bool:
    """Every row's archive is there and its data lies inside it; sizes fit st_size."""
    archive = files["archive"].astype(np.intp)
    if (archive >= len(sizes)).any():
        return False
    room = sizes[archive]
    offset = files["header_offset"]
    return not ((offset > room) | (files["compressed_size"] > room - np.minimum(offset, room))
                | (files["size"] >= np.uint64(zipdir.SIZE_LIMIT))).any()


def find_name(name_of: Callable[[int], bytes], lo: int, hi: int, name: bytes) -> int:
    """The first row in lo..hi whose name is not below ``name`` (rows sorted by name bytes)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if name_of(mid) < name:
            lo = mid + 1
        else:
            hi = mid
    return lo


_UNKNOWN, _GOOD, _BAD = 0, 1, 2


class Tree:
    """Lookups and listings over the merged arrays.

    Raises BadTables when the up-front checks fail (``check_tables``). Every method that
    reads file rows, names or links checks their units first (``rows_ready``), and raises
    DamagedIndex when one fails; code that reads a LAZY_COLUMN itself calls ``rows_ready``
    or ``verify_all`` first.
    """

    def __init__(self, arrays: Dict[str, Any], archives: List[str], archive_sizes: Sequence[int],
                 persisted: bool = False) -> None:
        unit_rows = check_tables(arrays, archive_sizes)
        self.arrays = {name: arrays[name] for name in (*ARRAY_TYPES, *VIEW_TYPES) if name in arrays}
        self.archives = archives
        self.persisted = persisted  #: mapped from the index folder (else held in memory)
        #: the CRCs of LAZY_COLUMNS (a ``store.Blocks``), or None for tables held whole
        self.blocks = arrays.get("__blocks__")
        self.unit_rows = unit_rows
        self._shift = unit_rows.bit_length() - 1
        self._sizes = np.asarray(archive_sizes, dtype=np.uint64)
        self._states = {name: np.zeros(-(-_count(arrays, kind) // unit_rows), np.uint8)
                        for name, kind in UNIT_KINDS.items()}
        self._problems: Dict[Tuple[str, int], str] = {}
        self._reported = threading.Lock()
        self._damage_reported = False
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
        #: files shown (rows in a directory's range; ``files`` may hold more: the module's docstring)
        self.n_files = int((self.dir_hi - self.dir_lo).sum())
        self._by_start: Optional[np.ndarray] = None   # ``dirs_by_first_row``, once asked
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

    # -- checks on first use ----------------------------------------------------------
    def rows_ready(self, lo: int, hi: int, kind: str = "files") -> None:
        """Check the units of rows lo..hi of a kind (UNIT_KINDS) that are not checked yet;
        raises DamagedIndex when one fails (now or before)."""
        if hi <= lo:
            return
        states = self._states[kind]
        first, last = lo >> self._shift, (hi - 1) >> self._shift
        if states[first] == _GOOD and (first == last or (states[first:last + 1] == _GOOD).all()):
            return
        for unit in range(first, last + 1):
            self._check_unit(kind, unit)

    def verify_all(self) -> None:
        """Check every unit (for code that reads whole columns: reports, a re-index)."""
        for kind, states in self._states.items():
            for_chunks(len(states), lambda units, kind=kind: [self._check_unit(kind, u)
                                                              for u in range(units.start, units.stop)], 1)

    def _check_unit(self, kind: str, unit: int) -> None:
        states = self._states[kind]
        if states[unit] == _UNKNOWN:
            lo = unit << self._shift
            hi = min(lo + self.unit_rows, _count(self.arrays, UNIT_KINDS[kind]))
            verify = self.blocks.verify if self.blocks is not None else _no_crc
            problem = UNIT_KINDS[kind].problem(self.arrays, self._sizes, verify, lo, hi)
            if problem:
                self._problems[kind, unit] = problem
            states[unit] = _BAD if problem else _GOOD
        if states[unit] == _BAD:
            problem = self._problems[kind, unit]
            self.report_damage(problem)
            raise DamagedIndex(self.where, problem)

    @property
    def where(self) -> str:
        """The index file the tree is mapped from, for messages."""
        return getattr(self.blocks, "path", None) or "(held in memory)"

    def report_damage(self, problem: str) -> None:
        """Log a failed check once, and remove the index file so that the next mount
        builds it again (the C engine calls this too). Why remove, not rename: a renamed
        file would need its own rule to be tidied, and nothing reads it again."""
        with self._reported:
            if self._damage_reported:
                return
            self._damage_reported = True
        log.error("index %s is damaged (%s): what needs that part gets EIO; removed, the next mount "
                  "builds it again", self.where, problem)
        if self.blocks is not None:
            self.blocks.discard()

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
        """A file's own name. Not through ``name_span``: a binary search calls this about 15
        times a lookup, and the span's arrays doubled its cost (1.8 us against 0.85)."""
        self.rows_ready(row, row + 1)
        begin = int(self.name_ends[row - 1]) if row else 0
        return self.names[begin:int(self.name_ends[row])].tobytes()

    def name_span(self, lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
        """The own names of file rows lo..hi (checked), end to end, and where each ends in
        them (int64, from 0): one slice of ``names``, no copy."""
        if hi <= lo:
            return self.names[:0], np.zeros(0, np.int64)
        self.rows_ready(lo, hi)
        first = int(self.name_ends[lo - 1]) if lo else 0
        ends = self.name_ends[lo:hi].astype(np.int64) - first
        return self.names[first:first + int(ends[-1])], ends

    def find_file(self, dir_id: int, name: bytes) -> int:
        """The row of file ``name`` in a directory, or -1 (binary search by bytes)."""
        hi = int(self.dir_hi[dir_id])
        row = find_name(self.name, int(self.dir_lo[dir_id]), hi, name)
        return row if row < hi and self.name(row) == name else -1

    def link(self, i: int) -> int:
        """The file row that link ``i`` names (its unit checked first)."""
        self.rows_ready(i, i + 1, "links")
        return int(self.links[i])

    def find_link(self, dir_id: int, name: bytes) -> int:
        """The row that link ``name`` of a directory names, or -1 (binary search by bytes)."""
        hi = int(self.link_hi[dir_id])
        at = find_name(lambda i: self.name(self.link(i)), int(self.link_lo[dir_id]), hi, name)
        return self.link(at) if at < hi and self.name(self.link(at)) == name else -1

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
        first, last = int(self.link_lo[dir_id]), int(self.link_hi[dir_id])
        self.rows_ready(first, last, "links")
        linked = self.links[first:last].tolist()
        return list(zip(range(lo, hi), self._names(lo, hi))) + [(row, self.name(row)) for row in linked]

    def _names(self, lo: int, hi: int) -> List[bytes]:
        names, ends = self.name_span(lo, hi)
        data, ends = names.tobytes(), ends.tolist()
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
        self.rows_ready(row, row + 1)
        return zipdir.Member._make(self.files[row].item())

    def dirs_by_first_row(self) -> np.ndarray:
        """The directories that hold files, in the order of their rows in ``files`` (which is
        directory order unless the tree was extended)."""
        if self._by_start is None:
            self._by_start = _by_first_row(self.dir_lo, self.dir_hi)
        return self._by_start

    def shown(self) -> np.ndarray:
        """Which rows of ``files`` are in a directory's range (all but those an extended
        tree no longer uses), for code that reads whole columns."""
        if self.n_files == len(self.files):   # disjoint ranges inside the files (check_tables): all of them
            return np.ones(len(self.files), bool)
        folders = self.dirs_by_first_row()
        edges = np.zeros(len(self.files) + 1, np.int64)
        edges[self.dir_lo[folders].astype(np.intp)] += 1
        edges[self.dir_hi[folders].astype(np.intp)] -= 1   # a range may end where the next starts
        return np.cumsum(edges[:-1]) > 0

    def path_of(self, row: int) -> bytes:
        """The path of a file row that is in a directory's range."""
        folders = self.dirs_by_first_row()
        dir_id = int(folders[int(np.searchsorted(self.dir_lo[folders], row, side="right")) - 1])
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
