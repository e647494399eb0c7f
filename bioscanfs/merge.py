"""Merging the member tables of several archives into one tree's columns (bulk numpy; the
loops over every name's bytes in C, ``_cdscan``, without the GIL).

Owns the duplicates policy and the tree's order (see ``tree`` for the layout); knows
nothing of persistence, decoding or FUSE.

Duplicates: the same path in several archives is one file. When their sizes or CRCs
differ, the member of the archive listed first wins (archives are ordered by path) and
the conflict is recorded; inside one archive the last entry wins, as with zipfile and
unzip. A file whose path is also a directory is hidden with a warning; the directory wins.

Memory: each archive is reduced at once (``reduce``, in the thread that parsed it) to
what the merge needs: a folder group (4 bytes), its own name (its bytes plus 2) and its
row, in (folder, name) order; archives are added one at a time (``Builder.add``), the
rows to a spill file, not memory. The merged columns are then written
out chunk by chunk (``Builder.write``), so the peak is about 40 bytes per member plus
the names, never every column of every archive at once (docs/scale.md).

Cost: every step is O(total name bytes) or O(members x a small constant), but the sort
of each folder (O(n log n) comparisons of a 16-byte key, bytes on a tie): names are
handled as one blob with begin/end offsets, never as a matrix as wide as the longest
name, so one hostile 4 KB name does not cost 4 KB for every member.
"""
from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from . import _cdscan, zipdir
from .bulk import for_chunks
from .errors import SourceError
from .tree import ARRAY_TYPES, FILE_DTYPE, LINKED_FILES_MAX, NAMES_MAX, VIEW_TYPES, Tree, find_name

#: Warnings listed one by one, in the log and in the index; the rest are counted.
MAX_WARNINGS = 10
#: A warning can quote a 64 KiB name; it is cut to this.
MAX_WARNING_CHARS = 1000
#: Rows per chunk of the output pass: its gathers stay tens of MB, and the spill file's
#: pages are mapped again once per chunk (each chunk's rows lie all over it).
_WRITE_ROWS = 1 << 20
_RECORD = np.dtype((np.void, FILE_DTYPE.itemsize))  #: a row as opaque bytes: fast to copy and gather
#: The own name of each view folder's class list (see ``views``).
CLASSES_NAME = b"classes.txt"


def summarise(lines: List[str], rest: Callable[[int], str], keep: int = MAX_WARNINGS) -> List[str]:
    """The first ``keep`` lines, each cut to MAX_WARNING_CHARS, and one line ``rest(n)``
    counting the other n: what the log shows and the index stores."""
    if len(lines) > keep + 1:
        lines = lines[:keep] + [rest(len(lines) - keep)]
    return [line if len(line) <= MAX_WARNING_CHARS else line[:MAX_WARNING_CHARS] + "..." for line in lines]


class Archive(NamedTuple):
    """One archive reduced to what the merge needs of it (``reduce``): its file rows and own
    names in (folder, name) order, and each row's folder as a group of ``group_dirs``."""

    rows: np.ndarray            #: FILE_DTYPE, its files (not its explicit directory entries)
    group_of: np.ndarray        #: uint32, each row's folder: an index into group_dirs
    group_dirs: List[bytes]     #: the folders of its files, as paths
    explicit_dirs: List[bytes]  #: the paths of its explicit directory entries
    bases: np.ndarray           #: uint8, each row's own name, end to end
    lengths: np.ndarray         #: uint16, the length of each of those names
    members: int                #: entries in its central directory that were kept
    warnings: List[str]
    digest: str                 #: of its directory (``zipdir.directory_digest``)


def reduce(members: zipdir.Members) -> Archive:
    """An archive's members reduced for ``Builder.add``; thread-safe and without the GIL
    for the most part, so it runs in the parse thread, beside the merge of the archive
    before.

    Rows go in reverse, then in (folder, name) order (stable), so that the last of two
    equal names in one archive sorts first and wins; and so that each folder's rows of
    this archive lie together in the spill and the names: the merge's sort and the
    write's gathers read runs, not rows all over them."""
    ends = np.asarray(members.name_ends, dtype=np.int64)
    begins = np.concatenate(([0], ends[:-1]))[:len(ends)].astype(np.int64)
    is_dir = np.asarray(members.is_dir, dtype=bool)
    blob = np.ascontiguousarray(members.names, dtype=np.uint8)
    explicit_dirs = [bytes(blob[begins[i]:ends[i]]) for i in np.flatnonzero(is_dir).tolist()]
    files = np.flatnonzero(~is_dir)[::-1]
    begins, ends = begins[files], ends[files]
    base_begin, group_first, group_of = _split_paths(blob, begins, ends)
    group_dirs = [bytes(blob[begins[i]:max(begins[i], base_begin[i] - 1)]) for i in group_first.tolist()]
    lengths = ends - base_begin
    by_name = order_by_dir_and_name(group_of, blob, base_begin, lengths, len(group_first))[0]
    table = np.ascontiguousarray(members.table, dtype=FILE_DTYPE)
    rows = np.take(table.view(_RECORD), files[by_name]).view(FILE_DTYPE)
    lengths, base_begin = lengths[by_name], base_begin[by_name]
    return Archive(rows, group_of[by_name].astype(np.uint32), group_dirs, explicit_dirs,
                   zipdir.gather_segments(blob, base_begin, lengths)[0], lengths.astype(np.uint16), len(members.table),
                   list(members.warnings), members.digest)


