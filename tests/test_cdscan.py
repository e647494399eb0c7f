"""The C byte loops of an index build (_cdscan) against references: the numpy walk of
the central directory, and plain Python for the merge's segment loops.

zipdir.walk_directory walks in C straight into the member table and falls back to
walk_directory_numpy when the C walk declines; the numpy walk is the reference. Over every
kind of archive (generated sets, unusual valid zips, broken ones, hostile names, ZIP64
extras, a spanned set, local headers out of order, random damage) both give the same
Members or the same error, and the C walk alone declines exactly where the reference
raises. Also run under AddressSanitizer and UBSan (scripts/test).
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import zipfile
from pathlib import Path
from types import ModuleType
from typing import List, Union

import numpy as np
import pytest
from craft import Entry, central_record, deflated, write_zip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import damaged
from test_zipdir import BROKEN, GENERATED, VALID

from bioscanfs import _cdscan, merge, zipdir
from bioscanfs.errors import ArchiveError
from bioscanfs.sources import BytesSource, FileSource
from bioscanfs.zipdir import Members, Placement, Source, Walk, read_members

#: Names of every kind the plainness rule tells apart (names.clean_name cleans the odd ones).
EDGY_NAMES = [b"a/b.jpg", b"a//b.jpg", b"/abs.jpg", b"./x.jpg", b"x/.hidden", b"dir/", b"", b"a\\b.jpg",
              b"\x01ctl", b"caf\xc3\xa9.jpg", b"\xff\xfe", b"x" * 256, b"d/" + b"y" * 255, b"z" * 255,
              b"~ok-name_1.jpg", b"a/b/", b"bPK\x01\x02tricky", b"a/..", b"a/b/../c", b"\x7f"]


class _Declined(Exception):
    """Raised in place of the numpy fallback: the C walk declined."""


#: A single file whose data may lie anywhere below 1 TiB: directories tested on their own.
ANYWHERE = Placement((0,), 0, 1 << 40)


def _c_walk(buf: np.ndarray, entries: int, place: Placement = ANYWHERE) -> Union[Walk, str, None]:
    """walk_directory's C walk alone: None when it declines, the error when the rooms it
    left to zipdir._extra_room raise."""
    def declined(*_: object) -> Walk:
        raise _Declined

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zipdir, "walk_directory_numpy", declined)
        try:
            return zipdir.walk_directory("fuzz.zip", buf, entries, place)
        except _Declined:
            return None
        except ArchiveError as err:
            return str(err)


def _outcome(src: Source) -> Union[Members, str]:
    try:
        return read_members(src)
    except ArchiveError as err:
        return str(err)


def _assert_same(got: Union[Members, Walk, str], want: Union[Members, Walk, str]) -> None:
    assert type(got) is type(want), (got, want)
    if isinstance(want, str):
        assert got == want
        return
    for field, a, b in zip(want._fields, got, want):
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), field
        else:
            assert a == b, field


def assert_c_walk_matches_numpy(src: Source) -> None:
    """read_members with the C walk and with the numpy walk agree, and so do the walks."""
    with_c = _outcome(src)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zipdir, "walk_directory", zipdir.walk_directory_numpy)
        reference = _outcome(src)
    _assert_same(with_c, reference)
    try:
        end = zipdir.read_end_record(src)
    except ArchiveError:
        return
    buf = np.frombuffer(src.pread(end.cd_size, end.cd_start), dtype=np.uint8)
    bases = tuple(src.disk_bases) if len(src.disk_bases) > 1 else (0,)
    if len(buf) == end.cd_size:
        assert_walks_agree(buf, end.entries, Placement(bases, end.prefix, end.cd_start))


def assert_walks_agree(buf: np.ndarray, entries: int, place: Placement = ANYWHERE) -> None:
    """The C walk declines exactly where the reference raises, and otherwise equals it."""
    c = _c_walk(buf, entries, place)
    try:
        reference: Union[Walk, str] = zipdir.walk_directory_numpy("fuzz.zip", buf, entries, place)
    except ArchiveError as err:
        reference = str(err)
    if c is None:
        assert isinstance(reference, str), "the C walk declined a directory the reference reads"
    else:
        _assert_same(c, reference)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_archives(kind: str, tmp_path: Path, fake_set: Path, bench_scale: ModuleType) -> None:
    src = FileSource([str(VALID[kind](tmp_path, fake_set, bench_scale))])
    assert isinstance(_outcome(src), Members)
    assert_c_walk_matches_numpy(src)


def test_every_archive_of_a_generated_set(fake_set: Path) -> None:
    """Each zip of the fake set on its own (raw split pieces are refused, the same way)."""
    for path in sorted(fake_set.glob("*.zip")):
        assert_c_walk_matches_numpy(FileSource([str(path)]))


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_archives(kind: str, fake_set: Path) -> None:
    src = BytesSource(BROKEN[kind]((fake_set / GENERATED).read_bytes()), "broken.zip")
    assert isinstance(_outcome(src), str)
    assert_c_walk_matches_numpy(src)


def _hostile_entries() -> List[Entry]:
    entries = [Entry(name, b"x%d" % i) for i, name in enumerate(EDGY_NAMES)]
    entries.append(Entry(b"big/zip64.bin", b"data", zip64=True, central_extra=b"\xfe\xca\x00\x00"))
    entries.append(deflated(b"deflated/one.txt", b"hello " * 100))
    return entries


def test_hostile_names_and_zip64(tmp_path: Path) -> None:
    """Names that need cleaning (or are refused), in every position, and ZIP64 extras."""
    entries = _hostile_entries()
    path = write_zip(tmp_path / "hostile.zip", entries + entries[::-1], force_zip64=True)
    members = _outcome(FileSource([str(path)]))
    assert isinstance(members, Members) and members.warnings, "the names must need cleaning"
    assert_c_walk_matches_numpy(FileSource([str(path)]))


def _directory(entries: List[Entry]) -> bytes:
    return b"".join(central_record(e, 1000 * i) for i, e in enumerate(entries))


@pytest.mark.parametrize("cut", [1, 20, 46, 50])
def test_truncated_and_overlong_directories(cut: int) -> None:
    """Records cut short, a name that runs past the end, counts that disagree."""
    directory = _directory(_hostile_entries())
    count = len(_hostile_entries())
    for data, entries in ((directory[:-cut], count), (directory, count - 1), (directory, count + 1),
                          (directory + b"\0" * cut, count), (directory[cut:], count)):
        assert_walks_agree(np.frombuffer(data, dtype=np.uint8), entries)
    assert _c_walk(np.frombuffer(directory, dtype=np.uint8), count) is not None


def test_name_length_past_the_directory() -> None:
    """The last record's name length points far past the end of the directory."""
    directory = bytearray(_directory([Entry(b"a.jpg"), Entry(b"b.jpg")]))
    last = len(directory) - 46 - 5
    directory[last + 28:last + 30] = (0xFFFF).to_bytes(2, "little")
    assert _c_walk(np.frombuffer(bytes(directory), dtype=np.uint8), 2) is None
    assert_walks_agree(np.frombuffer(bytes(directory), dtype=np.uint8), 2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(EDGY_NAMES), max_size=12), st.lists(st.tuples(st.integers(0, 10_000),
       st.integers(0, 255)), max_size=4), st.integers(0, 60), st.integers(-1, 1), st.booleans())
