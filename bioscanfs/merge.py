"""Merging the member tables of several archives into one tree's arrays (bulk numpy).

Owns the duplicates policy and the tree's order (see ``tree`` for the layout); knows
nothing of persistence, decoding or FUSE.

Duplicates: the same path in several archives is one file. When their sizes or CRCs
differ, the member of the archive listed first wins (archives are ordered by path) and
the conflict is recorded; inside one archive the last entry wins, as with zipfile and
unzip. A file whose path is also a directory is hidden with a warning; the directory wins.

Cost: every step is O(total name bytes) or O(members x a small constant): names are
handled as one blob with begin/end offsets, never as a matrix as wide as the longest
name, so one hostile 4 KB name does not cost 4 KB for every member.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Sequence, Set, Tuple

import numpy as np

from . import zipdir
from .bulk import for_chunks
from .tree import ARRAY_TYPES, FILE_DTYPE, find_name

_RECORD = np.dtype((np.void, FILE_DTYPE.itemsize))  #: a row as opaque bytes: fast to copy and gather
#: Bytes of each name that numpy sorts on; longer names that tie on them are ordered in Python.
SORT_PREFIX = 24
#: Warnings listed one by one, in the log and in the index; the rest are counted.
MAX_WARNINGS = 10
#: A warning can quote a 64 KiB name; it is cut to this.
MAX_WARNING_CHARS = 1000


def summarise(lines: List[str], rest: Callable[[int], str], keep: int = MAX_WARNINGS) -> List[str]:
    """The first ``keep`` lines, each cut to MAX_WARNING_CHARS, and one line ``rest(n)``
    counting the other n: what the log shows and the index stores."""
    if len(lines) > keep + 1:
        lines = lines[:keep] + [rest(len(lines) - keep)]
    return [line if len(line) <= MAX_WARNING_CHARS else line[:MAX_WARNING_CHARS] + "..." for line in lines]


def build_tree(members: Sequence[zipdir.Members], archives: Sequence[str]) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Merge the member tables of several archives into the tree arrays."""
    warnings: List[str] = [w for m in members for w in m.warnings]   # each archive's summarised
    records, archive_of, blob, begins, ends, dirs_given = _concatenate(members)
    cut = _last_slash(blob, begins, ends)
    has_dir = cut >= 0
    cut = np.where(has_dir, cut, begins)
    base_begin = np.where(has_dir, cut + 1, begins)
    group_first, group_of = _group_dirs(blob, begins, cut - begins)
    dirs = _Dirs()
    group_dir = [dirs.add(bytes(blob[begins[i]:cut[i]])) for i in group_first.tolist()]
    for path in dirs_given:
        dirs.add(path)
    new_id = dirs.number()
    file_dir = new_id[np.asarray(group_dir, dtype=np.int64)][group_of] if len(records) else np.zeros(0, np.int64)
    order = _order_by_dir_and_name(file_dir, blob, base_begin, ends, len(new_id))
    file_dir = file_dir[order]
    names, name_ends = zipdir.gather_segments(blob, base_begin[order], (ends - base_begin)[order])

    def rows(sorted_rows: np.ndarray) -> np.ndarray:
        """Member rows at sorted positions, gathered as raw records, archive column set."""
        picks = order[sorted_rows]
        out = np.take(records, picks).view(FILE_DTYPE)
        out["archive"] = archive_of[picks]
        return out

    same = _same_as_previous(file_dir, names, name_ends)
    conflicts = _conflicts(rows, names, name_ends, file_dir, same, dirs, archives)
    keep = ~same
    warnings += summarise(_hide_files_that_are_dirs(dirs, file_dir, names, name_ends, keep),
                          lambda rest: f"{rest:,} more files hidden by folders of the same path")
    files = rows(np.flatnonzero(keep))
    name_lengths = np.diff(name_ends.astype(np.int64), prepend=0)
    names = names[np.repeat(keep, name_lengths)]
    name_ends = np.cumsum(name_lengths[keep]).astype(np.uint64)
    file_dir = file_dir[keep]
    ids = np.arange(dirs.count)
    dir_lo = np.searchsorted(file_dir, ids, side="left").astype(np.uint64)
    dir_hi = np.searchsorted(file_dir, ids, side="right").astype(np.uint64)
    arrays = {"files": files, "names": names, "name_ends": name_ends, "dir_lo": dir_lo, "dir_hi": dir_hi,
              "dir_mtime": _dir_mtimes(files, dir_lo, dir_hi, dirs.parent), **dirs.arrays(), **conflicts.arrays()}
    assert list(arrays) == list(ARRAY_TYPES)
    extra = {"warnings": warnings, "total_bytes": _total(files["size"]),
             "duplicates": int(same.sum()) - conflicts.rows}
    return arrays, extra