class Builder:
    """Merges archives added one at a time into the tree's columns.

    ``add`` each archive (made by ``reduce``) in archive order, then ``merge`` (sorts; returns the
    columns' types and lengths) and ``write`` into a ``store.ColumnWriter`` of that
    layout (may be called again, into another writer, if the first one fails).
    """

    def __init__(self, spill: BinaryIO) -> None:
        self._spill = spill                   #: every file row, archive after archive
        self._dirs = _Dirs()
        self._dir_of: List[np.ndarray] = []   #: per archive, each row's directory (ids before numbering)
        self._bases: List[np.ndarray] = []    #: per archive, each row's own name, end to end
        self._lengths: List[np.ndarray] = []  #: per archive, the length of each of those names
        self._starts = [0]                    #: first row of each archive
        self.warnings: List[List[str]] = []   #: per archive
        #: per archive, of its directory (``index`` reuses a tree whose archives' digests are unchanged)
        self.digests: List[Optional[str]] = []
        self._carried: Optional[_Carried] = None

    def add(self, archive: Archive) -> None:
        """Add one archive, reduced by ``reduce``: its folders numbered, its rows to the spill."""
        self.warnings.append(list(archive.warnings))
        self.digests.append(archive.digest)
        for path in archive.explicit_dirs:
            self._dirs.add(path)
        self._spill.write(archive.rows.view(np.uint8).data)
        group_dir = np.asarray([self._dirs.add(path) for path in archive.group_dirs], dtype=np.uint32)
        self._dir_of.append(group_dir[archive.group_of] if len(archive.rows) else np.zeros(0, np.uint32))
        self._bases.append(archive.bases)
        self._lengths.append(archive.lengths)
        self._starts.append(self._starts[-1] + len(archive.rows))

    def add_from_tree(self, tree: Tree, rows: np.ndarray, warnings: List[str],
                      digest: Optional[str]) -> None:
        """Add an archive unchanged since an earlier tree was built, from its ``rows``
        there (ascending): no parse, its rows and names are taken as they are (the caller has made
        sure that tree lost none of them to a duplicate or a folder: ``index._lost_nothing``)."""
        self.warnings.append(list(warnings))
        self.digests.append(digest)
        self._spill.write(np.take(tree.files.view(_RECORD), rows).view(np.uint8).data)
        # Rows ascend and each folder's rows are a range (disjoint; not in folder order in
        # an extended tree): taken in the order of their first rows, a folder's count of
        # ``rows`` is a difference of two binary searches (the tree's whole columns are not
        # read again for each archive: that cost 0.5 s an archive at 20.6 M members).
        folders = tree.dirs_by_first_row()
        counts = (np.searchsorted(rows, tree.dir_hi[folders].astype(np.int64))
                  - np.searchsorted(rows, tree.dir_lo[folders].astype(np.int64)))
        new_dir = np.zeros(len(folders), dtype=np.uint32)
        used = np.flatnonzero(counts)
        new_dir[used] = [self._dirs.add(tree.dir_path(int(d))) for d in folders[used].tolist()]
        self._dir_of.append(np.repeat(new_dir, counts))
        ends = tree.name_ends[rows].astype(np.int64)
        begins = np.where(rows > 0, tree.name_ends[np.maximum(rows - 1, 0)].astype(np.int64), 0)
        self._bases.append(zipdir.gather_segments(tree.names, begins, ends - begins)[0])
        self._lengths.append((ends - begins).astype(np.uint16))
        self._starts.append(self._starts[-1] + len(rows))

    def carry(self, tree: Tree, dirs: np.ndarray, stale: List[int], release: Callable[[], None],
              extending: Optional["Extending"] = None) -> None:
        """Take the folders ``dirs`` (ids) of an earlier tree as they are: their rows, names
        and name ends are copied into the new columns by ``write``, never spilled or sorted;
        or, ``extending`` that tree, not written at all: the new tree's row columns are the
        earlier tree's with the merged rows appended (``store.Extension``), and the carried
        folders keep their row ranges there.

        For a re-index where only the archives ``stale`` changed (``index``): the caller has
        made sure that no file of those is in these folders, in the earlier tree or now, that
        no new folder is made in them, that the earlier tree lost none of their files, and
        that every archive keeps its number. ``write`` checks the bytes it copies against the
        earlier tree's CRCs, and that no row names a stale archive (CarryFailed otherwise);
        ``release`` is called after each chunk (drops the earlier tree's pages from the RSS).
        """
        self._carried = _Carried(tree, np.asarray(dirs, np.int64),
                                 [self._dirs.add(tree.dir_path(int(d))) for d in dirs], stale,
                                 len(self._starts) - 1, release, extending)

    @property
    def extension(self) -> Any:
        """The ``store.Extension`` that ``write``'s writer must be given, or None."""
        return self._carried.extending.extension if self._carried and self._carried.extending else None

    def merge(self) -> Dict[str, Tuple[np.dtype, int]]:
        """Sort every row by (directory, name), find duplicates; the columns' layout."""
        self._spill.flush()
        size = os.fstat(self._spill.fileno()).st_size
        self._map = mmap.mmap(self._spill.fileno(), size, access=mmap.ACCESS_READ) if size else None
        self._records = np.frombuffer(self._map, dtype=FILE_DTYPE) if self._map else np.zeros(0, FILE_DTYPE)
        self._lens = _joined(self._lengths, np.uint16)
        ends = np.cumsum(self._lens, dtype=np.int64)
        self._begins = _narrow(ends - self._lens, int(ends[-1]) if len(ends) else 0)
        del ends
        self._blob = _joined(self._bases, np.uint8)
        new_id = self._dirs.number()
        dir_of = _joined(self._dir_of, np.uint32)
        self._file_dir = new_id.astype(np.uint32)[dir_of] if len(dir_of) else dir_of
        del dir_of
        self._order, self._same, self._bounds = order_by_dir_and_name(
            self._file_dir, self._blob, self._begins, self._lens, self._dirs.count)
        self._conflicts = _conflicts(self._rows, self._name_at, self._file_dir[self._order], self._same,
                                     self._dirs)
        self._keep = ~self._same
        hidden = _hide_files_that_are_dirs(self._dirs, self._bounds, self._name_at, self._keep)
        self.hidden = len(hidden)
        self.hidden_warnings = summarise(hidden, lambda rest: f"{rest:,} more files hidden by folders of the same path")
        before_rows = before_names = 0
        if self._carried:
            self._carried.place(new_id)
            before_rows, before_names = self._carried.rows_before, self._carried.names_before
        n_files = int(self._keep.sum()) + before_rows
        name_bytes = before_names + int(sum(int(self._lens[self._order[rows]][self._keep[rows]].sum())
                                            for rows in _slices(len(self._order))))
        if name_bytes > NAMES_MAX and self.extension is not None:
            raise CarryFailed("the names of the tree extended would be over what a tree holds")
        if name_bytes > NAMES_MAX:
            raise SourceError(f"{n_files:,} files: their names take {name_bytes:,} bytes, a mount holds at most "
                              f"{NAMES_MAX:,} (mount fewer archives together)")
        conflicts = self._conflicts.arrays()
        sizes = dict({"files": n_files, "names": name_bytes, "name_ends": n_files},
                     **{name: self._dirs.count for name in ("dir_lo", "dir_hi", "dir_mtime")},
                     **{name: len(array) for name, array in self._dirs.arrays().items()},
                     **{name: len(array) for name, array in conflicts.items()})
        return {name: (ARRAY_TYPES[name], sizes[name]) for name in ARRAY_TYPES}

    def write(self, out: Any) -> Dict[str, Any]:
        """Stream the columns into ``out`` (a ``store.ColumnWriter``); returns the extras."""
        n_dirs = self._dirs.count
        counts = np.zeros(n_dirs, dtype=np.int64)
        mtime = np.full(n_dirs, np.iinfo(np.int64).min, dtype=np.int64)
        folders = _ArchiveFolders(n_dirs, len(self._starts) - 1)
        extending = self._carried.extending if self._carried else None
        first_row, name_end = (self._carried.rows_before, self._carried.names_before) if extending else (0, 0)
        total = 0
        for files, dirs, names, ends, written in self._chunks():
            counts += np.bincount(dirs, minlength=n_dirs)
            _newest(mtime, dirs, files["mtime"])
            total += sum_sizes(files["size"])
            folders.add(dirs, files["archive"])
            out.write("files", files)
            out.write("names", names)
            out.write("name_ends", ends + np.uint64(name_end))
            name_end += len(names)
            if written:
                out.then(written)
        dir_hi = (first_row + np.cumsum(counts)).astype(np.uint64)
        dir_lo = dir_hi - counts.astype(np.uint64)
        if extending:
            total += self._carried.keep_ranges(dir_lo, dir_hi, mtime, folders)
        columns = dict({"dir_lo": dir_lo, "dir_hi": dir_hi, "dir_mtime": _dir_mtimes(mtime, self._dirs.parent)},
                       **self._dirs.arrays(), **self._conflicts.arrays())
        for name, array in columns.items():
            out.write(name, array)
        return {"warnings": [w for ws in self.warnings for w in ws] + self.hidden_warnings, "total_bytes": total,
                "duplicates": int(self._same.sum()) - self._conflicts.rows, "hidden": self.hidden,
                "archive_warnings": self.warnings, "digests": self.digests, ARCHIVE_FOLDERS: folders.runs()}

    def _chunks(self) -> Iterator[_Chunk]:
        """The rows in the tree's order, in chunks: the merged rows, and the carried
        folders' rows where those folders fall."""
        carried, at = self._carried, 0
        for first, last in (carried.runs(self._bounds) if carried and not carried.extending else ()):
            until = int(self._bounds[carried.new_dirs[first]])
            yield from self._merged(at, until)
            yield from carried.chunks(first, last)
            at = until
        yield from self._merged(at, len(self._order))

    def _merged(self, lo: int, hi: int) -> Iterator[_Chunk]:
        """``_chunks`` of the sorted positions lo..hi: the kept rows, gathered from the spill."""
        for rows in _slices(hi - lo):
            picks = np.flatnonzero(self._keep[lo + rows.start:lo + rows.stop]) + (lo + rows.start)
            rows_of = self._order[picks]
            names, ends = zipdir.gather_segments(self._blob, self._begins[rows_of], self._lens[rows_of])
            yield _Chunk(self._rows(picks), self._file_dir[rows_of], names, ends, None)
            if self._map is not None:
                self._map.madvise(mmap.MADV_DONTNEED)  # the rows stay in the page cache, not in our RSS

    def _rows(self, positions: np.ndarray) -> np.ndarray:
        """The member rows at sorted positions, archive column set."""
        picks = self._order[positions]
        out = np.take(self._records.view(_RECORD), picks).view(FILE_DTYPE)  # 8x faster than by fields
        out["archive"] = np.searchsorted(self._starts, picks, side="right") - 1
        return out

    def _name_at(self, position: int) -> bytes:
        """The own name of the row at a sorted position."""
        row = int(self._order[position])
        begin = int(self._begins[row])
        return self._blob[begin:begin + int(self._lens[row])].tobytes()