def test_random_directories(names: List[bytes], flips: List[tuple], cut: int, miscount: int, zip64: bool) -> None:
    """Random records (names, ZIP64 extras, comments in the name bytes' place), damaged."""
    data = bytearray(_directory([Entry(n, b"d", zip64=zip64 and i % 2 == 0) for i, n in enumerate(names)]))
    for at, value in flips:
        if data:
            data[at % len(data)] = value
    data = data[:max(0, len(data) - cut)] if cut % 3 else data
    assert_walks_agree(np.frombuffer(bytes(data), dtype=np.uint8), max(0, len(names) + miscount))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_damaged_archives(data: bytes) -> None:
    """The fuzz seed of test_fuzz with bytes overwritten, cut out or cut short."""
    assert_c_walk_matches_numpy(BytesSource(data, "fuzz.zip"))


def test_spanned_set(tmp_path: Path) -> None:
    """An Info-ZIP spanned set: the disks' bases are added after the walk, the same way."""
    if shutil.which("zip") is None:
        pytest.skip("Info-ZIP `zip` is not installed; it writes the spanned sets")
    source = tmp_path / "files"
    source.mkdir()
    for i in range(6):
        (source / f"f{i}.bin").write_bytes(np.random.default_rng(i).bytes(30_000))
    subprocess.run(["zip", "-q", "-r", "-s", "64k", str(tmp_path / "set.zip"), "files"], cwd=tmp_path, check=True)
    pieces = sorted(tmp_path.glob("set.z[0-9]*")) + [tmp_path / "set.zip"]
    assert len(pieces) > 1
    src = FileSource([str(p) for p in pieces], spanned=True)
    assert isinstance(_outcome(src), Members)
    assert_c_walk_matches_numpy(src)