def _concatenate(members: Sequence[zipdir.Members]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                            np.ndarray, Set[bytes]]:
    """Rows of all archives end to end as raw records, each archive's rows in reverse
    (so the last of two equal names in one archive sorts first and wins), with the
    archive of each row, all names as one blob with begin/end offsets, and the paths of
    explicit directory entries (which get no row)."""
    tables, blobs, all_begins, all_ends, counts, dirs_given = [], [], [], [], [], set()
    shift = 0
    for m in members:
        name_ends = np.asarray(m.name_ends, dtype=np.int64)
        begins = np.concatenate(([0], name_ends[:-1])).astype(np.int64)[:len(name_ends)]
        is_dir = np.asarray(m.is_dir, dtype=bool)
        dirs_given.update(bytes(m.names[begins[i]:name_ends[i]]) for i in np.flatnonzero(is_dir).tolist())
        files = np.flatnonzero(~is_dir)[::-1]
        tables.append(m.table[files].view(_RECORD))
        all_begins.append(begins[files] + shift)
        all_ends.append(name_ends[files] + shift)
        counts.append(len(files))
        blobs.append(np.asarray(m.names, dtype=np.uint8))
        shift += len(blobs[-1])
    records = np.concatenate(tables) if tables else np.empty(0, _RECORD)
    archive_of = np.repeat(np.arange(len(tables), dtype=FILE_DTYPE["archive"]), counts)
    begins = np.concatenate(all_begins) if tables else np.empty(0, np.int64)
    ends = np.concatenate(all_ends) if tables else np.empty(0, np.int64)
    blob = np.concatenate(blobs + [np.zeros(_SLASH_WINDOW + 8, np.uint8)])
    return records, archive_of, blob, begins, ends, dirs_given


class _Dirs:
    """The directory tree, built from paths one component at a time: each directory
    costs its own name, whatever its depth."""

    def __init__(self) -> None:
        self.parent: List[int] = [0]
        self.base: List[bytes] = [b""]
        self._children: Dict[Tuple[int, bytes], int] = {}

    @property
    def count(self) -> int:
        return len(self.parent)

    def add(self, path: bytes) -> int:
        """The id of the directory at ``path`` (b"" is the root), adding it and its parents."""
        node = 0
        for part in path.split(b"/") if path else ():
            child = self._children.get((node, part))
            if child is None:
                child = self._children[(node, part)] = len(self.parent)
                self.parent.append(node)
                self.base.append(part)
            node = child
        return node

    def number(self) -> np.ndarray:
        """Renumber breadth first with siblings in name order (see ``tree``); returns the
        new id of each old id and reorders ``parent`` and ``base`` to the new ids."""
        kids: List[List[int]] = [[] for _ in self.parent]
        for child in range(1, self.count):
            kids[self.parent[child]].append(child)
        order = [0]
        for node in order:  # grows while it is walked: breadth first
            order.extend(sorted(kids[node], key=self.base.__getitem__))
        new_id = np.empty(self.count, dtype=np.int64)
        new_id[order] = np.arange(self.count)
        self.parent = [int(new_id[self.parent[old]]) for old in order]
        self.base = [self.base[old] for old in order]
        self._children = {}
        return new_id

    def path(self, dir_id: int) -> bytes:
        parts = []
        while dir_id:
            parts.append(self.base[dir_id])
            dir_id = self.parent[dir_id]
        return b"/".join(reversed(parts))

    def arrays(self) -> Dict[str, np.ndarray]:
        return {"dir_parent": np.asarray(self.parent, dtype=np.uint64),
                "dir_names": np.frombuffer(b"".join(self.base), dtype=np.uint8),
                "dir_ends": np.cumsum([len(b) for b in self.base]).astype(np.uint64)}