class _Chunk(NamedTuple):
    """Rows of the tree being written, in its order (``Builder._chunks``)."""

    files: np.ndarray   #: FILE_DTYPE
    dirs: np.ndarray    #: each row's folder
    names: np.ndarray   #: their own names, end to end
    ends: np.ndarray    #: where each name ends in ``names``
    written: Optional[Callable[[], None]]   #: to run once the chunk is written (it may be mapped)


class CarryFailed(ValueError):
    """Rows that an earlier tree was to give as they are (``Builder.carry``) are not what the
    re-index was told: a block fails its CRC, or a row names an archive that changed or is
    not there. The tree is then built afresh."""


class Extending(NamedTuple):
    """What ``Builder.carry`` needs to extend an earlier tree rather than copy from it."""

    extension: Any               #: ``store.Extension`` of the earlier tree's row columns (tree.ROW_COLUMNS)
    carried_bytes: int           #: the sizes of the files in the carried folders, summed
    folders: List[List[int]]     #: the earlier tree's ARCHIVE_FOLDERS (runs of folder ids per archive)


class _Carried:
    """Folders of an earlier tree taken as they are (``Builder.carry``): where they fall in
    the new order, and their rows, names and name ends in chunks, checked as they are read;
    or, when ``extending``, their row ranges in the earlier tree's columns, which the new
    tree extends."""

    def __init__(self, tree: Tree, old_dirs: np.ndarray, pre_ids: List[int], stale: List[int], archives: int,
                 release: Callable[[], None], extending: Optional[Extending] = None) -> None:
        self.tree = tree
        self.extending = extending
        self.old_dirs = old_dirs
        self._pre = np.asarray(pre_ids, np.int64)
        #: by archive number: whether a carried row may not name it (changed, or not one of the ``archives``)
        self._refused = np.ones(int(np.iinfo(FILE_DTYPE["archive"]).max) + 1, bool)
        self._refused[:archives] = False
        self._refused[stale] = True
        self._release = release
        self.new_dirs = np.zeros(0, np.int64)
        self._lo = self._hi = self.new_dirs
        #: rows and bytes of names in the new columns before the merged ones: the carried
        #: folders' (copied), or all of the earlier tree's (extended)
        self.rows_before = self.names_before = 0

    def place(self, new_id: np.ndarray) -> None:
        """Once the folders are numbered (``new_id``): the carried folders in the new order,
        and the rows and bytes of names before the merged ones."""
        new = new_id[self._pre]
        by_new = np.argsort(new, kind="stable")
        self.new_dirs, self.old_dirs = new[by_new], self.old_dirs[by_new]
        self._lo = self.tree.dir_lo[self.old_dirs].astype(np.int64)
        self._hi = self.tree.dir_hi[self.old_dirs].astype(np.int64)
        if self.extending:
            self.rows_before, self.names_before = len(self.tree.files), len(self.tree.names)
            return
        self.rows_before = int((self._hi - self._lo).sum())
        self.names_before = sum(self._names_between(lo, hi) for lo, hi in zip(self._lo.tolist(), self._hi.tolist()))

    def keep_ranges(self, dir_lo: np.ndarray, dir_hi: np.ndarray, mtime: np.ndarray,
                    folders: "_ArchiveFolders") -> int:
        """Extending: the carried folders' row ranges, mtimes (their subtrees are carried
        whole) and archives' folders as in the earlier tree; returns their files' bytes."""
        dir_lo[self.new_dirs], dir_hi[self.new_dirs] = self._lo, self._hi
        mtime[self.new_dirs] = self.tree.dir_mtime[self.old_dirs]
        new_of = np.full(self.tree.n_dirs, -1, np.int64)
        new_of[self.old_dirs] = self.new_dirs
        for archive, edges in enumerate(self.extending.folders):
            held = new_of[folders_of(edges, self.tree.n_dirs)]
            held = held[held >= 0]
            folders.add(held, np.full(len(held), archive))
        return self.extending.carried_bytes

    def runs(self, bounds: np.ndarray) -> List[Tuple[int, int]]:
        """Runs first..last of carried folders (by place in ``new_dirs``) whose rows follow
        each other in the earlier tree, with no merged row between them (``bounds``: each
        folder's first sorted position among the merged rows): each is copied as one span."""
        if not len(self.new_dirs):
            return []
        joined = (self._hi[:-1] == self._lo[1:]) & (bounds[self.new_dirs[1:]] == bounds[self.new_dirs[:-1]])
        starts = np.flatnonzero(np.concatenate(([True], ~joined)))
        return list(zip(starts.tolist(), np.append(starts[1:], len(self.new_dirs)).tolist()))

    def chunks(self, first: int, last: int) -> Iterator[_Chunk]:
        """``Builder._chunks`` of the rows of carried folders first..last (one run): straight
        from the earlier tree's mapping, each block checked against its CRC first."""
        tree, width = self.tree, self.tree.files.dtype.itemsize
        lo, hi = self._lo[first:last], self._hi[first:last]
        for rows in _slices(int(hi[-1]) - int(lo[0])):
            a, b = int(lo[0]) + rows.start, int(lo[0]) + rows.stop
            self._verify("files", a * width, b * width)
            files = tree.files[a:b]
            if self._refused[files["archive"]].any():
                raise CarryFailed("a row of a folder taken as it is names an archive that changed or is not there")
            start = self._name_end(a)
            names = self._names_between(a, b)
            self._verify("name_ends", a * 4, b * 4)
            self._verify("names", start, start + names)
            d0, d1 = int(np.searchsorted(hi, a, side="right")), int(np.searchsorted(lo, b, side="left"))
            dirs = np.repeat(self.new_dirs[first + d0:first + d1], np.minimum(hi[d0:d1], b) - np.maximum(lo[d0:d1], a))
            yield _Chunk(files, dirs, tree.names[start:start + names],
                         tree.name_ends[a:b].astype(np.uint64) - np.uint64(start), self._release)

    def _names_between(self, lo: int, hi: int) -> int:
        """Bytes of the names of the earlier tree's rows lo..hi."""
        count = self._name_end(hi) - self._name_end(lo)
        if count < 0:
            raise CarryFailed("name_ends: not in order")
        return count

    def _name_end(self, row: int) -> int:
        """Where the names of the earlier tree's rows before ``row`` end (their CRC checked)."""
        if row == 0:
            return 0
        self._verify("name_ends", (row - 1) * 4, row * 4)
        end = int(self.tree.name_ends[row - 1])
        if end > len(self.tree.names):
            raise CarryFailed("name_ends: past the names")
        return end

    def _verify(self, column: str, lo: int, hi: int) -> None:
        blocks = self.tree.blocks
        if blocks is not None and not blocks.verify(column, lo, hi):
            raise CarryFailed(f"a block of {column} does not match its CRC-32")