def test_local_headers_out_of_order_overlapping_or_past_the_data() -> None:
    """The rooms of members whose local headers are not in directory order come from
    zipdir._extra_room, as do the faults it names (overlaps, data past the directory)."""
    entries = [Entry(b"a%d.jpg" % i, b"x" * (i * 7 + 1)) for i in range(6)]
    in_order = b"".join(central_record(e, 100 * i) for i, e in enumerate(entries))
    shuffled = b"".join(central_record(e, 100 * i) for i, e in reversed(list(enumerate(entries))))
    overlapping = b"".join(central_record(e, 10 * i) for i, e in enumerate(entries))
    for data, data_end in ((in_order, 1 << 40), (in_order, 560), (in_order, 500), (shuffled, 600),
                           (overlapping, 1 << 40)):
        assert_walks_agree(np.frombuffer(data, dtype=np.uint8), len(entries), Placement((0,), 0, data_end))
    walked = _c_walk(np.frombuffer(shuffled, dtype=np.uint8), len(entries), Placement((0,), 0, 600))
    assert isinstance(walked, Walk) and walked.table["extra_room"].tolist()[::-1] == [63, 56, 49, 42, 35, 28]


@pytest.mark.parametrize("bases, prefix", [((0,), 0), ((0,), 12345), ((0, 5000, 90000), 0)])
def test_placement(bases: tuple, prefix: int) -> None:
    """Offsets made global (a disk's base, a prefix) and bounded by the data's end, ZIP64
    extras, disk numbers past the set."""
    for disk in (0, 1, 2, 3):
        # The first record's disk in its own field, the last one's in its ZIP64 extra (4.5.3).
        entries = _hostile_entries() + [Entry(b"disk.bin", b"d", central_extra=struct.pack("<HHI", 1, 4, disk))]
        data = bytearray(_directory(entries))
        data[34:36] = disk.to_bytes(2, "little")
        last = len(_directory(entries[:-1]))
        data[last + 34:last + 36] = b"\xff\xff"
        for data_end in (1 << 40, 30_000, 100_000):
            assert_walks_agree(np.frombuffer(bytes(data), dtype=np.uint8), len(entries),
                               Placement(bases, prefix, data_end))


def test_output_buffers_are_checked() -> None:
    """The extension refuses inputs and outputs too small for the count it is given."""
    small, days = np.zeros(1, dtype=np.uint8), np.zeros(1 << 16, np.int64)
    table, bases = np.zeros(2 * 48, np.uint8), np.zeros(1, np.uint64)
    calls = [(small, days, days), (table, small, days), (table, days, small), (table[:-1], days, days)]
    for out, day_seconds, time_seconds in calls:
        with pytest.raises(ValueError):
            _cdscan.scan(b"", 2, 255, bases, 0, 0, day_seconds, time_seconds, out, small, np.zeros(2, np.uint64),
                         np.zeros(2, np.uint8))
    with pytest.raises(ValueError):
        _cdscan.scan(b"", 0, 255, np.zeros(0, np.uint64), 0, 0, days, days, table, small, np.zeros(2, np.uint64),
                     np.zeros(2, np.uint8))


