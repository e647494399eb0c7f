"""The merged tree of all archives: duplicates policy, persistence, lookups and listings.

Owns the tree; knows nothing of how member bytes are decoded or of FUSE.

Layout (all numpy, saved with ``store`` and memory-mapped on the next mount):

- ``files``: one MEMBER_DTYPE row plus ``archive`` per file, grouped by directory and
  sorted by name inside each directory;
- ``basenames``: fixed-width bytes, parallel to ``files``; a lookup is one C binary
  search (``np.searchsorted``) inside the directory's row range;
- ``dir_lo``/``dir_hi``: each directory's row range; ``dir_names``/``dir_ends``: the
  directory paths, few enough (a few thousand for all four packages) to hold as a dict.

Duplicates: the same path in several archives is one file. When their sizes or CRCs
differ, the member of the archive listed first wins (archives are ordered by path) and
the conflict is recorded. A file whose path is also a directory is dropped with a
warning; the directory wins.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import store, zipdir
from .errors import ArchiveError, NotFound
from .sources import FileSource

log = logging.getLogger(__name__)

INDEX_VERSION = 3
FILE_DTYPE = zipdir.MEMBER_DTYPE


def default_index_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "bioscanfs")


def _cache_path(index_dir: str, key: Any, suffix: str) -> str:
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    return os.path.join(index_dir, digest + suffix)


class Conflict(NamedTuple):
    path: str
    archives: List[str]   #: the first one is served


class Tree:
    """Lookups and listings over the merged arrays; no Python object per member."""

    def __init__(self, arrays: Dict[str, Any], archives: List[str], persisted: bool = False) -> None:
        self.archives = archives
        self.persisted = persisted  #: mapped from the index folder (else held in memory)
        self.files: np.ndarray = arrays["files"]
        self.basenames: np.ndarray = arrays["basenames"]
        self.dir_lo: np.ndarray = arrays["dir_lo"]
        self.dir_hi: np.ndarray = arrays["dir_hi"]
        self.dir_mtime: np.ndarray = arrays["dir_mtime"]
        extra = arrays.get("__extra__") or {}
        self.conflicts = [Conflict(c[0], c[1]) for c in extra.get("conflicts", [])]
        self.warnings: List[str] = list(extra.get("warnings", []))
        self.total_bytes: int = int(extra.get("total_bytes", 0))
        self.duplicates: int = int(extra.get("duplicates", 0))  #: same path in several archives
        names = arrays["dir_names"].tobytes()
        ends = arrays["dir_ends"].tolist()
        self.dir_paths = [names[a:b] for a, b in zip([0] + ends[:-1], ends)]
        self.dir_ids = {path: i for i, path in enumerate(self.dir_paths)}
        self.subdirs: List[List[bytes]] = [[] for _ in self.dir_paths]
        for path in self.dir_paths[1:]:
            parent, _, base = path.rpartition(b"/")
            self.subdirs[self.dir_ids[parent]].append(base)

    # A node is a file row (>= 0) or a directory (-1 - dir id).
    def lookup(self, path: bytes) -> int:
        """Resolve a path relative to the root (no leading '/'); raises NotFound."""
        dir_id = self.dir_ids.get(path)
        if dir_id is not None:
            return -1 - dir_id
        parent, _, base = path.rpartition(b"/")
        dir_id = self.dir_ids.get(parent)
        if dir_id is None or len(base) > self.basenames.dtype.itemsize:
            raise NotFound(path.decode("utf-8", "surrogateescape"))
        lo, hi = int(self.dir_lo[dir_id]), int(self.dir_hi[dir_id])
        row = lo + int(np.searchsorted(self.basenames[lo:hi], base))
        if row < hi and self.basenames[row] == base:
            return row
        raise NotFound(path.decode("utf-8", "surrogateescape"))

    def listdir(self, dir_id: int) -> Tuple[List[bytes], List[bytes]]:
        """(subdirectory names, file names) of one directory."""
        lo, hi = int(self.dir_lo[dir_id]), int(self.dir_hi[dir_id])
        return self.subdirs[dir_id], self.basenames[lo:hi].tolist()

    def file_rows(self, prefix: bytes = b"") -> Iterator[Tuple[bytes, int]]:
        """(path, row) of every file under a directory path, in tree order."""
        prefix = prefix.strip(b"/")
        for dir_id, path in enumerate(self.dir_paths):
            if prefix and path != prefix and not path.startswith(prefix + b"/"):
                continue
            lo, hi = int(self.dir_lo[dir_id]), int(self.dir_hi[dir_id])
            head = path + b"/" if path else b""
            for offset, base in enumerate(self.basenames[lo:hi].tolist()):
                yield head + base, lo + offset

    def member(self, row: int) -> zipdir.Member:
        """A file row as Python ints (one conversion instead of one per field)."""
        return zipdir.Member._make(self.files[row].item())

    def path_of(self, row: int) -> bytes:
        dir_id = int(np.searchsorted(self.dir_hi, row, side="right"))
        head = self.dir_paths[dir_id]
        base = self.basenames[row]
        return head + b"/" + base if head else base


def open_sources(groups: Sequence[Tuple[Sequence[str], bool]]) -> List[FileSource]:
    """One FileSource per archive: (piece paths, spanned?) in a stable order."""
    return [FileSource(paths, spanned) for paths, spanned in groups]


def load_tree(sources: Sequence[FileSource], index_dir: Optional[str],
              on_archive: Optional[Callable[[str], None]] = None,
              skip_bad: bool = False) -> Tuple[Tree, List[FileSource]]:
    """Map the persisted tree of these archives, building what is missing or stale.

    Returns the tree and the sources it covers (a bad archive is dropped and closed when
    ``skip_bad``, else its ArchiveError propagates). ``index_dir=None`` keeps all in
    memory, as does an index folder that cannot be written (``Tree.persisted`` says which).
    """
    keys = [[INDEX_VERSION, src.identity] for src in sources]
    tree_key = ["tree", INDEX_VERSION, keys, skip_bad]
    path = _cache_path(index_dir, tree_key, ".tree") if index_dir else None
    cached = store.load(path, tree_key) if path else None
    if cached is not None:
        try:
            kept = [s for s in sources if s.name in set(cached["__extra__"]["kept"])]
            tree = Tree(cached, [s.name for s in kept], persisted=True)
        except (KeyError, ValueError, IndexError, TypeError):
            log.warning("index %s is inconsistent; rebuilding it", path)
        else:
            for src in sources:
                if src not in kept:
                    src.close()
            return tree, kept
    members, kept = _parse_all(sources, keys, index_dir, on_archive, skip_bad)
    arrays, extra = build_tree(members, [s.name for s in kept])
    extra["kept"] = [s.name for s in kept]
    del members
    if path:
        try:
            store.save(path, tree_key, arrays, extra)
        except OSError as err:
            log.warning("cannot write the index to %s (%s); keeping it in memory", index_dir, err.strerror or err)
        else:
            mapped = store.load(path, tree_key)
            if mapped is not None:
                return Tree(mapped, extra["kept"], persisted=True), kept
    arrays["__extra__"] = extra
    return Tree(arrays, extra["kept"]), kept


def _parse_all(sources: Sequence[FileSource], keys: List[Any], index_dir: Optional[str],
               on_archive: Optional[Callable[[str], None]], skip_bad: bool
               ) -> Tuple[List[zipdir.Members], List[FileSource]]:
    """Every archive's member table; numpy releases the GIL, so archives parse in parallel."""
    def parse(job: Tuple[FileSource, Any]) -> Union[zipdir.Members, ArchiveError]:
        try:
            return _archive_members(job[0], job[1], index_dir)
        except ArchiveError as err:
            return err
        finally:
            if on_archive:
                on_archive(job[0].name)

    members: List[zipdir.Members] = []
    kept: List[FileSource] = []
    with ThreadPoolExecutor(max_workers=min(len(sources), os.cpu_count() or 1) or 1) as pool:
        for src, result in zip(sources, pool.map(parse, zip(sources, keys))):
            if isinstance(result, ArchiveError):
                if not skip_bad:
                    raise result
                log.warning("skipping %s", result)
                src.close()
                continue
            members.append(result)
            kept.append(src)
    return members, kept