#: The extra's entry (``Builder.write``): per archive, the folders holding its files, as
#: runs of folder ids [first, end, first, end, ...]; None when there would be too many.
ARCHIVE_FOLDERS = "archive_folders"
#: Folders x archives over which ``_ArchiveFolders`` keeps nothing (a views tree's 740,000
#: folders, or 65,536 archives): a re-index then reads the rows (``index``).
_FOLDER_CELLS_MAX = 1 << 24
#: Runs saved at most, in all: the header stays small.
_FOLDER_RUNS_MAX = 1 << 16


class _ArchiveFolders:
    """Which archives have files in which folders, as the tree is written: saved, so that a
    re-index finds the folders of a changed archive without reading every row."""

    def __init__(self, n_dirs: int, n_archives: int) -> None:
        self._seen = np.zeros((n_archives, n_dirs), bool) if n_dirs * n_archives <= _FOLDER_CELLS_MAX else None

    def add(self, dirs: np.ndarray, archives: np.ndarray) -> None:
        if self._seen is not None:
            self._seen[archives.astype(np.intp), dirs] = True

    def runs(self) -> Optional[List[List[int]]]:
        if self._seen is None:
            return None
        out = [np.flatnonzero(np.diff(seen.astype(np.int8), prepend=0, append=0)).tolist() for seen in self._seen]
        return out if sum(map(len, out)) <= 2 * _FOLDER_RUNS_MAX else None


