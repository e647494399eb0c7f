"""The ZIP format: end records, ZIP64, the central directory as columns, local headers.

Owns every byte layout of APPNOTE.TXT (6.3.x); knows nothing of FUSE, caching or the
merged tree. Section numbers below refer to APPNOTE.TXT.

The central directory of a 5 M-member archive is walked in C (``_cdscan``, without the
GIL), straight into the member table: each record's row, its name, and whether that name
needs cleaning. When the walk declines (records that do not chain, a count that
disagrees, a ZIP64 extra that cannot be read), the same walk in numpy
(``walk_directory_numpy``: the reference a test holds the C walk to) names the fault.
Python touches single entries only for names that need cleaning (rare) and for archives
where a signature scan finds a false signature.

Not supported here: encryption of the central directory (4.4.4 bit 13), and archives
whose records need more than 64 extra-field blocks per entry.
"""
from __future__ import annotations

import functools
import hashlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import List, NamedTuple, Sequence, Tuple

import numpy as np

from . import _cdscan
from .errors import ArchiveError, MemberError
from .names import NAME_MAX, clean_name

# 4.3.16 End of central directory record
EOCD = struct.Struct("<4sHHHHIIH")
EOCD_SIG = b"PK\x05\x06"
# 4.3.15 Zip64 end of central directory locator
EOCD64_LOCATOR = struct.Struct("<4sIQI")
EOCD64_LOCATOR_SIG = b"PK\x06\x07"
# 4.3.14 Zip64 end of central directory record
EOCD64 = struct.Struct("<4sQHHIIQQQQ")
EOCD64_SIG = b"PK\x06\x06"
# 4.3.12 Central directory file header, as a packed numpy record (46 bytes)
CENTRAL_SIG = 0x02014B50
CENTRAL_DTYPE = np.dtype([
    ("signature", "<u4"), ("version_made_by", "<u2"), ("version_needed", "<u2"),
    ("flags", "<u2"), ("method", "<u2"), ("mod_time", "<u2"), ("mod_date", "<u2"),
    ("crc32", "<u4"), ("compressed_size", "<u4"), ("uncompressed_size", "<u4"),
    ("name_length", "<u2"), ("extra_length", "<u2"), ("comment_length", "<u2"),
    ("disk_start", "<u2"), ("internal_attr", "<u2"), ("external_attr", "<u4"),
    ("local_header_offset", "<u4"),
])
assert CENTRAL_DTYPE.itemsize == 46
# 4.3.7 Local file header
LOCAL = struct.Struct("<4sHHHHHIIIHH")
LOCAL_SIG = b"PK\x03\x04"
# 4.5.3 Zip64 extended information extra field
ZIP64_EXTRA_ID = 0x0001
MAX_EXTRA_BLOCKS = 64

FLAG_ENCRYPTED = 0x0001
FLAG_DATA_DESCRIPTOR = 0x0008
FLAG_UTF8 = 0x0800
MADE_BY_UNIX = 3

#: One member, as the index stores it; offsets are global offsets in the archive's source;
#: ``archive`` is filled in by the index when several archives are merged.
MEMBER_DTYPE = np.dtype([
    ("header_offset", "<u8"), ("compressed_size", "<u8"), ("size", "<u8"),
    ("crc32", "<u4"), ("mtime", "<i8"), ("method", "<u2"), ("flags", "<u2"),
    ("mode", "<u2"), ("name_length", "<u2"), ("archive", "<u2"), ("extra_room", "<u2"),
])
#: Declared sizes at or above this are refused: st_size is a signed 64-bit number.
SIZE_LIMIT = 1 << 63



class Member(NamedTuple):
    """One row of MEMBER_DTYPE as Python ints: what the reader needs of a member."""

    header_offset: int
    compressed_size: int
    size: int
    crc32: int
    mtime: int
    method: int
    flags: int
    mode: int
    name_length: int
    archive: int
    extra_room: int   #: the longest local extra field that keeps the data clear of the next member