def _name_at(names: np.ndarray, name_ends: np.ndarray, row: int) -> bytes:
    return names[int(name_ends[row - 1]) if row else 0:int(name_ends[row])].tobytes()


def _order_by_dir_and_name(file_dir: np.ndarray, blob: np.ndarray, begins: np.ndarray, ends: np.ndarray,
                           n_dirs: int) -> np.ndarray:
    """Order of the files by (directory, name bytes); stable, so archive order stays among equals.

    numpy sorts on the first SORT_PREFIX bytes of each name; runs that tie there and hold
    a longer name are put in order in Python (rare: BIOSCAN names are about 16 bytes).
    """
    lengths = ends - begins
    width = max(1, min(SORT_PREFIX, int(lengths.max(initial=0))))
    prefixes = _fixed_width(blob, begins, begins + np.minimum(lengths, width), width).view(f"S{width}").ravel()
    by_dir = np.argsort(file_dir.astype(np.uint16 if n_dirs <= 1 << 16 else np.int64), kind="stable")
    bounds = np.searchsorted(file_dir[by_dir], np.arange(n_dirs + 1))
    keys = prefixes[by_dir]

    def sort_one(d: int) -> None:
        lo, hi = bounds[d], bounds[d + 1]
        if hi - lo > 1:
            by_dir[lo:hi] = by_dir[lo:hi][np.argsort(keys[lo:hi], kind="stable")]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(sort_one, range(n_dirs)))
    dirs, keys, long = file_dir[by_dir], prefixes[by_dir], lengths[by_dir] > width
    tie = (dirs[1:] == dirs[:-1]) & (keys[1:] == keys[:-1]) & (long[1:] | long[:-1])
    for start, stop in _runs(np.flatnonzero(tie)):
        run = by_dir[start:stop + 1]
        by_dir[start:stop + 1] = sorted(run.tolist(), key=lambda i: blob[begins[i]:ends[i]].tobytes())
    return by_dir


def _runs(positions: np.ndarray) -> List[Tuple[int, int]]:
    """(first, last + 1) of each run of consecutive tie positions (tie i joins rows i and i+1)."""
    if len(positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) > 1)
    firsts = np.concatenate(([positions[0]], positions[breaks + 1]))
    lasts = np.concatenate((positions[breaks], [positions[-1]]))
    return [(int(a), int(b) + 1) for a, b in zip(firsts, lasts)]


def _same_as_previous(file_dir: np.ndarray, names: np.ndarray, name_ends: np.ndarray) -> np.ndarray:
    """Rows whose (directory, name) equals the row before (sorted order)."""
    n = len(file_dir)
    same = np.zeros(n, dtype=bool)
    if n < 2:
        return same
    lengths = np.diff(name_ends.astype(np.int64), prepend=0)
    begins = name_ends.astype(np.int64) - lengths
    width = max(1, min(SORT_PREFIX, int(lengths.max())))
    pad = np.concatenate((names, np.zeros(width, np.uint8)))
    prefixes = _fixed_width(pad, begins, begins + np.minimum(lengths, width), width).view(f"S{width}").ravel()
    candidate = (file_dir[1:] == file_dir[:-1]) & (lengths[1:] == lengths[:-1]) & (prefixes[1:] == prefixes[:-1])
    same[1:] = candidate
    for i in np.flatnonzero(candidate & (lengths[1:] > width)).tolist():
        same[i + 1] = _name_at(names, name_ends, i) == _name_at(names, name_ends, i + 1)
    return same