def folders_of(edges: List[int], n_dirs: int) -> np.ndarray:
    """Which of ``n_dirs`` folders one archive's ARCHIVE_FOLDERS runs [first, end, ...] hold."""
    held = np.zeros(n_dirs, bool)
    for lo, hi in zip(edges[::2], edges[1::2]):
        held[lo:hi] = True
    return held


def _joined(parts: List[np.ndarray], dtype: Any) -> np.ndarray:
    """The parts end to end, each freed as soon as it is copied (``parts`` is emptied)."""
    out = np.empty(sum(len(p) for p in parts), dtype=dtype)
    at = 0
    while parts:
        part = parts.pop(0)
        out[at:at + len(part)] = part
        at += len(part)
    return out


def _narrow(positions: np.ndarray, bound: int) -> np.ndarray:
    """Positions below ``bound`` as 32-bit when the bound fits (so that adding a length
    to one cannot wrap either): half the memory of the largest arrays a merge holds (an
    order and a name offset per member)."""
    return positions.astype(np.uint32) if bound < 1 << 32 else positions


def _slices(n: int, size: int = _WRITE_ROWS) -> List[slice]:
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _add_labels(dirs: "_Dirs", base: bytes, splits: List[bytes], names: List[bytes]) -> List[int]:
    """Add the label folders ``base/splits[i]/names[i]`` (sorted by split: new leaves)."""
    ids: List[int] = []
    if not splits:   # a rank with no label in this imgtype: its classes.txt alone
        return ids
    starts = [0] + [i for i in range(1, len(splits)) if splits[i] != splits[i - 1]] + [len(splits)]
    for lo, hi in zip(starts[:-1], starts[1:]):
        ids += dirs.add_leaves(dirs.add(base + b"/" + splits[lo]), names[lo:hi])
    return ids


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

    def add_leaves(self, parent: int, names: List[bytes]) -> range:
        """Ids for new folders ``names`` in ``parent``, which holds none of them: bulk, and
        never found again by ``add`` (the views' label folders)."""
        first = len(self.parent)
        self.parent += [parent] * len(names)
        self.base += names
        return range(first, len(self.parent))

    def number(self) -> np.ndarray:
        """Renumber breadth first with siblings in name order (see ``tree``); returns the
        new id of each old id and reorders ``parent`` and ``base`` to the new ids.

        In bulk (a tree with views has hundreds of thousands of folders): each folder's
        depth, then level by level, the folders in order of (their parent's new id, their
        name's rank among all names)."""
        n = self.count
        parent = np.asarray(self.parent, dtype=np.int64)
        depth = (np.arange(n) > 0).astype(np.int64)
        above = parent.copy()
        climbing = np.flatnonzero(above)
        while len(climbing):   # as many rounds as the tree is deep
            depth[climbing] += 1
            above[climbing] = parent[above[climbing]]
            climbing = climbing[above[climbing] != 0]
        name_rank = np.empty(n, dtype=np.int64)
        name_rank[sorted(range(n), key=self.base.__getitem__)] = np.arange(n)
        by_depth = np.argsort(depth, kind="stable")
        bounds = np.searchsorted(depth[by_depth], np.arange(int(depth.max(initial=0)) + 2))
        new_id = np.zeros(n, dtype=np.int64)
        for lo, hi in zip(bounds[1:-1].tolist(), bounds[2:].tolist()):
            level = by_depth[lo:hi]
            new_id[level[np.lexsort((name_rank[level], new_id[parent[level]]))]] = np.arange(lo, hi)
        order = np.empty(n, dtype=np.int64)
        order[new_id] = np.arange(n)
        self.parent = new_id[parent[order]].tolist()
        self.base = [self.base[old] for old in order.tolist()]
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