def _archive_members(src: FileSource, key: Any, index_dir: Optional[str]) -> zipdir.Members:
    """One archive's parsed central directory, from its own persisted index if valid."""
    path = _cache_path(index_dir, key, ".members") if index_dir else None
    if path:
        cached = store.load(path, key)
        if cached is not None:
            return zipdir.Members(cached["table"], cached["names"], cached["name_ends"],
                                  cached["is_dir"], cached["__extra__"])
    members = zipdir.read_members(src, warn=log.warning)
    if path:
        try:
            store.save(path, key, {"table": members.table, "names": members.names,
                                   "name_ends": members.name_ends, "is_dir": members.is_dir},
                       members.warnings)
        except OSError:
            pass  # load_tree reports the unwritable folder once
    return members


def build_tree(members: Sequence[zipdir.Members], archives: Sequence[str]) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Merge the member tables of several archives into the tree arrays (bulk numpy)."""
    warnings: List[str] = [w for m in members for w in m.warnings]
    tables, blobs, ends, dirs_given = [], [], [], set()
    shift = 0
    for m in members:
        is_dir = np.asarray(m.is_dir, dtype=bool)
        name_ends = np.asarray(m.name_ends, dtype=np.int64)
        begins = np.concatenate(([0], name_ends[:-1]))
        for i in np.flatnonzero(is_dir).tolist():
            dirs_given.add(bytes(m.names[begins[i]:name_ends[i]]))
        rows = m.table[~is_dir]
        tables.append(rows)
        blob = np.asarray(m.names, dtype=np.uint8)
        blobs.append(blob)
        ends.append(np.stack([begins[~is_dir], name_ends[~is_dir]], axis=1) + shift)
        shift += len(blob)
    files = np.concatenate(tables) if tables else np.empty(0, FILE_DTYPE)
    files["archive"] = np.repeat(np.arange(len(tables), dtype=np.uint16), [len(t) for t in tables])
    spans = np.concatenate(ends) if ends else np.empty((0, 2), np.int64)
    begins, name_ends = spans[:, 0], spans[:, 1]
    longest = int((name_ends - begins).max(initial=0))
    blob = np.concatenate(blobs + [np.zeros(longest + 8, np.uint8)])

    # Split each path at its last '/'.
    slashes = np.flatnonzero(blob == ord("/"))
    last = np.searchsorted(slashes, name_ends, side="left") - 1
    has_dir = (last >= 0) & (slashes[np.maximum(last, 0)] >= begins) if len(slashes) else np.zeros(len(files), bool)
    cut = np.where(has_dir, slashes[np.maximum(last, 0)] if len(slashes) else 0, begins)
    base_begin = np.where(has_dir, cut + 1, begins)
    dir_matrix = _fixed_width(blob, begins, cut, align=8)
    base_matrix = _fixed_width(blob, base_begin, name_ends)

    # Group files by directory: hash the directory rows, then check the grouping exactly.
    group_first, group_of = _group_rows(dir_matrix)
    group_paths = [dir_matrix[i].tobytes().rstrip(b"\x00") for i in group_first.tolist()]
    all_dirs = {b""} | dirs_given
    for path in group_paths + list(dirs_given):
        while path:
            all_dirs.add(path)
            path = path.rpartition(b"/")[0]
    dir_paths = sorted(all_dirs)
    dir_ids = {p: i for i, p in enumerate(dir_paths)}
    file_dir = np.asarray([dir_ids[p] for p in group_paths], dtype=np.int64)[group_of] if len(files) else np.empty(0, np.int64)

    basenames = base_matrix.view(f"S{base_matrix.shape[1]}").ravel() if base_matrix.shape[1] else np.zeros(len(files), "S1")
    # One stable sort on (directory id big-endian, name) keeps archive order among equals.
    keyed = np.empty((len(files), 4 + basenames.itemsize), dtype=np.uint8)
    keyed[:, :4] = file_dir.astype(">u4").view(np.uint8).reshape(-1, 4)
    keyed[:, 4:] = base_matrix
    order = np.argsort(keyed.view(f"S{keyed.shape[1]}").ravel(), kind="stable")
    del keyed
    files, basenames, file_dir = _take(files, order), basenames[order], file_dir[order]

    # Duplicates: equal (dir, name) neighbours; the first (lowest archive) is kept.
    same = np.zeros(len(files), dtype=bool)
    if len(files) > 1:
        same[1:] = (file_dir[1:] == file_dir[:-1]) & (basenames[1:] == basenames[:-1])
    conflicts = _conflicts(files, basenames, file_dir, same, dir_paths, archives)
    keep = ~same
    ids = np.arange(len(dir_paths))
    # A file that is also a directory yields to the directory.
    dir_lo = np.searchsorted(file_dir, ids, side="left")
    dir_hi = np.searchsorted(file_dir, ids, side="right")
    for path in dir_paths[1:]:
        parent, _, base = path.rpartition(b"/")
        lo, hi = dir_lo[dir_ids[parent]], dir_hi[dir_ids[parent]]
        row = lo + int(np.searchsorted(basenames[lo:hi], base))
        while row < hi and basenames[row] == base:
            if keep[row]:
                warnings.append(f"{path.decode('utf-8', 'surrogateescape')}: both a file and a directory; the file is hidden")
            keep[row] = False
            row += 1
    files, basenames, file_dir = files[keep], basenames[keep], file_dir[keep]
    dir_lo = np.searchsorted(file_dir, ids, side="left").astype(np.uint64)
    dir_hi = np.searchsorted(file_dir, ids, side="right").astype(np.uint64)
    newest = int(files["mtime"].max()) if len(files) else 0
    dir_mtime = np.full(len(dir_paths), newest, dtype=np.int64)
    nonempty = np.flatnonzero(dir_hi > dir_lo)
    if len(nonempty):
        dir_mtime[nonempty] = np.maximum.reduceat(files["mtime"], dir_lo[nonempty].astype(np.int64))
    dir_blob = b"".join(dir_paths)
    arrays = {
        "files": files, "basenames": basenames,
        "dir_lo": dir_lo, "dir_hi": dir_hi, "dir_mtime": dir_mtime,
        "dir_names": np.frombuffer(dir_blob, dtype=np.uint8),
        "dir_ends": np.cumsum([len(p) for p in dir_paths]).astype(np.uint64),
    }
    extra = {"conflicts": conflicts, "warnings": warnings, "total_bytes": int(files["size"].sum()),
             "duplicates": int(same.sum())}
    return arrays, extra


def _fixed_width(blob: np.ndarray, begins: np.ndarray, ends: np.ndarray, align: int = 1) -> np.ndarray:
    """Rows of blob[begin:end], NUL-padded to the longest (rounded up to ``align``).

    ``blob`` must extend at least the row width past the last begin (build_tree pads it).
    """
    lengths = (ends - begins).astype(np.int64)
    width = -(-int(lengths.max(initial=0)) // align) * align
    if width == 0:
        return np.zeros((len(lengths), 0), dtype=np.uint8)
    rows = np.lib.stride_tricks.sliding_window_view(blob, width)[begins]
    rows *= np.arange(width) < lengths[:, None]
    return rows


def _take(table: np.ndarray, order: np.ndarray) -> np.ndarray:
    """table[order] for a structured array, copied as raw records (several times faster)."""
    raw = table.view(np.dtype((np.void, table.dtype.itemsize)))
    return raw[order].view(table.dtype)


def _group_rows(matrix: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(first row of each group, group of each row) for equal rows of a byte matrix.

    Rows are hashed to 64 bits column by column (C speed), grouped by hash, and the
    grouping is then checked exactly; on a collision the rows are grouped by sorting.
    """
    if len(matrix) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    words = matrix.view("<u8")
    h = np.zeros(len(matrix), dtype=np.uint64)
    prime = np.uint64(1099511628211)
    with np.errstate(over="ignore"):
        for column in range(words.shape[1]):
            h = (h ^ words[:, column]) * prime
    _, first, group = np.unique(h, return_index=True, return_inverse=True)
    group = group.ravel()
    for lo in range(0, len(matrix), 1 << 18):
        if not np.array_equal(matrix[lo:lo + (1 << 18)], matrix[first[group[lo:lo + (1 << 18)]]]):
            rows = matrix.view(f"V{matrix.shape[1]}").ravel() if matrix.shape[1] else np.zeros(len(matrix), "V1")
            _, first, group = np.unique(rows, return_index=True, return_inverse=True)
            return first, group.ravel()
    return first, group


def _conflicts(files: np.ndarray, basenames: np.ndarray, file_dir: np.ndarray, same: np.ndarray,
               dir_paths: List[bytes], archives: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Paths present in several archives with different sizes or CRCs."""
    dup = np.flatnonzero(same)
    if len(dup) == 0:
        return []
    # Each duplicate row is compared with the first row of its run.
    first = np.maximum.accumulate(np.where(~same, np.arange(len(same)), 0))[dup]
    differs = (files["size"][dup] != files["size"][first]) | (files["crc32"][dup] != files["crc32"][first])
    out: Dict[int, List[str]] = {}
    for row, head in zip(dup[differs].tolist(), first[differs].tolist()):
        out.setdefault(head, [archives[int(files["archive"][head])]]).append(archives[int(files["archive"][row])])
    result = []
    for head, names in out.items():
        folder = dir_paths[int(file_dir[head])]
        path = (folder + b"/" if folder else b"") + bytes(basenames[head])
        result.append((path.decode("utf-8", "surrogateescape"), names))
    return result