class _Conflicts:
    """Paths present in several archives with different sizes or CRCs, as tree arrays."""

    def __init__(self, paths: List[bytes], archive_lists: List[List[int]]) -> None:
        self.paths, self.archive_lists = paths, archive_lists
        self.rows = sum(len(ids) - 1 for ids in archive_lists)  #: duplicate rows that differ

    def arrays(self) -> Dict[str, np.ndarray]:
        return {"conflict_paths": np.frombuffer(b"".join(self.paths), dtype=np.uint8),
                "conflict_path_ends": np.cumsum([len(p) for p in self.paths], dtype=np.int64).astype(np.uint64),
                "conflict_archives": np.asarray([i for ids in self.archive_lists for i in ids],
                                                dtype=FILE_DTYPE["archive"]),
                "conflict_archive_ends": np.cumsum([len(ids) for ids in self.archive_lists],
                                                   dtype=np.int64).astype(np.uint64)}


def _conflicts(rows: Callable[[np.ndarray], np.ndarray], names: np.ndarray, name_ends: np.ndarray,
               file_dir: np.ndarray, same: np.ndarray, dirs: _Dirs, archives: Sequence[str]) -> _Conflicts:
    """Duplicates whose size or CRC differs from the served one (``rows`` fetches the
    member rows of sorted positions)."""
    dup = np.flatnonzero(same)
    if len(dup) == 0:
        return _Conflicts([], [])
    # Each duplicate row is compared with the first row of its run.
    first = np.maximum.accumulate(np.where(~same, np.arange(len(same)), 0))[dup]
    dups, heads = rows(dup), rows(first)
    differs = np.flatnonzero((dups["size"] != heads["size"]) | (dups["crc32"] != heads["crc32"]))
    lists: Dict[int, List[int]] = {}
    for i in differs.tolist():
        lists.setdefault(int(first[i]), [int(heads["archive"][i])]).append(int(dups["archive"][i]))
    paths = []
    for head in lists:
        folder = dirs.path(int(file_dir[head]))
        paths.append((folder + b"/" if folder else b"") + _name_at(names, name_ends, head))
    return _Conflicts(paths, list(lists.values()))


def _hide_files_that_are_dirs(dirs: _Dirs, file_dir: np.ndarray, names: np.ndarray, name_ends: np.ndarray,
                              keep: np.ndarray) -> List[str]:
    """Unset ``keep`` for files whose path is also a directory's; one warning each."""
    warnings = []
    ids = np.arange(dirs.count)
    lo_of = np.searchsorted(file_dir, ids, side="left")
    hi_of = np.searchsorted(file_dir, ids, side="right")
    for dir_id in range(1, dirs.count):
        parent, base = dirs.parent[dir_id], dirs.base[dir_id]
        row = find_name(lambda r: _name_at(names, name_ends, r), int(lo_of[parent]), int(hi_of[parent]), base)
        hidden = False
        while row < hi_of[parent] and _name_at(names, name_ends, row) == base:
            hidden |= bool(keep[row])
            keep[row] = False
            row += 1
        if hidden:
            warnings.append(f"{dirs.path(dir_id).decode('utf-8', 'surrogateescape')}: both a file and a directory; "
                            "the file is hidden")
    return warnings


def _dir_mtimes(files: np.ndarray, dir_lo: np.ndarray, dir_hi: np.ndarray, parent: List[int]) -> np.ndarray:
    """A folder's mtime is its newest file's, in the whole subtree (children have larger ids)."""
    mtime = np.zeros(len(dir_lo), dtype=np.int64)
    nonempty = np.flatnonzero(dir_hi > dir_lo)
    if len(nonempty):
        mtime[nonempty] = np.maximum.reduceat(files["mtime"], dir_lo[nonempty].astype(np.int64))
    for dir_id in range(len(dir_lo) - 1, 0, -1):
        mtime[parent[dir_id]] = max(mtime[parent[dir_id]], mtime[dir_id])
    return mtime


