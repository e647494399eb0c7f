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

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import store, zipdir
from .errors import ArchiveError, NotFound
from .remote import RangeCache, RemoteSource, is_url
from .sources import FileSource

log = logging.getLogger(__name__)

INDEX_VERSION = 3
FILE_DTYPE = zipdir.MEMBER_DTYPE
_RECORD = np.dtype((np.void, FILE_DTYPE.itemsize))  #: a row as opaque bytes: fast to copy and gather


def default_index_dir() -> str:
    """$XDG_CACHE_HOME/bioscanfs, created if missing: by us, so only its owner can write it
    (0700, whatever the umask) and it passes the folder check of ``store.prepare_folder``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(cache, "bioscanfs")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        pass  # an unwritable home: the index is then kept in memory, with one warning
    return folder


def _members_path(index_dir: str, src: FileSource, key: Any) -> str:
    """One archive's index file: its slot is the archive's paths (or URL), so a new key
    for the same archive supersedes the old file."""
    return store.file_path(index_dir, [entry[0] for entry in src.identity], key, ".members")


def _tree_path(index_dir: str, sources: Sequence[FileSource], key: Any, skip_bad: bool,
               allow_incomplete: bool) -> str:
    """The merged tree's index file: its slot is the set of archives and the options."""
    slot = [[entry[0] for entry in src.identity] for src in sources] + [skip_bad, allow_incomplete]
    return store.file_path(index_dir, slot, key, ".tree")


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
        self.duplicates: int = int(extra.get("duplicates", 0))  #: same path and content, repeated
        self.dir_names: np.ndarray = arrays["dir_names"]  #: directory paths end to end (uint8)
        self.dir_ends: np.ndarray = arrays["dir_ends"]
        names = self.dir_names.tobytes()
        ends = self.dir_ends.tolist()
        self.dir_paths = [names[a:b] for a, b in zip([0] + ends[:-1], ends)]
        self.dir_ids = {path: i for i, path in enumerate(self.dir_paths)}
        #: Each directory's parent id (the root's is 0) and its subdirectories' ids, in name
        #: order since paths are sorted; the native engine searches them as they are.
        self.dir_parent = np.zeros(len(self.dir_paths), dtype=np.uint64)
        self.subdir_ids: List[List[int]] = [[] for _ in self.dir_paths]
        for dir_id, path in enumerate(self.dir_paths[1:], start=1):
            parent = self.dir_ids[path.rpartition(b"/")[0]]
            self.dir_parent[dir_id] = parent
            self.subdir_ids[parent].append(dir_id)
        self.subdirs: List[List[bytes]] = [[self.dir_paths[i].rpartition(b"/")[2] for i in ids]
                                           for ids in self.subdir_ids]

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


def open_sources(groups: Sequence[Tuple[Sequence[str], bool]], cache_dir: Optional[str] = None,
                 cache_max: int = 10 << 30) -> List[FileSource]:
    """One FileSource (or RemoteSource, for a URL) per archive: (piece paths, spanned?)
    in a stable order. Remote sources share one disk cache of ranges when ``cache_dir``."""
    cache = RangeCache(cache_dir, cache_max) if cache_dir and any(is_url(p[0]) for p, _ in groups) else None
    return [_open_source(paths, spanned, cache) for paths, spanned in groups]


def _open_source(paths: Sequence[str], spanned: bool, cache: Optional[RangeCache]) -> FileSource:
    if not is_url(paths[0]):
        return FileSource(paths, spanned)
    if len(paths) > 1:
        raise ArchiveError(paths[0], f"remote archives split in {len(paths)} pieces are not supported; "
                                     "mount a local copy")
    return RemoteSource(paths[0], cache)  # type: ignore[return-value]  # the same Source interface