def order_by_dir_and_name(file_dir: np.ndarray, blob: np.ndarray, begins: np.ndarray, lengths: np.ndarray,
                          n_dirs: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order of the rows by (directory, name bytes), whether each sorted row's name equals
    the one before it in its directory, first sorted position of each directory and the end).

    Stable, so archive order stays among equals. Each directory is sorted on its own, in C
    without the GIL (_cdscan.sort_dirs: the first 16 bytes as two integers, the rest
    compared only on a tie), spans of directories on every core.
    """
    order = _narrow(np.argsort(file_dir.astype(np.uint16) if n_dirs <= 1 << 16 else file_dir, kind="stable"),
                    len(file_dir))
    bounds = np.searchsorted(file_dir[order], np.arange(n_dirs + 1)).astype(np.int64)
    same = np.zeros(len(order), dtype=bool)
    workers = os.cpu_count() or 1
    # Spans of about equal rows, a few per core so that one large folder does not hold the rest.
    cuts = np.searchsorted(bounds, np.linspace(0, len(order), 4 * workers + 1)).clip(0, n_dirs)
    edges = np.unique(np.concatenate(([0], cuts, [n_dirs]))).tolist()

    def sort_span(span: Tuple[int, int]) -> None:
        _cdscan.sort_dirs(blob, begins, begins.itemsize, lengths, lengths.itemsize, order, order.itemsize, bounds,
                          same.view(np.uint8), span[0], span[1])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(sort_span, zip(edges[:-1], edges[1:])))
    return order, same, bounds


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


def _conflicts(rows: Callable[[np.ndarray], np.ndarray], name_at: Callable[[int], bytes],
               file_dir: np.ndarray, same: np.ndarray, dirs: _Dirs) -> _Conflicts:
    """Duplicates whose size or CRC differs from the served one (``rows`` fetches the
    member rows of sorted positions, ``file_dir`` is in sorted order)."""
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
        paths.append((folder + b"/" if folder else b"") + name_at(head))
    return _Conflicts(paths, list(lists.values()))


def _hide_files_that_are_dirs(dirs: _Dirs, bounds: np.ndarray, name_at: Callable[[int], bytes],
                              keep: np.ndarray) -> List[str]:
    """Unset ``keep`` for files whose path is also a directory's; one warning each
    (``bounds``: each directory's first sorted position, ``name_at`` a sorted row's name)."""
    warnings = []
    for dir_id in range(1, dirs.count):
        parent, base = dirs.parent[dir_id], dirs.base[dir_id]
        hi = int(bounds[parent + 1])
        row = find_name(name_at, int(bounds[parent]), hi, base)
        hidden = False
        while row < hi and name_at(row) == base:
            hidden |= bool(keep[row])
            keep[row] = False
            row += 1
        if hidden:
            warnings.append(f"{dirs.path(dir_id).decode('utf-8', 'surrogateescape')}: both a file and a directory; "
                            "the file is hidden")
    return warnings


def _newest(mtime: np.ndarray, dirs: np.ndarray, times: np.ndarray) -> None:
    """mtime[d] = max(mtime[d], the newest of ``times`` in folder d), where ``dirs`` is in
    order (the sorted rows): one maximum per run of a folder, not np.maximum.at per row."""
    if len(dirs) == 0:
        return
    starts = np.concatenate(([0], np.flatnonzero(dirs[1:] != dirs[:-1]) + 1))
    folders = dirs[starts]
    mtime[folders] = np.maximum(mtime[folders], np.maximum.reduceat(times, starts))


def _dir_mtimes(mtime: np.ndarray, parent: List[int]) -> np.ndarray:
    """A folder's mtime is its newest file's, in the whole subtree; ``mtime`` holds each
    folder's newest own file (the int64 minimum when none).

    Folders are numbered breadth first (``_Dirs.number``): ``parent`` never decreases and
    each depth is a run of ids, so the subtrees are folded one depth at a time, deepest
    first (``_newest`` per depth), not one Python step per folder (0.26 s for the 740,000
    folders of a views tree)."""
    mtime = np.where(mtime == np.iinfo(np.int64).min, 0, mtime)
    parent = np.asarray(parent, dtype=np.int64)
    depths = [1]   # where each depth starts, from depth 1; a depth's children follow it
    while depths[-1] < len(parent):
        end = int(np.searchsorted(parent, depths[-1]))   # the first folder whose parent is deeper
        if end <= depths[-1]:
            raise ValueError("folders not numbered breadth first")
        depths.append(end)
    for lo, hi in reversed(list(zip(depths[:-1], depths[1:]))):
        _newest(mtime, parent[lo:hi], mtime[lo:hi])
    return mtime


def sum_sizes(sizes: np.ndarray) -> int:
    """The exact sum of unsigned 64-bit sizes (numpy's would wrap): high and low halves
    summed apart, each far from overflowing."""
    return (int((sizes >> np.uint64(32)).sum()) << 32) + int((sizes & np.uint64(0xFFFFFFFF)).sum())


def fixed_width(blob: np.ndarray, begins: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
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


def _split_paths(blob: np.ndarray, begins: np.ndarray, ends: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each path blob[begin:end] split at its last '/': (where its own name starts, the
    first row of each distinct directory part, the group of each row's directory part).

    In C without the GIL (one pass with a hash table, exact), so the next archive's parse
    runs meanwhile; the directory part of row i is blob[begin:base - 1] (empty when base
    == begin: no '/').
    """
    n = len(begins)
    base, group, first = (np.empty(n, dtype=np.int64) for _ in range(3))
    groups = _cdscan.split_dirs(blob, np.asarray(begins, dtype=np.int64), np.asarray(ends, dtype=np.int64),
                                base, group, first)
    return base, first[:groups], group


class ViewsBuilder:
    """An image tree with its views added (``views.Plan``): the same file rows, with the
    classes.txt rows (of archive ``classes_archive``) put in their folders, the view
    folders numbered among the others, and the links. Like ``Builder``: ``layout``,
    then ``write`` into a ``store.ColumnWriter`` (again, if the first one fails).

    Folders keep their relative order when others are added (breadth first, siblings by
    name), so the image tree's rows stay in order, moved by the classes.txt rows before them.
    """

    def __init__(self, tree: Tree, plan: Any, classes_archive: int) -> None:
        if len(tree.files) + len(plan.class_dirs) >= LINKED_FILES_MAX:
            raise SourceError(f"{len(tree.files):,} files: views need fewer than {LINKED_FILES_MAX:,}")
        self._tree, self._plan = tree, plan
        self.views_zip: bytes = plan.classes
        dirs = _Dirs()
        old = [dirs.add(tree.dir_path(d)) for d in range(tree.n_dirs)]
        views = [leaf for base, splits, names in plan.dirs for leaf in _add_labels(dirs, base, splits, names)]
        classes = [dirs.add(path) for path in plan.class_dirs]
        new_id = dirs.number()
        self._dirs = dirs
        self._old = new_id[old]
        n = dirs.count
        self._counts = np.zeros(n, dtype=np.int64)
        self._counts[self._old] = (tree.dir_hi - tree.dir_lo).astype(np.int64)
        self._classes_at = new_id[classes]
        self._counts[self._classes_at] += 1
        self._link_counts = np.zeros(n, dtype=np.int64)
        view_ids = new_id[views].astype(np.int64)
        self._link_counts[view_ids] = plan.counts
        self._links = self._place_links(view_ids)
        rows = np.array(plan.class_members.table)
        rows["archive"] = classes_archive
        self._class_rows = rows[np.argsort(self._classes_at, kind="stable")]
        self._classes_at = np.sort(self._classes_at)

    def _place_links(self, view_ids: np.ndarray) -> np.ndarray:
        """The links in folder order, as rows of the new files array; their targets' mtimes
        in ``_link_mtimes`` (the view folders' mtimes)."""
        tree, plan = self._tree, self._plan
        dir_hi = np.cumsum(self._counts)
        shift = (dir_hi - self._counts)[self._old] - tree.dir_lo.astype(np.int64)   # per image folder
        ends = np.cumsum(plan.counts)
        by_folder = np.argsort(view_ids, kind="stable")
        # Runs of folders that follow each other in the plan too (a rank's imgtype: the
        # plan lists the ranks in RANKS order, the tree by name) are moved as one slice.
        starts = np.flatnonzero(np.diff(by_folder, prepend=-2) != 1)
        firsts, lasts = by_folder[starts], by_folder[np.append(starts[1:], len(by_folder))[:len(starts)] - 1]
        targets = np.concatenate([plan.targets[hi - n:end] for hi, n, end in
                                  zip(ends[firsts].tolist(), plan.counts[firsts].tolist(), ends[lasts].tolist())]
                                 or [np.zeros(0, np.int64)])
        # From contiguous copies: gathering from the mapped, strided column cost 2 s.
        mtimes = np.ascontiguousarray(tree.files["mtime"])
        moved = np.repeat(shift.astype(np.int32), (tree.dir_hi - tree.dir_lo).astype(np.int64))
        links = np.empty(len(targets), dtype=np.uint32)
        self._link_mtimes = np.empty(len(targets), dtype=mtimes.dtype)

        def place(rows: slice) -> None:   # the gathers of ~20 M links, on every core
            picked = targets[rows]
            self._link_mtimes[rows] = mtimes[picked]
            links[rows] = picked + moved[picked]

        for_chunks(len(targets), place)
        return links

    def layout(self) -> Dict[str, Tuple[np.dtype, int]]:
        tree, n = self._tree, self._dirs.count
        sizes = dict({"files": len(tree.files) + len(self._class_rows),
                      "names": len(tree.names) + len(self._class_rows) * len(CLASSES_NAME),
                      "links": len(self._links), "views_zip": len(self._plan.classes)},
                     **{name: n for name in ("dir_lo", "dir_hi", "dir_mtime", "link_lo", "link_hi")},
                     **{name: len(array) for name, array in self._dirs.arrays().items()},
                     **{name: len(tree.arrays[name]) for name in ARRAY_TYPES if name.startswith("conflict")})
        sizes["name_ends"] = sizes["files"]
        return {name: (dtype, sizes[name]) for name, dtype in dict(ARRAY_TYPES, **VIEW_TYPES).items()}

    def write(self, out: Any, extra: Dict[str, Any]) -> Dict[str, Any]:
        """Stream the columns into ``out``; returns ``extra`` with the views' figures."""
        tree = self._tree
        name_end = 0
        for files, names, ends in self._pieces():
            out.write("files", files)
            out.write("names", names)
            out.write("name_ends", ends.astype(np.uint64) + np.uint64(name_end))
            name_end += len(names)
        dir_hi = np.cumsum(self._counts).astype(np.uint64)
        link_hi = np.cumsum(self._link_counts).astype(np.uint64)
        columns = dict({"dir_lo": dir_hi - self._counts.astype(np.uint64), "dir_hi": dir_hi,
                        "dir_mtime": self._mtimes(), "links": self._links,
                        "link_lo": link_hi - self._link_counts.astype(np.uint64), "link_hi": link_hi,
                        "views_zip": np.frombuffer(self._plan.classes, dtype=np.uint8)},
                       **self._dirs.arrays(), **{name: tree.arrays[name] for name in ARRAY_TYPES
                                                 if name.startswith("conflict")})
        for name, array in columns.items():
            out.write(name, array)
        return dict(extra, views=self._plan.stats, **{ARCHIVE_FOLDERS: None})   # its folders are numbered anew

    def _pieces(self) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(file rows, their names, name ends from 0) in the new order, in chunks: runs of
        the image tree's rows, with each classes.txt row where its folder falls."""
        tree = self._tree
        dir_lo = np.cumsum(self._counts) - self._counts
        # Classes row i goes where its folder starts; the image rows before it are that less i.
        old_at = 0
        cuts = [int(p) - i for i, p in enumerate(dir_lo[self._classes_at].tolist())] + [len(tree.files)]
        for i, cut in enumerate(cuts):
            for rows in _slices(cut - old_at):
                lo, hi = old_at + rows.start, old_at + rows.stop
                names, ends = tree.name_span(lo, hi)
                yield np.asarray(tree.files[lo:hi]), np.asarray(names), ends
            old_at = cut
            if i < len(self._class_rows):
                yield (self._class_rows[i:i + 1], np.frombuffer(CLASSES_NAME, np.uint8),
                       np.array([len(CLASSES_NAME)], np.int64))

    def _mtimes(self) -> np.ndarray:
        """Each folder's newest file in its subtree: the image folders' as they were; a view
        folder's from its links' targets and classes.txt."""
        tree = self._tree
        mtime = np.full(self._dirs.count, np.iinfo(np.int64).min, dtype=np.int64)
        mtime[self._old] = tree.dir_mtime
        has = np.flatnonzero(self._link_counts)
        if len(has):
            link_lo = np.cumsum(self._link_counts) - self._link_counts
            mtime[has] = np.maximum(mtime[has], np.maximum.reduceat(self._link_mtimes, link_lo[has]))
        np.maximum.at(mtime, self._classes_at, self._class_rows["mtime"])
        return _dir_mtimes(mtime, self._dirs.parent)