# -- the merge's byte loops against plain Python --------------------------------------------
#: Names that sort apart only in the key's second word or past the 16-byte key (real
#: processids share their first 8 bytes), equal ones, prefixes of others, NUL bytes.
SORT_NAMES = st.lists(st.one_of(st.sampled_from([b"", b"a", b"ab", b"abcdefgh", b"abcdefgh\0", b"abcdefghij",
                                                 b"abcdefghik", b"abcdefgh/x", b"\xff", b"\0", b"x" * 300,
                                                 b"x" * 299 + b"y", b"abcdefghijklmnop", b"abcdefghijklmnop\0",
                                                 b"abcdefghijklmnopq", b"abcdefghijklmnoq", b"abcdefghijklmnor",
                                                 b"BIOUG12345-A01.jpg", b"BIOUG12345-A01.jpeg",
                                                 b"BIOUG12345-A02.jpg", b"BIOUG12346-A01.jpg"]),
                                st.binary(max_size=24)), max_size=40)


def _segments(names: List[bytes]) -> tuple:
    """(blob, begins, lengths) of names laid end to end, shuffled around a gap."""
    blob = b"#".join(names)
    begins, at = [], 0
    for name in names:
        begins.append(at)
        at += len(name) + 1
    return (np.frombuffer(blob, dtype=np.uint8), np.asarray(begins, dtype=np.int64),
            np.asarray([len(n) for n in names], dtype=np.int64))


@settings(max_examples=300, deadline=None)
@given(SORT_NAMES, st.integers(0, 40), st.sampled_from([(np.uint32, np.uint16, np.uint32), (np.int64,) * 3]))
def test_sort_dirs_orders_as_python(names: List[bytes], cut: int, widths: tuple) -> None:
    """Two folders (rows before and after ``cut``), each sorted by its names' bytes, equal
    names in row order; whatever the widths of the merge's arrays."""
    blob, begins, lengths = _segments(names)
    n, cut = len(names), min(cut, len(names))
    order = np.arange(n - 1, -1, -1).astype(widths[2])   # rows come in reverse: the sort must not keep them so
    bounds = np.asarray([0, cut, n], dtype=np.int64)
    same = np.zeros(n, np.uint8)
    _cdscan.sort_dirs(blob, begins.astype(widths[0]), np.dtype(widths[0]).itemsize, lengths.astype(widths[1]),
                      np.dtype(widths[1]).itemsize, order, order.itemsize, bounds, same, 0, 2)
    rows = list(range(n - 1, -1, -1))
    want = [sorted(part, key=lambda i: (names[i], -i)) for part in (rows[:cut], rows[cut:])]
    assert order.tolist() == want[0] + want[1]
    ordered = [[names[i] for i in part] for part in want]
    assert same.tolist() == [int(i > 0 and part[i] == part[i - 1]) for part in ordered for i in range(len(part))]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a/b", b"a/c", b"b", b"a//b", b"/x", b"x/", b"d/e/f", b"d/e/g", b"dd/e",
                                 b"abcdefghijklmnop/q", b"abcdefghijklmnop/r", b"abcdefghijklmnoq/q", b""]),
                max_size=30))
def test_split_dirs_and_gather_as_python(paths: List[bytes]) -> None:
    blob, begins, lengths = _segments(paths)
    n = len(paths)
    base, group, first = (np.empty(n, np.int64) for _ in range(3))
    groups = _cdscan.split_dirs(blob, begins, begins + lengths, base, group, first)
    dirs = [p.rpartition(b"/")[0] for p in paths]
    distinct = list(dict.fromkeys(dirs))
    assert groups == len(distinct)
    assert group.tolist() == [distinct.index(d) for d in dirs]
    assert first[:groups].tolist() == [dirs.index(d) for d in distinct]
    assert [blob[b:b + len(p)].tobytes()[int(s) - b:] for p, b, s in zip(paths, begins.tolist(), base)] == \
        [p.rpartition(b"/")[2] for p in paths]
    gathered, ends = zipdir.gather_segments(blob, base, begins + lengths - base)
    assert gathered.tobytes() == b"".join(p.rpartition(b"/")[2] for p in paths)
    assert ends.tolist() == np.cumsum([len(p.rpartition(b"/")[2]) for p in paths], dtype=np.int64).tolist()