def load_tree(sources: Sequence[FileSource], index_dir: Optional[str],
              on_archive: Optional[Callable[[str], None]] = None,
              skip_bad: bool = False, allow_incomplete: bool = False) -> Tuple[Tree, List[FileSource]]:
    """Map the persisted tree of these archives, building what is missing or stale.

    Returns the tree and the sources it covers (a bad archive is dropped and closed when
    ``skip_bad``, or when it has several pieces and ``allow_incomplete``: its last piece
    may be missing; else its ArchiveError propagates). ``index_dir=None`` keeps all in
    memory, as does an index folder that cannot be written (``Tree.persisted`` says which).
    Raises UntrustedIndexError for an index folder or file another user could have written.
    """
    keys = [[INDEX_VERSION, src.identity] for src in sources]
    tree_key = ["tree", INDEX_VERSION, keys, skip_bad, allow_incomplete]
    path = None
    if index_dir:
        store.prepare_folder(index_dir)
        path = _tree_path(index_dir, sources, tree_key, skip_bad, allow_incomplete)
        store.tidy(index_dir, [path] + [_members_path(index_dir, s, k) for s, k in zip(sources, keys)])
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
    members, kept = _parse_all(sources, keys, index_dir, on_archive, skip_bad, allow_incomplete)
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
               on_archive: Optional[Callable[[str], None]], skip_bad: bool, allow_incomplete: bool
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
    refused: List[ArchiveError] = []
    with ThreadPoolExecutor(max_workers=min(len(sources), os.cpu_count() or 1) or 1) as pool:
        for src, result in zip(sources, pool.map(parse, zip(sources, keys))):
            if isinstance(result, ArchiveError):
                pieces = len(src.identity) > 1
                if skip_bad or (allow_incomplete and pieces):
                    log.warning("skipping %s%s", result, "; a piece may be missing" if pieces else "")
                else:
                    refused.append(result)
                src.close()
                continue
            members.append(result)
            kept.append(src)
    if refused:
        raise refused[0] if len(refused) == 1 else ArchiveError(
            f"{len(refused)} archives", "cannot be used (--skip-bad mounts the rest):\n" +
            "\n".join(str(err) for err in refused))
    return members, kept


def _archive_members(src: FileSource, key: Any, index_dir: Optional[str]) -> zipdir.Members:
    """One archive's parsed central directory, from its own persisted index if valid.

    Its warnings are summarised (``_summary``) before they are logged or saved."""
    path = _members_path(index_dir, src, key) if index_dir else None
    if path:
        cached = store.load(path, key)
        if cached is not None:
            return zipdir.Members(cached["table"], cached["names"], cached["name_ends"],
                                  cached["is_dir"], cached["__extra__"])
    members = zipdir.read_members(src)
    members = members._replace(warnings=_summary(src.name, members.warnings))
    for line in members.warnings:
        log.warning("%s", line)
    if path:
        try:
            store.save(path, key, {"table": members.table, "names": members.names,
                                   "name_ends": members.name_ends, "is_dir": members.is_dir},
                       members.warnings)
        except OSError:
            pass  # load_tree reports the unwritable folder once
    return members


_EXAMPLES = 10          #: an archive's warnings listed one by one; the rest are counted
_EXAMPLE_CHARS = 1000   #: a name can be 64 KiB; an example shows its start


def _summary(archive: str, warnings: List[str]) -> List[str]:
    """The first few of an archive's warnings and one line counting the rest: what the
    log shows and the index stores (an archive of 200,000 bad names is 11 lines, not
    200,000, and its index header stays small enough to be read back)."""
    if len(warnings) > _EXAMPLES + 1:
        warnings = warnings[:_EXAMPLES] + [
            f"{archive}: {len(warnings) - _EXAMPLES:,} more members whose names were skipped or changed"]
    return [line if len(line) <= _EXAMPLE_CHARS else line[:_EXAMPLE_CHARS] + "..." for line in warnings]


