"""Taxonomic views: ``views/<rank>/<imgtype>/<split>/<label>/<processid>.jpg`` and
``views/<rank>/<imgtype>/classes.txt``, planned from the metadata CSV and an image tree.

Owns the ranks, the label -> file name mapping, reading the CSV (pyarrow, only the
columns needed) and which image row each view file is; knows nothing of how the tree is
written (``merge.ViewsBuilder``) or served. See docs/views.md.

Why pyarrow: its multithreaded reader parses the needed columns of the CSV many times
faster than the csv module (scripts/bench_views_csv.py, docs/views.md) and hands the
labels over as dictionary codes, so the plan is numpy over integers and fixed-width
names, with a Python object per distinct label, not per row. Without pyarrow there are
no views (one warning); everything else is served as always.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import queue
import re
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .bulk import give_back_freed
from .errors import BioscanError, NotFound
from .layout import IMAGES_ROOT, METADATA_CSV, SPLIT_CHUNK_CHARS
from .names import NAME_MAX
from .tree import Tree
from .zipdir import Members

log = logging.getLogger(__name__)

#: The CSV columns a view can be made of, in the order of the issue (and of --views).
RANKS = ("order", "family", "subfamily", "genus", "species", "dna_bin")
NEEDED_COLUMNS = ("processid",) + RANKS + ("split", "chunk")
#: The folder at the mount root that holds the views.
VIEWS = b"views"
#: Bytes always written as %XX in a folder name: the escape itself, the path separator,
#: NUL, and line ends (classes.txt holds one name per line).
_ESCAPED = frozenset(b"%/\0\n\r")
#: A label that needs none of the changes below (most do not): kept as it is.
_AS_IS = re.compile(rb"(?![ .])(?!\.\.?\Z)[^%/\0\n\r]*(?<! )\Z")
#: Marks a name shortened to fit NAME_MAX; never made by escaping ('%' is always %25).
_SHORTENED = b"%#"
_DIGEST_HEX = 16
_CSV_BLOCK = 16 << 20
#: Pieces of the inflated CSV (up to 1 MiB each) queued ahead of pyarrow (``piped``): a
#: few of its 16 MiB blocks, so the inflate rarely waits.
_QUEUED_PIECES = 96
#: Longest file name sorted from the padded rows (``_name_blob``).
_SORT_WIDTH = 64
#: Widest a batch's padded file names are kept (``_Batch``): an image name is at most
#: NAME_MAX bytes, so a longer one, cut here, still differs from every image's in length.
_PADDED_MAX = NAME_MAX + 1
#: CSV rows joined together (``_Images.join``): about 13 blocks; the last group is joined
#: after the CSV's end, so it is kept short.
_JOIN_ROWS = 1 << 18
#: Batches parsed ahead of their plan (``_read``): each a few MB.
_QUEUED = 16
#: The split names a CSV row can have, in byte order (a view folder's split is its rank here).
_SPLIT_NAMES = sorted(name.encode() for name in SPLIT_CHUNK_CHARS)


def parse_ranks(text: str) -> Tuple[str, ...]:
    """``--views`` as ranks in RANKS order: ``all``, ``none``, or names joined by ``,`` or
    ``+`` (``+`` in ``-o views=order+species``, where ``,`` separates mount options)."""
    text = text.strip()
    if text == "all":
        return RANKS
    if text in ("none", ""):
        return ()
    asked = [part.strip() for part in text.replace("+", ",").split(",") if part.strip()]
    unknown = [rank for rank in asked if rank not in RANKS]
    if unknown:
        raise ValueError(f"unknown rank {unknown[0]!r}: expected all, none or some of {', '.join(RANKS)}")
    return tuple(rank for rank in RANKS if rank in asked)


def label_name(label: bytes) -> bytes:
    """The folder name of a (non-empty) label: safe as one path component, and the same
    in classes.txt. '%', '/', NUL, CR and LF become %XX (hex), a leading or trailing space
    %20, '.' and '..' %2E and %2E%2E; a name still over NAME_MAX bytes keeps its head and
    ends in %# and 16 hex digits of the label's SHA-256. ``label_of`` reverses it."""
    if len(label) <= NAME_MAX and _AS_IS.match(label):
        return label
    out = bytearray()
    for byte in label:
        out += b"%%%02X" % byte if byte in _ESCAPED else bytes([byte])
    if out[:1] == b" ":
        out[:1] = b"%20"
    if out[-1:] == b" ":
        out[-1:] = b"%20"
    if out in (b".", b".."):
        out = bytearray(b"%2E" * len(out))
    if len(out) <= NAME_MAX:
        return bytes(out)
    keep = NAME_MAX - len(_SHORTENED) - _DIGEST_HEX
    head = bytes(out[:keep])
    cut = head.rfind(b"%", max(0, keep - 2))
    if cut >= 0:   # never split a %XX escape
        head = head[:cut]
    head = head.decode("utf-8", "ignore").encode() if _is_utf8(label) else head   # nor a character
    return head + _SHORTENED + hashlib.sha256(label).hexdigest()[:_DIGEST_HEX].encode()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def label_of(name: bytes) -> bytes:
    """The label of a folder name made by ``label_name`` (of a shortened one: its head)."""
    name = name.split(_SHORTENED, 1)[0]
    out, i = bytearray(), 0
    while i < len(name):
        if name[i:i + 1] == b"%" and i + 3 <= len(name):
            out.append(int(name[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(name[i])
            i += 1
    return bytes(out)


def available() -> Optional[str]:
    """None when views can be built here, else why not (pyarrow is missing). Looked up,
    not imported: every read command asks (cli) to find the index a mount made, and
    importing pyarrow costs 0.3-0.4 s that only a build needs."""
    if importlib.util.find_spec("pyarrow") is None:
        return "pyarrow is not installed (pip install 'bioscanfs[views]')"
    return None


class Plan(NamedTuple):
    """The view folders that hold files, and the classes.txt members, over an image tree.

    ``dirs`` are groups (``views/<rank>/<imgtype>``, its label folders' splits, their
    names), sorted by (split, name); label folder i, counting through the groups, holds
    ``counts[i]`` files: the image rows ``targets`` (in the image tree) of its run, sorted
    by name. ``classes`` is an in-memory zip whose member ``i`` is the classes.txt of
    folder ``class_dirs[i]``.
    """

    dirs: List[Tuple[bytes, List[bytes], List[bytes]]]
    counts: np.ndarray
    targets: np.ndarray
    class_dirs: List[bytes]
    classes: bytes
    class_members: Members
    stats: Dict[str, Any]


def empty_plan() -> Plan:
    """No views: the tree is saved as it is (with no links)."""
    from .zipdir import MEMBER_DTYPE

    none = Members(np.zeros(0, MEMBER_DTYPE), np.zeros(0, np.uint8), np.zeros(0, np.uint64), np.zeros(0, bool), [], "")
    return Plan([], np.zeros(0, np.int64), np.zeros(0, np.int64), [], b"", none, {})


def read_batches(stream: BinaryIO, block_size: int = _CSV_BLOCK) -> Iterator[Any]:
    """The needed columns of the CSV as pyarrow RecordBatches of binary columns (labels need
    not be UTF-8), one per block of about ``block_size`` bytes, as the CSV streams in (the
    streaming reader), so that each batch is planned (``_Batch``) while the CSV inflates
    on another thread. Raises pyarrow's ArrowInvalid for a CSV it cannot parse or missing
    columns, when opened or at the batch where it fails."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    return iter(pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=block_size),
                               convert_options=pacsv.ConvertOptions(
                                   include_columns=list(NEEDED_COLUMNS), check_utf8=False,
                                   column_types=dict.fromkeys(NEEDED_COLUMNS, pa.binary()))))


@contextlib.contextmanager
def piped(produce: Callable[[Callable[[bytes], None]], None]) -> Iterator[BinaryIO]:
    """A file that reads the bytes ``produce`` gives its sink, on a thread of its own,
    through a bounded queue of its pieces (``_Pieces``).

    Why: the CSV member inflates on that thread (zlib-ng releases the GIL) while pyarrow
    parses and the batches are planned on others; a Python file that inflated in ``read``
    would inflate only while pyarrow waits, at about half the speed (docs/views.md). A
    queue, not an OS pipe: the inflated bytes are not copied into the kernel and back
    (the pipe cost about 3 s of system time for the bench's 4.2 GB CSV). ``produce``'s
    error is raised when the block ends, over the block's own: the reader saw an early
    end of file and may have parsed a cut CSV. Leaving the block early stops ``produce``
    (its sink raises BrokenPipeError).
    """
    pieces: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=_QUEUED_PIECES)
    stop = threading.Event()
    failed: List[BaseException] = []

    def put(piece: Optional[bytes]) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                pieces.put(piece, timeout=0.1)
                return True
        return False

    def sink(data: bytes) -> None:
        if not put(data if isinstance(data, bytes) else bytes(data)):
            raise BrokenPipeError("the CSV's reader left")

    def run() -> None:
        try:
            produce(sink)
        except BrokenPipeError:
            pass   # the reader left early: its own error is raised
        except BaseException as err:   # noqa: BLE001 - raised on the reader's thread
            failed.append(err)
        finally:
            put(None)

    thread = threading.Thread(target=run, name="views-csv", daemon=True)
    thread.start()
    stream = _Pieces(pieces)
    try:
        yield stream   # type: ignore[misc]
    finally:
        stop.set()
        stream.close()
        thread.join()
        if failed:
            raise failed[0]


class _Pieces(io.RawIOBase):
    """The reading end of ``piped``: its queue's pieces, read in any sizes; ``read(n)``
    gives n bytes but at the end (pyarrow's blocks: a short read would cut a row)."""

    def __init__(self, pieces: "queue.Queue[Optional[bytes]]") -> None:
        super().__init__()
        self._pieces = pieces
        self._head = memoryview(b"")
        self._ended = False

    def readable(self) -> bool:
        return True

    def read(self, size: Optional[int] = -1) -> bytes:
        size = -1 if size is None else size
        out: List[memoryview] = []
        got = 0
        while (size < 0 or got < size) and not self._ended:
            if not self._head:
                piece = self._pieces.get()
                if piece is None:
                    self._ended = True
                    break
                self._head = memoryview(piece)
            take = self._head if size < 0 else self._head[:size - got]
            out.append(take)
            got += len(take)
            self._head = self._head[len(take):]
        return b"".join(out)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def csv_member(tree: Tree) -> Optional[int]:
    """The row of the metadata CSV in an image tree, or None when it has none, or no image
    (the metadata zip mounted alone: every view would be empty, and reading the CSV for
    them would cost a cold mount its GBs)."""
    try:
        row = tree.lookup(METADATA_CSV.encode())
        tree.lookup(IMAGES_ROOT.encode())
    except NotFound:
        return None
    return row if row >= 0 else None


def plan(tree: Tree, open_csv: Callable[[], BinaryIO], ranks: Sequence[str], where: str,
         mtime: int, block_size: int = _CSV_BLOCK) -> Optional[Plan]:
    """The views of ``ranks`` over ``tree`` (pyarrow must be there: ``available``), or None
    with one warning when the CSV (``open_csv``, ``where`` is "archive: member") cannot be
    read or parsed. The classes.txt files are dated ``mtime`` (the CSV's). Each block of
    ``block_size`` CSV bytes is planned as it comes (``_Batch``); what needs every row
    (``_plan``) follows the last."""
    import pyarrow as pa

    started = time.monotonic()
    images = _Images(tree)
    try:
        with open_csv() as stream:
            batches, found = _read(read_batches(stream, block_size), images, ranks)
    except (BioscanError, OSError, pa.ArrowException, ValueError) as err:
        log.warning("%s: no views/: the CSV cannot be read (%s)", where, str(err).splitlines()[0] if str(err) else err)
        return None
    parsed = time.monotonic() - started
    result = _plan(images, batches, found, ranks, mtime)
    give_back_freed()   # the plan's threads' temporaries, before the tree's peak (ViewsBuilder)
    result.stats.update(csv_seconds=round(parsed, 2), plan_seconds=round(time.monotonic() - started - parsed, 2))
    log.info("views: %s", ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                    for k, v in result.stats.items()))
    return result


Spans = List[Tuple[bytes, int, int]]   #: (folder path below the imgtype + "/", first row, end row), by row


class _Images:
    """The image folders of every imgtype under images/, for the join of each batch's rows
    (``join``) and, once every batch is in, the rows of every imgtype (``all_rows``).

    An imgtype whose folders and names are the same as the one before (the packages of
    BIOSCAN-5M hold the same processids) is not joined: it takes that one's answer, each
    row moved by its folder's offset."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.imgtypes: List[Tuple[bytes, Spans, bool]] = []   #: (imgtype, its folders, joined)
        self._sorted: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}   # a folder's names (``_names``), by first row
        try:
            images = -1 - tree.lookup(IMAGES_ROOT.encode())
        except NotFound:
            return
        if images < 0:
            return
        before: Optional[Spans] = None
        for imgtype in tree.listdir(images)[0]:
            prefix = IMAGES_ROOT.encode() + b"/" + imgtype
            spans = sorted(((path[len(prefix) + 1:] + b"/", int(tree.dir_lo[d]), int(tree.dir_hi[d]))
                            for d, path in tree.file_dirs(prefix)), key=lambda span: span[1])
            self.imgtypes.append((imgtype, spans, before is None or not _same_names(tree, before, spans)))
            before = spans

    def spans_of(self, folder: np.ndarray, paths: Any) -> List[np.ndarray]:
        """Per joined imgtype, the folder (index in its spans) of each of a batch's rows, or
        -1: from ``folder``, each row's index in ``paths`` (``_folder_paths``)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        out = []
        for _, spans, joined in self.imgtypes:
            if joined:
                span_of_path = pc.index_in(paths, value_set=pa.array([p for p, _, _ in spans], pa.binary()))
                span_of_path = span_of_path.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
                out.append(np.append(span_of_path, np.int32(-1))[folder])   # a folder of -1 takes the last: none
        return out

    def join(self, batches: List["_Batch"]) -> List[np.ndarray]:
        """Per joined imgtype, the image row of each of the rows of ``batches``, or -1.

        Why not a hash join of paths: a folder's rows are sorted by name (``tree``), so each
        CSV row is looked up by binary search among the names of its own folder only, as
        fixed-width byte strings (numpy compares them as memcmp does): no path is built.
        Why batches together: a search per folder and batch cost more than the search."""
        width = max((b.names.padded.shape[1] for b in batches), default=0)
        names = np.concatenate([_padded_to(b.names.padded, width) for b in batches]) if batches \
            else np.zeros((0, 0), np.uint8)
        lengths = _concat([b.names.lengths for b in batches], np.int32)
        found = []
        for j, (_, spans, _) in enumerate(imgtype for imgtype in self.imgtypes if imgtype[2]):
            span = _concat([b.spans[j] for b in batches], np.int32)
            order = np.argsort(span, kind="stable")
            bounds = np.searchsorted(span[order], np.arange(len(spans) + 1))
            rows = np.full(len(span), -1, dtype=np.int32)   # < LINKED_FILES_MAX
            for k, (_, lo, hi) in enumerate(spans):
                asked = order[bounds[k]:bounds[k + 1]]
                if len(asked) and hi > lo:
                    rows[asked] = self._lookup(lo, hi, names[asked], lengths[asked])
            found.append(rows)
        return found

    def done(self) -> None:
        """Every batch is joined: the folders' names (``_names``) are no longer needed."""
        self._sorted.clear()

    def _lookup(self, lo: int, hi: int, names: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The rows among ``lo:hi`` (one folder) named ``names`` (padded) of ``lengths``, or -1."""
        sorted_names, sorted_lengths = self._names(lo, hi)
        width = sorted_names.dtype.itemsize
        wanted = _padded_to(names, width).view(f"S{width}").ravel()
        at = np.minimum(np.searchsorted(sorted_names, wanted), len(sorted_names) - 1)
        same = (sorted_names[at] == wanted) & (sorted_lengths[at] == lengths)
        return np.where(same, lo + at, -1)

    def all_rows(self, found: List[np.ndarray]) -> List[Tuple[bytes, np.ndarray]]:
        """(imgtype, the image row of each CSV row or -1) for every imgtype, from ``found``:
        those of the joined imgtypes, in order."""
        out: List[Tuple[bytes, np.ndarray]] = []
        joined = iter(found)
        before: Optional[Spans] = None
        for imgtype, spans, own in self.imgtypes:
            if own:
                rows = next(joined)
            else:
                assert before is not None
                his = np.array([hi for _, _, hi in before], dtype=np.int64)
                moved = np.array([lo - old_lo for (_, lo, _), (_, old_lo, _) in zip(spans, before)], dtype=np.int64)
                rows = out[-1][1]
                rows = np.where(rows >= 0, rows + moved[np.searchsorted(his, rows, side="right")], -1).astype(np.int32)
            out.append((imgtype, rows))
            before = spans
        return out

    def _names(self, lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
        """The names of the rows ``lo:hi`` (one folder, sorted by name) as fixed-width byte
        strings as wide as the longest (none is cut), and their lengths; made once, for the
        group of batches that looks in that folder (``join``)."""
        from .merge import fixed_width  # build only: a remount starts sooner without merge

        if lo not in self._sorted:
            data, ends = self.tree.name_span(lo, hi)
            begins = np.concatenate(([0], ends[:-1]))
            width = int((ends - begins).max())
            blob = np.concatenate((data, np.zeros(width, np.uint8)))
            names = fixed_width(blob, begins, ends, width).view(f"S{width}").ravel()
            self._sorted[lo] = names, (ends - begins).astype(np.int32)
        return self._sorted[lo]


def _padded_to(names: np.ndarray, width: int) -> np.ndarray:
    """Rows of NUL-padded names (uint8, 2-D) cut or padded to ``width`` columns, contiguous."""
    if names.shape[1] >= width:
        return np.ascontiguousarray(names[:, :width])
    return np.pad(names, ((0, 0), (0, width - names.shape[1])))


def _same_names(tree: Tree, a: Spans, b: Spans) -> bool:
    """Whether two imgtypes' folders hold the same names, folder by folder."""
    if [(path, hi - lo) for path, lo, hi in a] != [(path, hi - lo) for path, lo, hi in b]:
        return False
    for (_, lo_a, hi_a), (_, lo_b, hi_b) in zip(a, b):
        (names_a, ends_a), (names_b, ends_b) = tree.name_span(lo_a, hi_a), tree.name_span(lo_b, hi_b)
        if not (np.array_equal(ends_a, ends_b) and np.array_equal(names_a, names_b)):
            return False
    return True


class _Names(NamedTuple):
    """A batch's file names (``processid.jpg``), for the join and the name order."""

    padded: np.ndarray       #: uint8 (rows, width): the names NUL-padded, cut at _PADDED_MAX
    lengths: np.ndarray      #: their lengths (int32)
    whole: Any               #: the names as binary when ``padded`` cuts one (a hostile CSV), else None

    @classmethod
    def of(cls, file_names: Any) -> "_Names":
        import pyarrow as pa

        from .merge import fixed_width  # build only: a remount starts sooner without merge

        file_names = file_names.cast(pa.large_binary())
        offsets = np.frombuffer(file_names.buffers()[1], dtype=np.int64)[file_names.offset:][:len(file_names) + 1]
        lengths = np.diff(offsets)
        longest = int(lengths.max(initial=0))
        width = min(longest, _PADDED_MAX)
        data = np.frombuffer(file_names.buffers()[2], dtype=np.uint8) if len(file_names) else np.zeros(0, np.uint8)
        padded = fixed_width(np.concatenate((data, np.zeros(width, np.uint8))), offsets[:-1], offsets[1:], width)
        return cls(padded, lengths.astype(np.int32), file_names if longest > width else None)

    def binary(self) -> Any:
        """The names as a pyarrow large_binary array."""
        import pyarrow as pa

        if self.whole is not None:
            return self.whole
        offsets = np.concatenate(([0], np.cumsum(self.lengths, dtype=np.int64)))
        data = self.padded[np.arange(self.padded.shape[1]) < self.lengths[:, None]]
        return pa.Array.from_buffers(pa.large_binary(), len(self.lengths), [None, pa.py_buffer(offsets),
                                                                             pa.py_buffer(data)])


class _Batch(NamedTuple):
    """What one batch of CSV rows gives the plan, made as the batch comes (``of``): all that
    needs no other row."""

    names: _Names
    usable: np.ndarray       #: a processid that can be a file name: not empty, no '/' or NUL
    split: np.ndarray        #: its split's rank in _SPLIT_NAMES, -1 when not one of them
    spans: List[np.ndarray]  #: per joined imgtype (``_Images``): its image folder, or -1
    labels: List[Any]        #: per rank: the labels, dictionary-encoded (a DictionaryArray)

    @classmethod
    def of(cls, batch: Any, images: _Images, ranks: Sequence[str]) -> "_Batch":
        import pyarrow.compute as pc

        pid = batch.column("processid")
        names = _Names.of(pc.binary_join_element_wise(pid, b".jpg", b""))
        usable = pc.and_(pc.greater(pc.binary_length(pid), 0),
                         pc.invert(pc.or_(pc.match_substring(pid, b"/"), pc.match_substring(pid, b"\0"))))
        split = _splits(pc.dictionary_encode(batch.column("split")))
        folder, paths = _folder_paths(pc.dictionary_encode(batch.column("chunk")), split)
        return cls(names, usable.to_numpy(zero_copy_only=False), split,
                   images.spans_of(folder, paths),
                   [pc.dictionary_encode(batch.column(rank)) for rank in ranks])


def _read(batches: Iterator[Any], images: _Images, ranks: Sequence[str]
          ) -> Tuple[List[_Batch], List[List[np.ndarray]]]:
    """Every batch of the CSV as it comes (``_Batch``), and the image rows of each group of
    batches of about _JOIN_ROWS rows (``_Images.join``): per group, per joined imgtype.

    Why a thread: the streaming reader parses the next batch on this one meanwhile (and
    the CSV inflates on a third: ``piped``); one worker, so the batches stay in order."""
    done: List[_Batch] = []
    found: List[List[np.ndarray]] = []
    group = [0]   # the first batch not joined

    def take(batch: Any) -> None:
        done.append(_Batch.of(batch, images, ranks))
        if sum(len(b.usable) for b in done[group[0]:]) >= _JOIN_ROWS:
            found.append(images.join(done[group[0]:]))
            group[0] = len(done)

    with ThreadPoolExecutor(max_workers=1) as worker:
        queued: Deque[Any] = collections.deque()
        for batch in batches:
            queued.append(worker.submit(take, batch))
            while len(queued) > _QUEUED or (queued and queued[0].done()):
                queued.popleft().result()   # the worker's error, raised here
        for future in queued:
            future.result()
    found.append(images.join(done[group[0]:]))
    images.done()
    return done, found


class _Rows(NamedTuple):
    """What every rank's views are made from: per CSV row, the rows in the byte order of
    their file names (so a sort by folder that keeps that order sorts by folder and name)."""

    by_name: np.ndarray                       #: the rows in the byte order of their file names
    split_rank: np.ndarray                    #: in that order: its split in _SPLIT_NAMES, -1 when left out
    images: List[Tuple[bytes, np.ndarray]]    #: per imgtype, in that order: its image row or -1


def _plan(images: _Images, batches: List[_Batch], found: List[List[np.ndarray]], ranks: Sequence[str],
          mtime: int) -> Plan:
    """The plan from every batch: what needs all rows (the name order, the repeats, each
    rank's label codes and folders). Empties ``batches`` as it takes their columns (each
    is a few hundred MB at 5 M rows: peak memory)."""
    import pyarrow as pa

    names, usable, splits, _, labels = (list(column) for column in zip(*batches)) if batches \
        else ([], [], [], [], [])
    batches.clear()
    columns = [pa.chunked_array([per_rank[i] for per_rank in labels], pa.dictionary(pa.int32(), pa.binary()))
               for i in range(len(ranks))]
    del labels
    # Longest first: the rank with the most labels per batch (dna_bin) takes most of its
    # thread's time, in merging the batches' dictionaries above all.
    sizes = [sum(len(chunk.dictionary) for chunk in column.chunks) for column in columns]
    first = sorted(range(len(ranks)), key=lambda i: -sizes[i])
    # The ranks in threads: numpy's sorts and pyarrow release the GIL. Their dictionaries
    # merge while this thread puts the rows in name order.
    with ThreadPoolExecutor(max_workers=min(len(ranks), os.cpu_count() or 1) or 1) as pool:
        merged = {i: pool.submit(columns[i].combine_chunks) for i in first}
        del columns
        rows, stats = _rows(images, names, usable, splits, found)
        del names, usable, splits
        found.clear()
        done = {i: pool.submit(lambda i: _rank_views(ranks[i], merged[i].result(), rows), i) for i in first}
        per_rank = [done[i].result() for i in range(len(ranks))]
    dirs = [group for part in per_rank for group in part[0]]
    counts = [c for part in per_rank for c in part[1]]
    targets = [t for part in per_rank for t in part[2]]
    class_files = [f for part in per_rank for f in part[3]]
    zipped, members = _classes_zip(class_files, mtime)
    stats.update(view_files=int(sum(len(t) for t in targets)), view_folders=sum(len(n) for _, _, n in dirs))
    return Plan(dirs, np.concatenate(counts) if counts else np.zeros(0, np.int64),
                np.concatenate(targets) if targets else np.zeros(0, np.int64),
                [base for base, _ in class_files], zipped, members, stats)


def _rows(images: _Images, names: List[_Names], usable: List[np.ndarray], splits: List[np.ndarray],
          found: List[List[np.ndarray]]) -> Tuple["_Rows", Dict[str, Any]]:
    """What every rank's views are made from (``_Rows``), and the counts for the log."""
    by_name, repeated = _name_order(names)   # stable: a repeated processid after its first row
    repeats = by_name[1:][repeated]
    keep = _concat(usable, bool)
    stats: Dict[str, Any] = {"csv_rows": len(keep), "processids_repeated": len(repeats)}
    if len(repeats):
        log.info("views: %d CSV rows repeat a processid listed before; the first row of each wins", len(repeats))
    keep[repeats] = False
    split_rank = _concat(splits, np.int32)
    split_rank[~keep] = -1   # a row left out is as a row of no split: in no view
    image_rows = images.all_rows([_concat([rows[j] for rows in found], np.int32)
                                  for j in range(sum(joined for _, _, joined in images.imgtypes))])
    for imgtype, rows_of in image_rows:
        stats[f"missing_{imgtype.decode('utf-8', 'replace')}"] = int(((rows_of < 0) & (split_rank >= 0)).sum())
    return _Rows(by_name, split_rank[by_name], [(imgtype, rows_of[by_name]) for imgtype, rows_of in image_rows]), stats


def _concat(parts: List[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _rank_views(rank: str, column: Any, rows: _Rows) -> Tuple[list, list, list, list]:
    """One rank's (folder groups, files per folder, image rows, classes.txt files), per imgtype."""
    label_rank, names = _labels(column)
    width = max(len(names), 1)
    wide = np.int32 if len(_SPLIT_NAMES) * width < 1 << 31 else np.int64   # half the bytes of int64 keys
    label = label_rank[rows.by_name]   # in file name order from here on
    key = np.where((label >= 0) & (rows.split_rank >= 0), rows.split_rank.astype(wide) * width + label, -1)
    at = np.flatnonzero(key >= 0)
    at = at[_stable_order(key[at])]   # by folder, then by file name
    key = key[at]
    dirs, counts, targets, class_files = [], [], [], []
    for imgtype, image_rows in rows.images:
        found = image_rows[at]
        has = found >= 0
        sorted_keys = key[has]
        base = VIEWS + b"/" + rank.encode() + b"/" + imgtype
        starts = np.flatnonzero(np.diff(sorted_keys, prepend=-1))
        firsts = sorted_keys[starts]
        present = np.zeros(width, dtype=bool)
        present[firsts % width] = True   # from the folders, not per file
        class_files.append((base, b"".join(names[i] + b"\n" for i in np.flatnonzero(present).tolist())))
        firsts = firsts.tolist()
        dirs.append((base, [_SPLIT_NAMES[k // width] for k in firsts], [names[k % width] for k in firsts]))
        counts.append(np.diff(np.append(starts, len(sorted_keys))))
        targets.append(found[has])
    return dirs, counts, targets, class_files


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """The stable order of non-negative integer ``keys`` (a label folder: split and label).

    Keys under 2**16: numpy's stable sort of uint16, a radix sort (linear). Larger ones,
    when a key and a row number fit in 64 bits together: a sort of those words (numpy's
    quicksort, SIMD where the CPU has it; the row number breaks ties, so the order is
    stable), 3x faster than two 16-bit radix passes on dna_bin's 2.5 M folder keys."""
    if len(keys) == 0:
        return np.zeros(0, np.intp)
    top = int(keys.max())
    if top < 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    bits = int(len(keys) - 1).bit_length()
    if top >> (64 - bits):
        return np.argsort(keys, kind="stable")
    words = keys.astype(np.uint64) << np.uint64(bits) | np.arange(len(keys), dtype=np.uint64)
    words.sort()
    return (words & np.uint64((1 << bits) - 1)).astype(np.intp)


def _name_order(parts: List[_Names]) -> Tuple[np.ndarray, np.ndarray]:
    """(the stable order of the file names of ``parts``, one after the other, by their
    bytes; whether each name but the first in that order equals the one before).

    Sorted in C without the GIL (``merge.order_by_dir_and_name``: 16-byte integer keys, the
    rest compared only on a tie), each name in the folder of its first two bytes (NUL when
    shorter), so that the folders, in name order themselves, are sorted on every core:
    1.4-2.9x faster than the radix passes over 16-bit digits it replaced (docs/views.md)."""
    from .merge import order_by_dir_and_name  # build only: a remount starts sooner without merge

    blob, begins, lengths = _name_blob(parts)
    ends = len(blob) - 1   # blob ends in two NULs: the second byte of a name of one byte, or none
    head = blob[begins].astype(np.uint32) << 8 | blob[np.minimum(begins + 1, ends)] * (lengths > 1)
    order, same, _ = order_by_dir_and_name(head * (lengths > 0), blob, begins, lengths, 1 << 16)
    return order, same[1:]


def _name_blob(parts: List[_Names]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the file names of ``parts`` in one array, followed by two NULs; where each begins;
    its length): the padded rows end to end when no name is longer than _SORT_WIDTH (no
    copy of each name), else the names end to end."""
    import pyarrow as pa

    lengths = _concat([p.lengths for p in parts], np.int32)
    width = int(lengths.max(initial=0))
    if width <= _SORT_WIDTH:
        rows = [_padded_to(p.padded, width).ravel() for p in parts]
        begins = np.arange(len(lengths), dtype=np.uint32 if len(lengths) * width < 1 << 32 else np.int64) * width
    else:
        names = pa.chunked_array([p.binary() for p in parts], pa.large_binary()).combine_chunks()
        begins = np.frombuffer(names.buffers()[1], np.int64)[names.offset:names.offset + len(names)]
        rows = [np.frombuffer(names.buffers()[2], np.uint8)[:int(begins[-1] + lengths[-1])]]
    return np.concatenate(rows + [np.zeros(2, np.uint8)]), begins, lengths


def _splits(split: Any) -> np.ndarray:
    """The rank of each row's split (a DictionaryArray) in _SPLIT_NAMES, -1 for a split that
    is not one of the dataset's."""
    values = split.dictionary.to_pylist()
    rank_of = np.array([_SPLIT_NAMES.index(v) if v in _SPLIT_NAMES else -1 for v in values] + [-1], dtype=np.int8)
    codes = split.indices.fill_null(len(values)).to_numpy(zero_copy_only=False)
    return rank_of[codes]


def _folder_paths(chunk: Any, split_rank: np.ndarray) -> Tuple[np.ndarray, Any]:
    """(each row's image folder below ``images/<imgtype>/`` as an index into the paths, -1
    for a row of an unknown split; the paths ``split/[chunk/]``).

    The folder follows the dataset's chunk rule (the CSV's chunk cut to the split's
    width), made once per split and distinct chunk value of a batch, not once per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = chunk.dictionary
    slots = len(values) + 1   # the last: a row with no chunk value
    paths = []
    for name in _SPLIT_NAMES:
        width = SPLIT_CHUNK_CHARS[name.decode()]
        if width:
            cut = pc.binary_join_element_wise(pc.binary_slice(values, 0, width), b"/", b"")
            paths.append(pc.binary_join_element_wise(name + b"/", cut, b"").cast(pa.binary()))
        else:
            paths.append(pa.array([name + b"/"] * len(values), pa.binary()))
        paths.append(pa.array([b""], pa.binary()))   # a chunked split's row with no chunk: no folder
    codes = chunk.indices.fill_null(len(values)).to_numpy(zero_copy_only=False).astype(np.int64)
    folder = np.where(split_rank >= 0, split_rank.astype(np.int64) * slots + codes, -1)
    return folder, pa.concat_arrays(paths)


def _labels(column: Any) -> Tuple[np.ndarray, List[bytes]]:
    """(each row's label (a DictionaryArray) as its rank among the folder names, -1 when
    empty; the folder names in byte order)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = column.dictionary.to_pylist()
    labelled = [i for i, v in enumerate(values) if v]
    folders = [label_name(values[i]) for i in labelled]
    order = pc.sort_indices(pa.array(folders, pa.binary())).to_numpy() if folders else np.zeros(0, np.int64)
    rank_of = np.full(len(values) + 1, -1, dtype=np.int32)
    rank_of[np.asarray(labelled, dtype=np.int64)[order]] = np.arange(len(order))
    codes = column.indices.fill_null(len(values)).to_numpy(zero_copy_only=False)
    return rank_of[codes], [folders[i] for i in order.tolist()]


def _classes_zip(files: List[Tuple[bytes, bytes]], mtime: int) -> Tuple[bytes, Members]:
    """An in-memory zip of the classes.txt files (stored), dated ``mtime`` (UTC), parsed."""
    from .sources import BytesSource
    from .zipdir import read_members

    out = io.BytesIO()
    stamp = time.gmtime(max(mtime, 315532800))[:6]   # DOS dates start in 1980
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for i, (_, text) in enumerate(files):   # a member's own name is not served: its row is placed
            info = zipfile.ZipInfo(f"classes/{i}.txt", stamp)
            info.external_attr = 0o100444 << 16
            zf.writestr(info, text)
    data = out.getvalue()
    return data, read_members(BytesSource(data, "classes"))