@pytest.mark.parametrize("begin, length", [(-1, 1), (0, -1), (5, 1), (3, 3), (1 << 62, 1 << 62)])
def test_segments_outside_the_buffer_are_refused(begin: int, length: int) -> None:
    """Every segment is bounded by its buffer before a byte is read (a 5-byte one here)."""
    blob = np.frombuffer(b"ab/cd", dtype=np.uint8)
    begins, lengths = np.asarray([0, begin], np.int64), np.asarray([2, length], np.int64)
    out8, out1 = np.empty(2, np.int64), np.empty(64, np.uint8)
    order, bounds = np.arange(2, dtype=np.int64), np.asarray([0, 2], np.int64)
    for call in (lambda: _cdscan.gather(blob, begins, lengths, out1),
                 lambda: _cdscan.sort_dirs(blob, begins, 8, lengths, 8, order, 8, bounds, out1, 0, 1),
                 lambda: _cdscan.split_dirs(blob, begins, begins + lengths, out8, out8.copy(), out8.copy())):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("order, bounds", [([0, 5], [0, 2]), ([0, 1], [0, 3]), ([0, 1], [1, 0])])
def test_sort_dirs_bounds_rows_and_folders(order: List[int], bounds: List[int]) -> None:
    """A row past the names' arrays, a folder past the order, a folder that ends before it starts."""
    blob = np.frombuffer(b"ab/cd", dtype=np.uint8)
    begins, lengths = np.asarray([0, 3], np.int64), np.asarray([2, 2], np.int64)
    with pytest.raises(ValueError):
        _cdscan.sort_dirs(blob, begins, 8, lengths, 8, np.asarray(order, np.int64), 8, np.asarray(bounds, np.int64),
                          np.zeros(2, np.uint8), 0, 1)



def test_an_archive_is_reduced_in_folder_and_name_order(tmp_path: Path) -> None:
    """merge.reduce gives each folder's rows together and by name (so the merge's sort and
    gathers read runs), and of two equal paths in one archive the later entry first (it
    wins); against zipfile's view of the same archive."""
    names = [b"b/z.jpg", b"a/y.jpg", b"b/a.jpg", b"top.txt", b"a/x.jpg", b"b/a.jpg", b"a/BIOUG12345-A02.jpg",
             b"a/BIOUG12345-A01.jpg"]
    path = write_zip(tmp_path / "order.zip", [Entry(n, b"%d" % i) for i, n in enumerate(names)])
    archive = merge.reduce(read_members(FileSource([str(path)])))
    folders = [archive.group_dirs[g] for g in archive.group_of.tolist()]
    ends = np.cumsum(archive.lengths, dtype=np.int64).tolist()
    own = [archive.bases[e - n:e].tobytes() for e, n in zip(ends, archive.lengths.tolist())]
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    assert sorted(f + b"/" + o if f else o for f, o in zip(folders, own)) == sorted(i.filename.encode() for i in infos)
    assert len([i for i in range(len(folders)) if i == 0 or folders[i] != folders[i - 1]]) == len(set(folders))
    assert all(folders[i] != folders[i + 1] or own[i] <= own[i + 1] for i in range(len(own) - 1))
    offsets = archive.rows["header_offset"].tolist()
    twice = [offsets[i] for i, row in enumerate(zip(folders, own)) if row == (b"b", b"a.jpg")]
    assert twice == sorted((i.header_offset for i in infos if i.filename == "b/a.jpg"), reverse=True)