def build_tree(members: Sequence[zipdir.Members], archives: Sequence[str]) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Merge the member tables of several archives into the tree arrays (bulk numpy)."""
    warnings: List[str] = [w for m in members for w in m.warnings]
    tables, blobs, all_begins, all_ends, dirs_given = [], [], [], [], set()
    shift = 0
    for m in members:
        name_ends = np.asarray(m.name_ends, dtype=np.int64)
        begins = np.concatenate(([0], name_ends[:-1])).astype(np.int64)[:len(name_ends)]
        table = m.table
        if np.any(m.is_dir):  # explicit directory entries: their paths only, no rows
            is_dir = np.asarray(m.is_dir, dtype=bool)
            dirs_given.update(bytes(m.names[begins[i]:name_ends[i]]) for i in np.flatnonzero(is_dir).tolist())
            table, begins, name_ends = table[~is_dir], begins[~is_dir], name_ends[~is_dir]
        tables.append(table)
        blobs.append(np.asarray(m.names, dtype=np.uint8))
        all_begins.append(begins + shift)
        all_ends.append(name_ends + shift)
        shift += len(blobs[-1])
    # Rows of all archives end to end, as raw records (a plain memory copy).
    records = np.concatenate([t.view(_RECORD) for t in tables]) if tables else np.empty(0, _RECORD)
    archive_of = np.repeat(np.arange(len(tables), dtype=np.uint16), [len(t) for t in tables])
    n_files = len(records)
    begins = np.concatenate(all_begins) if tables else np.empty(0, np.int64)
    name_ends = np.concatenate(all_ends) if tables else np.empty(0, np.int64)
    longest = int((name_ends - begins).max(initial=0))
    blob = np.concatenate(blobs + [np.zeros(max(longest, _SLASH_WINDOW) + 8, np.uint8)])

    cut = _last_slash(blob, begins, name_ends)
    has_dir = cut >= 0
    cut = np.where(has_dir, cut, begins)
    base_begin = np.where(has_dir, cut + 1, begins)
    base_matrix = _fixed_width(blob, base_begin, name_ends)

    group_first, group_of = _group_dirs(blob, begins, cut - begins)
    group_paths = [bytes(blob[begins[i]:cut[i]]) for i in group_first.tolist()]
    all_dirs = {b""} | dirs_given
    for path in group_paths + list(dirs_given):
        while path:
            all_dirs.add(path)
            path = path.rpartition(b"/")[0]
    dir_paths = sorted(all_dirs)
    dir_ids = {p: i for i, p in enumerate(dir_paths)}
    file_dir = np.asarray([dir_ids[p] for p in group_paths], dtype=np.int64)[group_of] if n_files else np.empty(0, np.int64)

    basenames = base_matrix.view(f"S{base_matrix.shape[1]}").ravel() if base_matrix.shape[1] else np.zeros(n_files, "S1")
    order = _order_by_dir_and_name(file_dir, basenames, len(dir_paths))
    basenames, file_dir = basenames[order], file_dir[order]

    def rows(sorted_rows: np.ndarray) -> np.ndarray:
        """Member rows at sorted positions, gathered as raw records, archive column set."""
        picks = order[sorted_rows]
        out = np.take(records, picks).view(FILE_DTYPE)
        out["archive"] = archive_of[picks]
        return out

    # Duplicates: equal (dir, name) neighbours; the first (lowest archive) is kept.
    same = np.zeros(n_files, dtype=bool)
    if n_files > 1:
        same[1:] = (file_dir[1:] == file_dir[:-1]) & (basenames[1:] == basenames[:-1])
    conflicts = _conflicts(rows, basenames, file_dir, same, dir_paths, archives)
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
    files, basenames, file_dir = rows(np.flatnonzero(keep)), basenames[keep], file_dir[keep]
    dir_lo = np.searchsorted(file_dir, ids, side="left").astype(np.uint64)
    dir_hi = np.searchsorted(file_dir, ids, side="right").astype(np.uint64)
    # A folder's mtime is its newest file's, in the whole subtree (children sort after parents).
    dir_mtime = np.zeros(len(dir_paths), dtype=np.int64)
    nonempty = np.flatnonzero(dir_hi > dir_lo)
    if len(nonempty):
        dir_mtime[nonempty] = np.maximum.reduceat(files["mtime"], dir_lo[nonempty].astype(np.int64))
    for dir_id in range(len(dir_paths) - 1, 0, -1):
        parent = dir_ids[dir_paths[dir_id].rpartition(b"/")[0]]
        dir_mtime[parent] = max(dir_mtime[parent], dir_mtime[dir_id])
    dir_blob = b"".join(dir_paths)
    arrays = {
        "files": files, "basenames": basenames,
        "dir_lo": dir_lo, "dir_hi": dir_hi, "dir_mtime": dir_mtime,
        "dir_names": np.frombuffer(dir_blob, dtype=np.uint8),
        "dir_ends": np.cumsum([len(p) for p in dir_paths]).astype(np.uint64),
    }
    conflicting_rows = sum(len(c[1]) - 1 for c in conflicts)
    extra = {"conflicts": conflicts, "warnings": warnings, "total_bytes": int(files["size"].sum()),
             "duplicates": int(same.sum()) - conflicting_rows}
    return arrays, extra


def _fixed_width(blob: np.ndarray, begins: np.ndarray, ends: np.ndarray, align: int = 1) -> np.ndarray:
    """Rows of blob[begin:end], NUL-padded to the longest (rounded up to ``align``).

    ``blob`` must extend at least the row width past the last begin (build_tree pads it).
    """
    lengths = (ends - begins).astype(np.int64)
    width = -(-int(lengths.max(initial=0)) // align) * align
    out = np.empty((len(lengths), width), dtype=np.uint8)
    if width == 0:
        return out
    view = np.lib.stride_tricks.sliding_window_view(blob, width)
    column = np.arange(width)

    def copy(rows: slice) -> None:
        out[rows] = view[begins[rows]] * (column < lengths[rows, None])

    _for_chunks(len(lengths), copy)
    return out


_WORD_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


def _unaligned_words(blob: np.ndarray) -> np.ndarray:
    """A view of blob with one little-endian u64 starting at every byte (stride 1), so a
    word at any offset is one element gather."""
    return np.ndarray(shape=(max(len(blob) - 7, 0),), dtype="<u8", buffer=blob, strides=(1,))


def _word(words: np.ndarray, begins: np.ndarray, lengths: np.ndarray, j: int) -> np.ndarray:
    """Word ``j`` (bytes 8j..8j+7) of every segment, zero past its end."""
    return words[begins + 8 * j] & _WORD_MASKS[np.clip(lengths - 8 * j, 0, 8)]


def _group_dirs(blob: np.ndarray, begins: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(first row of each group, group of each row) for equal segments blob[begin:begin+length].

    Segments are hashed word by word (C speed, no dense matrix), grouped by hash, and the
    grouping is then checked word by word, exactly; a hash collision falls back to
    grouping by sorting the segments themselves.
    """
    if len(begins) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    words = -(-int(lengths.max()) // 8)
    view = _unaligned_words(blob)
    h = lengths.astype(np.uint64)
    prime = np.uint64(0x100000001B3)

    def hash_rows(rows: slice) -> None:
        with np.errstate(over="ignore"):
            for j in range(words):
                h[rows] = (h[rows] ^ _word(view, begins[rows], lengths[rows], j)) * prime
                h[rows] ^= h[rows] >> np.uint64(29)

    _for_chunks(len(begins), hash_rows)
    first, group = _group_keys(h)
    heads = [_word(view, begins[first], lengths[first], j) for j in range(words)]

    def grouped_right(rows: slice) -> bool:
        same = lengths[rows] == lengths[first[group[rows]]]
        for j, head_word in enumerate(heads):
            same &= _word(view, begins[rows], lengths[rows], j) == head_word[group[rows]]
        return bool(same.all())

    if not all(_for_chunks(len(begins), grouped_right)):
        matrix = _fixed_width(blob, begins, begins + lengths)
        matrix = matrix.view(f"V{matrix.shape[1]}").ravel()
        _, first, group = np.unique(matrix, return_index=True, return_inverse=True)
        return first, group.ravel()
    return first, group


def _group_keys(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(a row of each distinct key, group of each row), fast when keys are few.

    The distinct keys are found in a sample, then every row is placed with a binary
    search; keys the sample missed are added and the search repeated.
    """
    distinct = np.unique(keys[::64])
    while True:
        group = np.minimum(np.searchsorted(distinct, keys), len(distinct) - 1)
        missed = distinct[group] != keys
        if not missed.any():
            break
        distinct = np.union1d(distinct, np.unique(keys[missed]))
    first = np.empty(len(distinct), dtype=np.int64)
    first[group] = np.arange(len(keys))
    return first, group


def _for_chunks(n: int, body: Callable[[slice], Any], size: int = 1 << 16) -> List[Any]:
    """Run ``body`` over row slices, on every core (numpy releases the GIL in its loops).

    Slices are small enough that temporaries stay in cache and are reused, not faulted in.
    """
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(body, (slice(lo, min(lo + size, n)) for lo in range(0, n, size))))


_SLASH_WINDOW = 32


def _last_slash(blob: np.ndarray, begins: np.ndarray, ends: np.ndarray, window: int = _SLASH_WINDOW) -> np.ndarray:
    """Blob position of each name's last '/', or -1 when it has none.

    Looks at the last ``window`` bytes of every name at once; names whose slash lies
    further back (a basename longer than the window) are searched one by one.
    """
    last = np.empty(len(begins), dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(blob, window)
    column = np.arange(window, dtype=np.int8)

    def search(rows: slice) -> None:
        b, e = begins[rows], ends[rows]
        starts = np.maximum(e - window, 0)
        # Window columns that belong to the name: [begin - start, end - start), in int8.
        first = np.clip(b - starts, -1, window).astype(np.int8)
        stop = (e - starts).astype(np.int8)
        hit = (view[starts] == ord("/")) & (column >= first[:, None]) & (column < stop[:, None])
        found = hit.any(axis=1)
        last[rows] = np.where(found, starts + window - 1 - np.argmax(hit[:, ::-1], axis=1), -1)
        for i in np.flatnonzero(~found & (e - b > window)).tolist():
            at = bytes(blob[b[i]:e[i]]).rfind(b"/")
            last[rows.start + i] = b[i] + at if at >= 0 else -1

    _for_chunks(len(begins), search)
    return last


def _order_by_dir_and_name(file_dir: np.ndarray, basenames: np.ndarray, n_dirs: int) -> np.ndarray:
    """Order of the files by (directory, name); stable, so archive order stays among equals.

    Files are first grouped by directory (a stable integer sort, radix for few folders),
    then each folder's names are sorted on their own: smaller sorts, and numpy releases
    the GIL, so two threads share them.
    """
    by_dir = np.argsort(file_dir.astype(np.uint16 if n_dirs <= 1 << 16 else np.int64), kind="stable")
    bounds = np.searchsorted(file_dir[by_dir], np.arange(n_dirs + 1))
    names = basenames[by_dir]

    def sort_one(d: int) -> None:
        lo, hi = bounds[d], bounds[d + 1]
        if hi - lo > 1:
            by_dir[lo:hi] = by_dir[lo:hi][np.argsort(names[lo:hi], kind="stable")]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(sort_one, range(n_dirs)))
    return by_dir


def _conflicts(rows: Callable[[np.ndarray], np.ndarray], basenames: np.ndarray, file_dir: np.ndarray,
               same: np.ndarray, dir_paths: List[bytes], archives: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Paths present in several archives with different sizes or CRCs (``rows`` fetches
    the member rows of sorted positions)."""
    dup = np.flatnonzero(same)
    if len(dup) == 0:
        return []
    # Each duplicate row is compared with the first row of its run.
    first = np.maximum.accumulate(np.where(~same, np.arange(len(same)), 0))[dup]
    dups, heads = rows(dup), rows(first)
    differs = np.flatnonzero((dups["size"] != heads["size"]) | (dups["crc32"] != heads["crc32"]))
    out: Dict[int, List[str]] = {}
    for i in differs.tolist():
        out.setdefault(int(first[i]), [archives[int(heads["archive"][i])]]).append(archives[int(dups["archive"][i])])
    result = []
    for head, names in out.items():
        folder = dir_paths[int(file_dir[head])]
        path = (folder + b"/" if folder else b"") + bytes(basenames[head])
        result.append((path.decode("utf-8", "surrogateescape"), names))
    return result