assert Member._fields == MEMBER_DTYPE.names
# The C walk writes these rows itself: its layout must be this dtype's.
assert _cdscan.ROW_FIELDS == tuple((name, MEMBER_DTYPE.fields[name][1]) for name in MEMBER_DTYPE.names)
assert _cdscan.ROW_BYTES == MEMBER_DTYPE.itemsize

#: How much of the file tail may hold the end record (22 bytes + a 64 KiB comment).
_TAIL = EOCD.size + 0xFFFF + EOCD64_LOCATOR.size + EOCD64.size


class Source:
    """What zipdir needs of an archive: a name, a size and positional reads.

    ``disk_bases[d]`` is where disk ``d`` of a spanned set starts in the source; a single
    file has one disk at 0.
    """

    name: str
    size: int
    disk_bases: Sequence[int]

    def pread(self, size: int, offset: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError


class EndRecord(NamedTuple):
    entries: int
    cd_size: int
    cd_offset: int       #: as recorded, relative to the disk the directory starts on
    cd_disk: int
    cd_start: int        #: where the directory really is in the source
    prefix: int          #: bytes prepended to the archive (self-extractor stub, ...)


class Members(NamedTuple):
    """An archive's member table: one MEMBER_DTYPE row and one clean path per member."""

    table: np.ndarray        #: MEMBER_DTYPE, central-directory order
    names: np.ndarray        #: uint8 blob of clean UTF-8 paths
    name_ends: np.ndarray    #: uint64, name i is names[name_ends[i-1]:name_ends[i]]
    is_dir: np.ndarray       #: bool, explicit directory entries
    warnings: List[str]      #: one line per member that was skipped or renamed
    digest: str              #: of what the table is made of (``directory_digest``)


def read_end_record(src: Source) -> EndRecord:
    """Find the end records (4.3.14-4.3.16) and where the directory really is."""
    if src.size < EOCD.size:
        raise ArchiveError(src.name, "not a zip file (too small for an end record)")
    tail_start = max(0, src.size - _TAIL)
    tail = src.pread(src.size - tail_start, tail_start)
    pos = tail.rfind(EOCD_SIG, 0, len(tail) - EOCD.size + len(EOCD_SIG))
    while pos >= 0:
        (_, disk, cd_disk, n_disk, entries, cd_size, cd_offset, comment_len) = EOCD.unpack_from(tail, pos)
        if pos + EOCD.size + comment_len == len(tail):
            break
        pos = tail.rfind(EOCD_SIG, 0, pos)
    else:
        raise ArchiveError(src.name, "not a zip file (no end of central directory record; truncated?)")
    eocd_at = tail_start + pos
    loc_at = pos - EOCD64_LOCATOR.size
    if loc_at >= 0 and tail[loc_at:loc_at + 4] == EOCD64_LOCATOR_SIG:
        _, _, eocd64_offset, _ = EOCD64_LOCATOR.unpack_from(tail, loc_at)
        rec_at = loc_at - EOCD64.size
        if rec_at < 0 or tail[rec_at:rec_at + 4] != EOCD64_SIG:
            raise ArchiveError(src.name, "ZIP64 locator found but no ZIP64 end record before it")
        (_, _, _, _, disk, cd_disk, n_disk, entries, cd_size, cd_offset) = EOCD64.unpack_from(tail, rec_at)
        directory_end = tail_start + rec_at
        recorded_end = eocd64_offset
    else:
        directory_end = eocd_at
        recorded_end = cd_offset + cd_size
    if disk + 1 != len(src.disk_bases):
        if len(src.disk_bases) == 1:
            raise ArchiveError(src.name, f"is the last piece ({disk + 1}) of a spanned set whose other pieces "
                                         f"(.z01 ...) are missing")
        raise ArchiveError(src.name, f"spanned set has {len(src.disk_bases)} pieces, its end record says {disk + 1}")
    if len(src.disk_bases) > 1:
        cd_start = _global(src, cd_disk, cd_offset)
        prefix = 0
    else:
        prefix = directory_end - recorded_end
        cd_start = cd_offset + prefix
    if prefix < 0 or cd_start < 0 or cd_start + cd_size > directory_end:
        raise ArchiveError(src.name,
                           f"central directory ({cd_size} bytes at {cd_offset}) lies outside the file; truncated?")
    if entries and cd_size < entries * CENTRAL_DTYPE.itemsize:
        raise ArchiveError(src.name, f"end record claims {entries} members in a {cd_size}-byte directory")
    return EndRecord(entries, cd_size, cd_offset, cd_disk, cd_start, prefix)


def _global(src: Source, disk: int, offset: int) -> int:
    if disk >= len(src.disk_bases):
        raise ArchiveError(src.name, f"refers to disk {disk + 1} of a set of {len(src.disk_bases)}")
    return src.disk_bases[disk] + offset


class Placement(NamedTuple):
    """Where an archive's members are: what turns a record's offset into a global one and
    bounds where its data may lie."""

    bases: Tuple[int, ...]   #: where each disk starts in the source ((0,) for a single file)
    prefix: int              #: bytes before the archive (EndRecord.prefix; 0 for a spanned set)
    data_end: int            #: where the central directory starts: no member data past it


class Walk(NamedTuple):
    """The central directory walked: the member table and each raw name."""

    table: np.ndarray        #: MEMBER_DTYPE, central-directory order
    names: np.ndarray        #: uint8, the raw names end to end
    name_ends: np.ndarray    #: uint64, raw name i is names[name_ends[i-1]:name_ends[i]]
    suspect: np.ndarray      #: bool, names that need cleaning (see _suspect_names)


def _directory(src: Source) -> Tuple[EndRecord, bytes]:
    """The end record and the central directory's bytes: all a member table is made of."""
    end = read_end_record(src)
    directory = src.pread(end.cd_size, end.cd_start)
    if len(directory) != end.cd_size:
        raise ArchiveError(src.name, "central directory is truncated")
    return end, directory


def _digest(src: Source, end: EndRecord, directory: bytes) -> str:
    """SHA-256 (128 bits kept) of the source's size, its pieces' starts, the end record and the
    directory's bytes: equal digests give equal member tables (``read_members`` reads nothing
    else), so an archive whose mtime changed but whose digest did not needs no parse."""
    digest = hashlib.sha256(json.dumps([src.size, list(src.disk_bases), list(end)]).encode() + b"\0")
    digest.update(directory)   # not joined to the head: that would copy a directory of hundreds of MB
    return digest.hexdigest()[:32]


def directory_digest(src: Source) -> str:
    """The digest ``read_members`` gives the archive's table, without parsing it: one read of
    its end record and central directory (raises ArchiveError or OSError as that does)."""
    return _digest(src, *_directory(src))


def read_members(src: Source) -> Members:
    """Parse the whole central directory into a member table (no local header is read)."""
    end, directory = _directory(src)
    # The digest on a core of its own beside the walk (both without the GIL): free where
    # the index build leaves cores idle, as on any machine of more than two.
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(_digest, src, end, directory)
        buf = np.frombuffer(directory, dtype=np.uint8)
        del directory
        bases = tuple(src.disk_bases) if len(src.disk_bases) > 1 else (0,)
        table, raw, raw_ends, suspect = walk_directory(src.name, buf, end.entries, Placement(bases, end.prefix,
                                                                                              end.cd_start))
        del buf
    names, ends, keep, is_dir, warnings = _clean_names(src.name, raw, raw_ends, suspect, table["flags"])
    impossible = keep & (table["size"] >= np.uint64(SIZE_LIMIT))
    if impossible.any():
        keep, names, ends, is_dir = _drop(keep, impossible, names, ends, is_dir)
        warnings.append(f"{src.name}: {int(impossible.sum())} members declare a size of 2^63 bytes or more: skipped")
    return Members(table if keep.all() else table[keep], names, ends, is_dir, warnings, digest.result())


def walk_directory(archive: str, buf: np.ndarray, entries: int, place: Placement) -> Walk:
    """The ``entries`` records of the directory ``buf`` as a member table, walked in C
    without the GIL (so a parse thread overlaps the merge) straight into the arrays
    returned; walk_directory_numpy (the reference) when the C walk declines, which names
    the fault.

    The output arrays are bounded by the directory's size: ``entries`` records of 46
    bytes must fit it (read_end_record checks it too).
    """
    if entries * CENTRAL_DTYPE.itemsize > len(buf):
        return walk_directory_numpy(archive, buf, entries, place)
    table = np.empty(entries, dtype=MEMBER_DTYPE)
    names = np.empty(len(buf) - entries * CENTRAL_DTYPE.itemsize, dtype=np.uint8)
    ends = np.empty(entries, dtype=np.uint64)
    suspect = np.empty(entries, dtype=bool)
    days, times = _dos_tables()
    written, rooms = _cdscan.scan(buf, entries, NAME_MAX, np.asarray(place.bases, dtype=np.uint64), place.prefix,
                                  place.data_end, days, times, table.view(np.uint8), names, ends,
                                  suspect.view(np.uint8))
    if written < 0:
        return walk_directory_numpy(archive, buf, entries, place)
    if not rooms:   # local headers out of directory order, or a fault _extra_room names
        table["extra_room"] = _extra_room(archive, table["header_offset"], table["compressed_size"],
                                          table["name_length"], place.data_end)
    # Extra fields and comments leave room unused: keep it only while it is small.
    names = names[:written] if 2 * written >= len(names) else names[:written].copy()
    return Walk(table, names, ends, suspect)


def walk_directory_numpy(archive: str, buf: np.ndarray, entries: int, place: Placement) -> Walk:
    """The same walk in numpy: the reference for the C walk, and what names the fault when
    the records do not chain, their count disagrees with the end record, or a ZIP64 extra
    field or a disk number cannot be read."""
    starts, head, raw, raw_ends, suspect = scan_directory_numpy(archive, buf, entries)
    sizes = head["uncompressed_size"].astype(np.uint64)
    csizes = head["compressed_size"].astype(np.uint64)
    offsets = head["local_header_offset"].astype(np.uint64)
    disks = head["disk_start"].astype(np.uint64)
    _apply_zip64(archive, buf, starts, head, sizes, csizes, offsets, disks)

    bases = np.asarray(place.bases, dtype=np.uint64)
    if int(disks.max(initial=0)) >= len(bases):
        raise ArchiveError(archive, f"a member starts on disk {int(disks.max()) + 1} of a set of {len(bases)}")
    header_offsets = bases[disks.astype(np.intp)] + offsets + np.uint64(place.prefix)
    table = np.zeros(len(starts), dtype=MEMBER_DTYPE)
    table["header_offset"] = header_offsets
    table["compressed_size"] = csizes
    table["size"] = sizes
    table["crc32"] = head["crc32"]
    table["mtime"] = dos_to_unix(head["mod_date"], head["mod_time"])
    table["method"] = head["method"]
    table["flags"] = head["flags"]
    unix = (head["version_made_by"] >> 8) == MADE_BY_UNIX
    table["mode"] = np.where(unix, head["external_attr"] >> 16, 0)
    table["name_length"] = head["name_length"]
    table["extra_room"] = _extra_room(archive, header_offsets, csizes, head["name_length"], place.data_end)
    return Walk(table, raw, raw_ends, suspect)


def _extra_room(archive: str, offsets: np.ndarray, csizes: np.ndarray, name_lengths: np.ndarray,
                data_end: int) -> np.ndarray:
    """Check that every member's local header, name and data lie before the directory and
    that no two overlap (the trick of overlapping zip bombs); return each member's room
    for its local extra field, which only its local header gives.

    The central directory does not say how long a local extra field is, so the extent
    checked here is a lower bound. The room (the gap to the next member, or to the
    directory, at most 65,535) is what the local header's extra length may use: a reader
    refuses a member whose data would start in the next one's (two members sharing one
    stream through their local extra lengths).
    """
    limit = np.uint64(data_end)
    ends = offsets + np.uint64(LOCAL.size) + name_lengths.astype(np.uint64) + csizes
    past = np.flatnonzero((offsets > limit) | (csizes > limit) | (ends > limit))
    if len(past):
        i = int(past[0])
        raise ArchiveError(archive, f"member #{i} (local header at {int(offsets[i])}, {int(csizes[i])} bytes) "
                                    f"lies past the data area; truncated or corrupt directory")
    order = np.argsort(offsets, kind="stable")
    starts, stops = offsets[order], ends[order]
    overlap = np.flatnonzero(stops[:-1] > starts[1:])
    if len(overlap):
        first, second = int(order[overlap[0]]), int(order[overlap[0] + 1])
        raise ArchiveError(archive, f"members #{first} and #{second} overlap in the archive")
    following = np.append(starts[1:], limit)
    room = np.empty(len(offsets), dtype=np.uint16)
    room[order] = np.minimum(following - stops, np.uint64(0xFFFF))
    return room


def _drop(keep: np.ndarray, drop: np.ndarray, names: np.ndarray, ends: np.ndarray, is_dir: np.ndarray
          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Leave rows out of the cleaned names: ``keep`` and ``drop`` are masks over all
    members, ``names``/``ends``/``is_dir`` cover the kept ones. Returns them all anew."""
    gone = drop[keep]
    lengths = np.diff(ends.astype(np.int64), prepend=0)
    names = names[np.repeat(~gone, lengths)]
    return keep & ~drop, names, np.cumsum(lengths[~gone]).astype(np.uint64), is_dir[~gone]


class Scan(NamedTuple):
    """The central directory walked record by record (the reference walk's raw output)."""

    starts: np.ndarray       #: int64, where each record starts in the directory
    head: np.ndarray         #: CENTRAL_DTYPE, each record's fixed fields
    names: np.ndarray        #: uint8, the raw names end to end
    name_ends: np.ndarray    #: uint64, raw name i is names[name_ends[i-1]:name_ends[i]]
    suspect: np.ndarray      #: bool, names that need cleaning (see _suspect_names)


def scan_directory_numpy(archive: str, buf: np.ndarray, entries: int) -> Scan:
    """The records of the directory, walked in numpy (walk_directory_numpy's first step)."""
    starts = _record_starts(archive, buf)
    if len(starts) != entries:
        raise ArchiveError(archive, f"end record counts {entries} members, the directory holds {len(starts)}")
    head = _gather(buf, starts, CENTRAL_DTYPE)
    names, ends = gather_segments(buf, starts + CENTRAL_DTYPE.itemsize, head["name_length"])
    return Scan(starts, head, names, ends, _suspect_names(names, ends))


def _record_starts(archive: str, buf: np.ndarray) -> np.ndarray:
    """Offsets of every central header, found by a bulk signature scan.

    The candidates are accepted only when they form one unbroken chain from offset 0 to
    the end; otherwise (a name that contains the signature) the records are walked one
    by one.
    """
    size = len(buf)
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    hits = []
    for align in range(min(4, size)):  # a directory of 1-3 bytes (with no entries) is possible
        words = np.frombuffer(buf, dtype="<u4", count=(size - align) // 4, offset=align)
        hits.append(np.flatnonzero(words == CENTRAL_SIG) * 4 + align)
    starts = np.sort(np.concatenate(hits)).astype(np.int64)
    if len(starts) and starts[0] == 0 and np.all(starts + CENTRAL_DTYPE.itemsize <= size):
        nxt = starts + _record_lengths(buf, starts)
        if np.array_equal(nxt[:-1], starts[1:]) and nxt[-1] == size:
            return starts
    return _walk_records(archive, buf)


def _record_lengths(buf: np.ndarray, starts: np.ndarray) -> np.ndarray:
    lengths = np.full(len(starts), CENTRAL_DTYPE.itemsize, dtype=np.int64)
    for field_at in (28, 30, 32):  # name, extra and comment lengths
        lengths += _u16(buf, starts + field_at)
    return lengths


def _walk_records(archive: str, buf: np.ndarray) -> np.ndarray:
    """The slow, sure way: follow the records one at a time."""
    data = buf.tobytes()
    size, pos, starts = len(data), 0, []
    head = struct.Struct("<I24xHHH")
    while pos < size:
        if pos + CENTRAL_DTYPE.itemsize > size:
            raise ArchiveError(archive, f"central directory entry #{len(starts)} is cut short")
        sig, n, m, k = head.unpack_from(data, pos)
        if sig != CENTRAL_SIG:
            raise ArchiveError(archive, f"central directory entry #{len(starts)} has a bad signature")
        starts.append(pos)
        pos += CENTRAL_DTYPE.itemsize + n + m + k
    if pos != size:
        raise ArchiveError(archive, f"central directory entry #{len(starts) - 1} runs past the directory")
    return np.asarray(starts, dtype=np.int64)


def _gather(buf: np.ndarray, starts: np.ndarray, dtype: np.dtype, chunk: int = 1 << 16) -> np.ndarray:
    """Copy ``dtype.itemsize`` bytes at each start into a packed record array."""
    out = np.empty(len(starts), dtype=dtype)
    if len(starts) == 0:
        return out
    raw = out.view(np.uint8).reshape(len(starts), dtype.itemsize)
    windows = np.lib.stride_tricks.sliding_window_view(buf, dtype.itemsize)
    for lo in range(0, len(starts), chunk):
        raw[lo:lo + chunk] = windows[starts[lo:lo + chunk]]
    return out


def _u16(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    return buf[at].astype(np.int64) | (buf[at + 1].astype(np.int64) << 8)


def _u64(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    return _gather(buf, at, np.dtype("<u8"))


def _apply_zip64(archive: str, buf: np.ndarray, starts: np.ndarray, head: np.ndarray,
                 sizes: np.ndarray, csizes: np.ndarray, offsets: np.ndarray, disks: np.ndarray) -> None:
    """Replace saturated fields by the ZIP64 extra field's 8-byte values (4.5.3), in place."""
    fields = [(head["uncompressed_size"] == 0xFFFFFFFF, sizes, 8),
              (head["compressed_size"] == 0xFFFFFFFF, csizes, 8),
              (head["local_header_offset"] == 0xFFFFFFFF, offsets, 8),
              (head["disk_start"] == 0xFFFF, disks, 4)]
    needs = np.flatnonzero(fields[0][0] | fields[1][0] | fields[2][0] | fields[3][0])
    if len(needs) == 0:
        return
    extra_at = starts[needs] + CENTRAL_DTYPE.itemsize + head["name_length"][needs]
    extra_end = extra_at + head["extra_length"][needs]
    block = extra_at.copy()
    found = np.full(len(needs), -1, dtype=np.int64)
    for _ in range(MAX_EXTRA_BLOCKS):
        live = np.flatnonzero((found < 0) & (block + 4 <= extra_end))
        if len(live) == 0:
            break
        ids = _u16(buf, block[live])
        hit = live[ids == ZIP64_EXTRA_ID]
        found[hit] = block[hit]
        block[live] += 4 + _u16(buf, block[live] + 2)
    missing = np.flatnonzero(found < 0)
    if len(missing):
        raise ArchiveError(archive, f"member #{int(needs[missing[0]])} needs a ZIP64 extra field and has none")
    cursor = found + 4
    block_end = cursor + _u16(buf, found + 2)
    overrun = np.flatnonzero(block_end > extra_end)
    if len(overrun):
        raise ArchiveError(archive,
                           f"member #{int(needs[overrun[0]])} has a ZIP64 extra field that runs past its entry")
    for saturated, column, width in fields:
        rows = np.flatnonzero(saturated[needs])
        if len(rows) == 0:
            continue
        if np.any(cursor[rows] + width > block_end[rows]):
            bad = rows[cursor[rows] + width > block_end[rows]][0]
            raise ArchiveError(archive, f"member #{int(needs[bad])} has a ZIP64 extra field that is too short")
        at = cursor[rows]
        values = _u64(buf, at) if width == 8 else _gather(buf, at, np.dtype("<u4")).astype(np.uint64)
        column[needs[rows]] = values
        cursor[rows] += width


def gather_segments(buf: np.ndarray, begins: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The segments buf[begin:begin+length] end to end, plus their end offsets (uint64).

    One memcpy a segment, in C without the GIL (every segment is bounded by ``buf`` first):
    O(total bytes), so one very long name costs its own length, not a row that wide for
    every member.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
    _cdscan.gather(buf, np.asarray(begins, dtype=np.int64), lengths, out)
    return out, ends.astype(np.uint64)


def _suspect_names(raw: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which names need cleaning (names.clean_name); the rest are kept as they are.

    A name is plain when it is not empty, printable ASCII without a backslash, does not
    start with '/' or '.', does not end with '/', has no '/' followed by '/' or '.', and
    is at most NAME_MAX bytes long. Everything else is rare. (_cdscan.c's
    needs_cleaning says the same in C; a test holds the two to one answer.)
    """
    n = len(ends)
    ends = ends.astype(np.int64)
    begins = np.concatenate(([0], ends[:-1])).astype(np.int64)
    bad_at = _odd_positions(raw, raw.tobytes())
    suspect = np.zeros(n, dtype=bool)
    if len(bad_at):
        suspect[np.searchsorted(ends, bad_at, side="right")] = True
    nonempty = ends > begins
    first = raw[np.minimum(begins, max(len(raw) - 1, 0))] if len(raw) else np.zeros(n, np.uint8)
    last = raw[np.maximum(ends - 1, 0)] if len(raw) else np.zeros(n, np.uint8)
    suspect |= ~nonempty | (first == ord("/")) | (first == ord(".")) | (last == ord("/"))
    suspect |= (ends - begins) > NAME_MAX  # a component may be too long
    return suspect


def _clean_names(archive: str, raw: np.ndarray, ends: np.ndarray, suspect: np.ndarray, flags: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, List[str]]:
    """Keep plain names as they are and send the ``suspect`` ones through names.clean_name."""
    n = len(ends)
    is_dir = np.zeros(n, dtype=bool)
    if not suspect.any():
        return raw, ends, np.ones(n, dtype=bool), is_dir, []

    ends = ends.astype(np.int64)
    begins = np.concatenate(([0], ends[:-1])).astype(np.int64)
    data = raw.tobytes()
    keep = np.ones(n, dtype=bool)
    lengths = ends - begins
    warnings: List[str] = []
    pieces: List[bytes] = []
    cursor = 0
    for i in np.flatnonzero(suspect).tolist():
        pieces.append(data[cursor:begins[i]])
        cursor = int(ends[i])
        original = data[begins[i]:cursor]
        clean, note = clean_name(original, bool(flags[i] & FLAG_UTF8))
        if note:
            warnings.append(f"{archive}: {_shown(original)}: {note}")
        if clean is None:
            keep[i] = False
            continue
        is_dir[i] = original.endswith((b"/", b"\\"))
        pieces.append(clean)
        lengths[i] = len(clean)
    pieces.append(data[cursor:])
    blob = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    return blob, np.cumsum(lengths[keep]).astype(np.uint64), keep, is_dir[keep], warnings


def _shown(name: bytes, most: int = 512) -> str:
    """A name for a message: escaped, and cut in the middle when long (a hostile name of
    64 KB would otherwise be one 64 KB log line)."""
    text = name.decode("utf-8", "backslashreplace")
    return text if len(text) <= most else f"{text[:most // 2]}...({len(name):,} bytes)...{text[-most // 2:]}"


_PLAIN_BYTES = bytes(range(0x20, 0x7F)).replace(b"\\", b"")


def _odd_positions(raw: np.ndarray, data: bytes) -> np.ndarray:
    """Blob positions of bytes that make a name need cleaning: control, non-ASCII or
    backslash bytes, and '/' followed by '/' or '.'. Clean blobs cost two C scans."""
    found = []
    if data.translate(None, _PLAIN_BYTES):
        found.append(np.flatnonzero((raw < 0x20) | (raw > 0x7E) | (raw == ord("\\"))))
    pairs = []
    for pair in (b"//", b"/."):
        at = data.find(pair)
        while at >= 0:
            pairs.append(at)
            at = data.find(pair, at + 1)
    found.append(np.asarray(pairs, dtype=np.int64))
    return np.concatenate(found)


def dos_to_unix(dates: np.ndarray, times: np.ndarray) -> np.ndarray:
    """MS-DOS date and time fields (4.4.6) to Unix seconds, read as UTC.

    Out-of-range fields (month 0, day 0) are clamped, as unzip does, instead of failing.
    """
    day_seconds, time_seconds = _dos_tables()
    return day_seconds[dates] + time_seconds[times]


@functools.lru_cache(maxsize=None)
def _dos_tables() -> Tuple[np.ndarray, np.ndarray]:
    """Seconds for each of the 65,536 DOS date codes and time codes: two gathers per
    member instead of calendar arithmetic."""
    codes = np.arange(1 << 16, dtype=np.int64)
    year = 1980 + (codes >> 9)
    month = np.clip((codes >> 5) & 0xF, 1, 12)
    day = np.clip(codes & 0x1F, 1, 31)
    months = ((year - 1970) * 12 + month - 1).astype("datetime64[M]")
    days = months.astype("datetime64[D]").astype(np.int64) + day - 1
    seconds = (codes >> 11) * 3600 + ((codes >> 5) & 0x3F) * 60 + (codes & 0x1F) * 2
    return days * 86400, seconds


class LocalHeader(NamedTuple):
    data_offset: int
    method: int
    flags: int


def read_local_header(src: Source, member: Member, path: str) -> LocalHeader:
    """Read and check one member's local header just before its data is needed."""
    return parse_local_header(src, member, path, src.pread(LOCAL.size, member.header_offset))


def parse_local_header(src: Source, member: Member, path: str, raw: bytes) -> LocalHeader:
    """Check the local header (4.3.7) at the start of ``raw`` against the central entry.

    They must agree on method and name length and, without a data descriptor, on CRC
    and on the sizes that are not ZIP64-saturated; otherwise the index or the archive is
    not to be trusted for this member.
    """
    at = member.header_offset
    if len(raw) < LOCAL.size:
        raise MemberError(src.name, path, "local header is past the end of the archive (truncated?)")
    (sig, _, flags, method, _, _, crc, csize, usize, name_len, extra_len) = LOCAL.unpack_from(raw)
    if sig != LOCAL_SIG:
        raise MemberError(src.name, path, f"no local header at offset {at}")
    if method != member.method or name_len != member.name_length:
        raise MemberError(src.name, path, "local header disagrees with the central directory")
    if not flags & FLAG_DATA_DESCRIPTOR:
        checks = ((crc, member.crc32), (csize, member.compressed_size), (usize, member.size))
        for local_value, central_value in checks:
            if local_value not in (0xFFFFFFFF, int(central_value) & 0xFFFFFFFF):
                raise MemberError(src.name, path, "local header disagrees with the central directory")
    if extra_len > member.extra_room:
        raise MemberError(src.name, path, "local extra field runs into the next member (overlapping members)")
    data_offset = at + LOCAL.size + name_len + extra_len
    if data_offset + member.compressed_size > src.size:
        raise MemberError(src.name, path, "member data runs past the end of the archive (truncated?)")
    return LocalHeader(data_offset, method, flags)