def _total(sizes: np.ndarray) -> int:
    """The exact sum of unsigned 64-bit sizes (numpy's would wrap): high and low halves
    summed apart, each far from overflowing."""
    return (int((sizes >> np.uint64(32)).sum()) << 32) + int((sizes & np.uint64(0xFFFFFFFF)).sum())


def _fixed_width(blob: np.ndarray, begins: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Rows of blob[begin:end] (each at most ``width`` long), NUL-padded to ``width``.

    ``blob`` must extend at least ``width`` bytes past the last begin.
    """
    lengths = (ends - begins).astype(np.int64)
    out = np.empty((len(lengths), width), dtype=np.uint8)
    view = np.lib.stride_tricks.sliding_window_view(blob, width)
    column = np.arange(width)

    def copy(rows: slice) -> None:
        out[rows] = view[begins[rows]] * (column < lengths[rows, None])

    for_chunks(len(lengths), copy)
    return out


_WORD_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


def _unaligned_words(blob: np.ndarray) -> np.ndarray:
    """A view of blob with one little-endian u64 starting at every byte (stride 1), so a
    word at any offset is one element gather."""
    return np.ndarray(shape=(max(len(blob) - 7, 0),), dtype="<u8", buffer=blob, strides=(1,))


def _word(words: np.ndarray, begins: np.ndarray, lengths: np.ndarray, j: int) -> np.ndarray:
    """Word ``j`` (bytes 8j..8j+7) of every segment, zero past its end."""
    return words[begins + 8 * j] & _WORD_MASKS[np.clip(lengths - 8 * j, 0, 8)]


def _longest_first(lengths: np.ndarray) -> Callable[[int], np.ndarray]:
    """The rows long enough to have word j, as a function of j: word j of a segment is
    touched only when the segment has it, so hashing costs O(total bytes), not rows x
    the longest segment."""
    by_length = np.argsort(-lengths, kind="stable")
    negated = -lengths[by_length]

    def having(j: int) -> np.ndarray:
        return by_length[:int(np.searchsorted(negated, -8 * j, side="left"))]

    return having


def _group_dirs(blob: np.ndarray, begins: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(first row of each group, group of each row) for equal segments blob[begin:begin+length].

    Segments are hashed word by word (C speed, no dense matrix), grouped by hash, and the
    grouping is then checked word by word, exactly; a hash collision falls back to
    grouping the segments' bytes in a dict.
    """
    if len(begins) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    view = _unaligned_words(blob)
    h = lengths.astype(np.uint64)
    prime = np.uint64(0x100000001B3)

    def hash_rows(rows: slice) -> None:
        b, n, hashes = begins[rows], lengths[rows], h[rows]
        having = _longest_first(n)
        with np.errstate(over="ignore"):
            for j in range(-(-int(n.max(initial=0)) // 8)):
                live = having(j)
                hashes[live] = (hashes[live] ^ _word(view, b[live], n[live], j)) * prime
                hashes[live] ^= hashes[live] >> np.uint64(29)

    for_chunks(len(begins), hash_rows)
    first, group = _group_keys(h)

    def grouped_right(rows: slice) -> bool:
        b, n, g = begins[rows], lengths[rows], group[rows]
        heads = first[g]
        if not (n == lengths[heads]).all():
            return False
        having = _longest_first(n)
        for j in range(-(-int(n.max(initial=0)) // 8)):
            live = having(j)
            if not (_word(view, b[live], n[live], j) == _word(view, begins[heads[live]], n[live], j)).all():
                return False
        return True

    if all(for_chunks(len(begins), grouped_right)):
        return first, group
    seen: Dict[bytes, int] = {}
    group = np.asarray([seen.setdefault(blob[b:b + n].tobytes(), len(seen))
                        for b, n in zip(begins.tolist(), lengths.tolist())], dtype=np.int64)
    first = np.empty(len(seen), dtype=np.int64)
    first[group[::-1]] = np.arange(len(group))[::-1]
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

    for_chunks(len(begins), search)
    return last
