"""Large deflated members (issue 5): streamed with seek points, read any way a consumer reads.

One generated metadata zip holds a ~110 MB CSV deflated at level 1, the shape of the real
metadata CSV. It is read through real FUSE mounts with plain os.pread/read/lseek, through
the page cache and with O_DIRECT (which hands each offset and size to the filesystem as
they are), and through the Python API; every byte is compared with zipfile's. Each test
mounts afresh, so no test is served from another test's page cache or seek points.

Damage: a stretch zlib rejects must give EIO from there on; damage only the CRC shows
must fail the read that reaches the end (checked for the stream and for a 40 MiB stored
member, the other kind of member served in pieces).
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import shutil
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, List, Tuple

import numpy as np
import pytest
from conftest import MountFactory, data_offset, flip_byte, write_at, zip_members

from bioscanfs import Collection, MemberError

#: Spacing of the stream's seek points as documented: every few MiB, at most 256 per member.
MIN_INTERVAL = 4 << 20
MAX_POINTS = 256
#: Far beyond the 32 MiB decoded whole into the cache: the member must stream.
BIG = 100_000_000
MODES = {"page-cache": 0, "O_DIRECT": os.O_DIRECT}
#: Every test here reads a > 100 MB member, most of them whole, some several times.
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class BigMember:
    folder: Path
    archive: Path
    name: str
    info: zipfile.ZipInfo
    data: bytes
    md5: str  #: of ``data``, hashed once for the tests that compare digests

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def interval(self) -> int:
        return max(MIN_INTERVAL, -(-self.size // MAX_POINTS))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, make_fake: ModuleType) -> BigMember:
    """The generated metadata zip with a > 100 MB deflated CSV, and zipfile's bytes of it."""
    folder = tmp_path_factory.mktemp("big_stream")
    make_fake.make_set(folder, images=16, imgtypes=(), csv_bytes=110_000_000, seed=5)
    members = zip_members(folder)
    name = max(members, key=lambda path: members[path].info.file_size)
    member = members[name]
    assert member.deflated and member.info.file_size > BIG, member.info
    data = member.read()
    assert len(data) == member.info.file_size
    return BigMember(folder, member.archive, name, member.info, data, hashlib.md5(data).hexdigest())


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One index for every mount of the big set (the mounts differ, the archive does not)."""
    return tmp_path_factory.mktemp("big_index")


@pytest.fixture(params=sorted(MODES))
def flags(request: pytest.FixtureRequest) -> int:
    return MODES[request.param]


@pytest.fixture
def big_path(mount: MountFactory, big: BigMember, index_dir: Path) -> Path:
    """The big member on a fresh mount (no page cache, no seek points yet)."""
    return mount(big.folder, index_dir=index_dir).path(big.name)


def _fd(path: Path, flags: int) -> int:
    return os.open(path, os.O_RDONLY | flags)


def _read_to_end(fd: int, chunk: int) -> Iterator[bytes]:
    while True:
        block = os.read(fd, chunk)
        if not block:
            return
        yield block


# -- whole reads ------------------------------------------------------------------------------
def test_full_read_equals_zipfile(big_path: Path, big: BigMember) -> None:
    """One read of the whole file (Path.read_bytes), as a consumer slurps the CSV."""
    assert os.stat(big_path).st_size == big.size
    assert big_path.read_bytes() == big.data


@pytest.mark.parametrize("chunk", [1 << 20, (1 << 20) + 4097], ids=["1MiB", "odd"])
def test_sequential_md5_equals_zipfile(big_path: Path, big: BigMember, flags: int, chunk: int) -> None:
    """The loader's check: md5 of a start-to-end read in chunks equals md5 of zipfile's bytes."""
    fd = _fd(big_path, flags)
    digest, total = hashlib.md5(), 0
    try:
        for block in _read_to_end(fd, chunk):
            assert block == big.data[total:total + len(block)], total
            digest.update(block)
            total += len(block)
    finally:
        os.close(fd)
    assert total == big.size
    assert digest.hexdigest() == big.md5


# -- partial reads and seeks ------------------------------------------------------------------
def test_partial_reads_at_many_offsets(big_path: Path, big: BigMember, flags: int) -> None:
    """os.pread at random offsets and sizes in random order (so forward and backward jumps),
    plus both ends and past the end: each equals zipfile's slice."""
    size = big.size
    rng = random.Random(11)
    lengths = (1, 4095, 4096, 4097, 65536, 131072, 131073, 1 << 20, (1 << 20) + 3)
    windows = [(rng.randrange(size), rng.choice(lengths)) for _ in range(150)]
    windows += [(0, 1), (0, 4096), (1, 131072), (size - 1, 1), (size - 1, 4096), (size - 4096, 4096),
                (size - 131073, 131073), (size, 1), (size + 4096, 10)]
    rng.shuffle(windows)
    fd = _fd(big_path, flags)
    try:
        for offset, length in windows:
            assert os.pread(fd, length, offset) == big.data[offset:offset + length], (offset, length)
    finally:
        os.close(fd)


def test_backward_seeks_on_one_fd(big_path: Path, big: BigMember, flags: int) -> None:
    """One open file: read near the end, then near the start, then jump about with seek()."""
    size, interval = big.size, big.interval
    steps: List[Tuple[int, int, int]] = [  # (offset, whence, length)
        (size - 5000, os.SEEK_SET, 5000), (0, os.SEEK_SET, 4096), (size // 2, os.SEEK_SET, 100_000),
        (1, os.SEEK_SET, 10), (-100, os.SEEK_END, 100), (-(size // 3), os.SEEK_CUR, 65537),
        (3 * interval + 5, os.SEEK_SET, 2 * interval), (interval - 1, os.SEEK_SET, 2),
        (size - 1, os.SEEK_SET, 10), (0, os.SEEK_SET, 3 * interval + 7),
    ]
    with open(big_path, "rb", buffering=0, opener=lambda p, f: os.open(p, f | flags)) as f:
        for offset, whence, length in steps:
            position = f.seek(offset, whence)
            assert 0 <= position <= size
            got = f.read(length)
            assert got == big.data[position:position + length], (position, length)
            assert f.tell() == min(position + length, size)


def test_reads_straddling_seek_point_boundaries(big_path: Path, big: BigMember, flags: int) -> None:
    """Windows across every multiple of the seek-point interval, ascending then descending
    (the descending pass starts every read from an earlier seek point), and one read
    spanning two boundaries at once."""
    size, interval = big.size, big.interval
    assert size // interval >= 20  # the member really has many seek points
    windows = [(boundary - half, 2 * half) for boundary in range(interval, size, interval)
               for half in (1, 4096, 65537, (1 << 20) + 5)]
    windows.append((interval - 17, 2 * interval + 34))
    fd = _fd(big_path, flags)
    try:
        for offset, length in windows + windows[::-1]:
            assert os.pread(fd, length, offset) == big.data[offset:offset + length], (offset, length)
    finally:
        os.close(fd)


def test_two_handles_read_interleaved(big_path: Path, big: BigMember, flags: int) -> None:
    """Two open files read the whole member at different strides, one from the start and
    one from the middle wrapping round, four reads of one per read of the other: both
    read back the whole member."""
    size = big.size
    small, large = 64 << 10, (256 << 10) + 3
    first_order = list(range(0, size, small))
    second_order = list(range(0, size, large))
    second_order = second_order[len(second_order) // 2:] + second_order[:len(second_order) // 2]
    first, second = _fd(big_path, flags), _fd(big_path, flags)
    got_first, got_second = {}, {}
    try:
        for k in range(max(-(-len(first_order) // 4), len(second_order))):
            for offset in first_order[4 * k:4 * k + 4]:
                got_first[offset] = os.pread(first, small, offset)
            if k < len(second_order):
                got_second[second_order[k]] = os.pread(second, large, second_order[k])
    finally:
        os.close(first)
        os.close(second)
    assert b"".join(got_first[offset] for offset in first_order) == big.data
    assert b"".join(got_second[offset] for offset in sorted(got_second)) == big.data


def test_four_threads_read_disjoint_chunks_out_of_order(big_path: Path, big: BigMember, flags: int) -> None:
    """Four threads, each with its own file, read shuffled 128 KiB chunks of the member
    (a data loader's workers): every chunk and the reassembled whole equal zipfile's."""
    chunk = 128 << 10
    offsets = list(range(0, big.size, chunk))
    random.Random(3).shuffle(offsets)
    out = bytearray(big.size)
    errors: List[str] = []

    def worker(mine: List[int]) -> None:
        fd = _fd(big_path, flags)
        try:
            for offset in mine:
                block = os.pread(fd, chunk, offset)
                if block != big.data[offset:offset + chunk]:
                    errors.append(f"chunk at {offset}: {len(block)} bytes, wrong")
                out[offset:offset + len(block)] = block
        finally:
            os.close(fd)

    threads = [threading.Thread(target=worker, args=(offsets[t::4],)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:5]
    assert bytes(out) == big.data


# -- the Python API ---------------------------------------------------------------------------
def test_api_open_seek_read(big: BigMember, tmp_path: Path) -> None:
    """Collection.open(): a seekable file object over the stream; Collection.read() windows."""
    with Collection(str(big.folder), index_dir=str(tmp_path / "index")) as c:
        assert c.stat(big.name).size == big.size
        size, interval = big.size, big.interval
        with c.open(big.name) as f:
            assert f.seekable()
            for offset, whence, length in [(size - 1000, io.SEEK_SET, 1000), (0, io.SEEK_SET, 4096),
                                           (5 * interval - 3, io.SEEK_SET, 7), (-10, io.SEEK_END, 100),
                                           (-(size // 2), io.SEEK_CUR, (1 << 20) + 1),
                                           (interval + 1, io.SEEK_SET, 2 * interval)]:
                position = f.seek(offset, whence)
                assert f.read(length) == big.data[position:position + length], (position, length)
            f.seek(0)
            digest = hashlib.md5()
            while block := f.read(1 << 20):
                digest.update(block)
            assert digest.hexdigest() == big.md5
            assert f.read(1) == b""
        for offset in (0, size // 3, size - 1, size, size + 10):
            for length in (1, 65536, 3 * interval):
                assert c.read(big.name, length, offset) == big.data[offset:offset + length], (offset, length)


def test_api_threads_read_shuffled_chunks(big: BigMember, tmp_path: Path) -> None:
    """One Collection shared by four threads reading shuffled 1 MiB chunks of the stream."""
    chunk = 1 << 20
    offsets = list(range(0, big.size, chunk))
    random.Random(4).shuffle(offsets)
    with Collection(str(big.folder), index_dir=str(tmp_path / "index")) as c, ThreadPoolExecutor(4) as pool:
        blocks = list(pool.map(lambda offset: c.read(big.name, chunk, offset), offsets))
    for offset, block in zip(offsets, blocks):
        assert block == big.data[offset:offset + chunk], offset


def test_sequential_reader_with_random_readers_alongside(big_path: Path, big: BigMember) -> None:
    """One thread md5s the member from start to end (decoded ahead of it on the server)
    while two others read 4 KiB at random offsets: every byte equals zipfile's."""
    errors: List[str] = []
    done = threading.Event()

    def jumper(seed: int) -> None:
        rng = random.Random(seed)
        with open(big_path, "rb", buffering=0) as f:
            while not done.is_set():
                offset = rng.randrange(big.size)
                if os.pread(f.fileno(), 4096, offset) != big.data[offset:offset + 4096]:
                    errors.append(f"4 KiB at {offset}")

    jumpers = [threading.Thread(target=jumper, args=(seed,)) for seed in (1, 2)]
    for thread in jumpers:
        thread.start()
    try:
        digest = hashlib.md5()
        with open(big_path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    finally:
        done.set()
        for thread in jumpers:
            thread.join()
    assert not errors, errors[:5]
    assert digest.hexdigest() == big.md5


def _ahead_threads() -> int:
    return sum(thread.name == "bioscanfs-ahead" for thread in threading.enumerate())


def _wait_for_no_ahead_threads() -> None:
    """Decoders ahead stop after 2 s without a request: allow them 10."""
    for _ in range(100):
        if not _ahead_threads():
            return
        threading.Event().wait(0.1)


def test_decoding_ahead_stops_when_the_reader_stops(big: BigMember, tmp_path: Path) -> None:
    """A sequential reader gets a decoder ahead of it; when the reader stops halfway, the
    decoder stops too (within its idle time of 2 s), so nothing decodes for no one."""
    _wait_for_no_ahead_threads()  # those of earlier tests' readers
    with Collection(str(big.folder), index_dir=str(tmp_path / "index")) as c:
        assert _ahead_threads() == 0
        for offset in range(0, 8 << 20, 128 << 10):
            assert c.read(big.name, 128 << 10, offset) == big.data[offset:offset + (128 << 10)]
        assert _ahead_threads() == 1
        _wait_for_no_ahead_threads()
        assert _ahead_threads() == 0
        offset = (8 << 20) + 12345
        assert c.read(big.name, 4096, offset) == big.data[offset:offset + 4096]


# -- a damaged stream -------------------------------------------------------------------------
@dataclass(frozen=True)
class Damage:
    folder: Path
    archive: Path
    intact: int     #: uncompressed bytes decoded from the compressed data before the damage
    fails_at: int   #: uncompressed bytes an independent inflater (zlib) produces before failing


def _first_failure(inflater: Any, data: bytes) -> Tuple[int, bool]:
    """Feed ``data`` a byte at a time: (bytes produced, whether zlib reported an error)."""
    produced = 0
    for pos in range(len(data)):
        try:
            produced += len(inflater.decompress(data[pos:pos + 1]))
        except zlib.error:
            return produced, True
    return produced, False


def _copy_of(big: "BigMember", factory: pytest.TempPathFactory, name: str) -> Tuple[Path, int, bytes]:
    """A copy of the big archive to damage: (path, data offset of the CSV, its compressed bytes)."""
    archive = factory.mktemp(name) / big.archive.name
    shutil.copyfile(big.archive, archive)
    start = data_offset(archive, big.info)
    with open(archive, "rb") as f:
        f.seek(start)
        return archive, start, f.read(big.info.compress_size)


def _inflated_to_half(compressed: bytes) -> Tuple[int, Any, int]:
    """(half, a raw inflater fed the first half of the stream, the bytes it produced): the
    search for a damage near the middle copies it instead of inflating from the start."""
    half = len(compressed) // 2
    inflater = zlib.decompressobj(-15)
    return half, inflater, len(inflater.decompress(compressed[:half]))


@pytest.fixture(scope="module")
def damaged(big: BigMember, tmp_path_factory: pytest.TempPathFactory) -> Damage:
    """A copy of the big archive with 64 bytes in the middle of the CSV's deflate data
    overwritten by 0xFF, at the first place (4 KiB steps from the middle) where CPython's
    zlib, an independent inflater, reports the stream broken within 16 KiB of the damage.
    Not every damage is detectable before the CRC at the very end; this one is."""
    archive, start, compressed = _copy_of(big, tmp_path_factory, "damaged_stream")
    half, at_half, before_half = _inflated_to_half(compressed)
    garbage = b"\xff" * 64
    for shift in range(0, 1 << 20, 4096):
        inflater = at_half.copy()
        intact = before_half + len(inflater.decompress(compressed[half:half + shift]))
        produced, failed = _first_failure(inflater, garbage + compressed[half + shift + 64:half + shift + (16 << 10)])
        if failed:
            break
    else:
        pytest.fail("no damage near the middle is detected by zlib; the fixture needs another corruption")
    write_at(archive, start + half + shift, garbage)
    fails_at = intact + produced
    assert 4 << 20 < intact <= fails_at < big.size - (8 << 20)
    with zipfile.ZipFile(archive) as zf, pytest.raises((zlib.error, zipfile.BadZipFile)):
        zf.read(big.name)
    return Damage(archive.parent, archive, intact, fails_at)


def test_damaged_stream_gives_eio_and_the_mount_survives(mount: MountFactory, big: BigMember,
                                                         damaged: Damage, flags: int) -> None:
    """Reads at or after the damage fail with EIO and a log line naming archive and member;
    bytes before it, and the archive's other member, still read right afterwards."""
    live = mount(damaged.folder)
    live.expect_log(re.escape(big.name))
    path = live.path(big.name)
    fd = _fd(path, flags)
    try:
        before = [(0, 65536), (damaged.intact - (2 << 20), 1 << 20)]
        for offset, length in before:
            assert os.pread(fd, length, offset) == big.data[offset:offset + length], offset
        for offset in (damaged.fails_at, damaged.fails_at + (5 << 20), big.size - 4096, damaged.fails_at):
            with pytest.raises(OSError) as err:
                os.pread(fd, 4096, offset)
            assert err.value.errno == errno.EIO, (offset, err.value)
        with pytest.raises(OSError) as err:
            path.read_bytes()
        assert err.value.errno == errno.EIO, err.value
        # The mount survives: the intact part and the other member still read right.
        for offset, length in before:
            assert os.pread(fd, length, offset) == big.data[offset:offset + length], offset
    finally:
        os.close(fd)
    for name, member in zip_members(damaged.folder).items():
        if name != big.name:
            assert live.path(name).read_bytes() == member.read(), name
    lines = [line for line in live.log_text().splitlines() if big.name in line]
    assert lines, live.log_text()
    assert all("ERROR" in line and str(damaged.archive) in line for line in lines), lines


def test_damaged_stream_through_the_api(big: BigMember, damaged: Damage, tmp_path: Path) -> None:
    """Collection raises MemberError naming archive and member; the intact part reads."""
    with Collection(str(damaged.folder), index_dir=str(tmp_path / "index")) as c:
        assert c.read(big.name, 65536, 0) == big.data[:65536]
        for offset in (damaged.fails_at, big.size - 10):
            with pytest.raises(MemberError) as err:
                c.read(big.name, 4096, offset)
            assert str(damaged.archive) in str(err.value) and big.name in str(err.value)
        with c.open(big.name) as f, pytest.raises(MemberError):
            while f.read(1 << 20):
                pass
        assert c.read(big.name, 4096, 1 << 20) == big.data[1 << 20:(1 << 20) + 4096]


# -- damage only the CRC can tell ----------------------------------------------------------------
@dataclass(frozen=True)
class CrcDamage:
    folder: Path
    archive: Path
    name: str
    size: int


@pytest.fixture(scope="module")
def crc_damaged_stream(big: BigMember, tmp_path_factory: pytest.TempPathFactory) -> CrcDamage:
    """The big archive with one bit of the CSV's deflate data flipped where the stream still
    inflates to exactly the declared size (CPython's zlib says so): only the CRC tells."""
    archive, start, compressed = _copy_of(big, tmp_path_factory, "crc_damaged_stream")
    half, at_half, before = _inflated_to_half(compressed)
    for shift in range(0, 1 << 20, 997):
        flipped = bytes([compressed[half + shift] ^ 0x10])
        inflater = at_half.copy()
        try:
            after = len(inflater.decompress(compressed[half:half + shift] + flipped + compressed[half + shift + 1:]))
        except zlib.error:
            continue
        if before + after == big.size and inflater.eof:
            break
    else:
        pytest.fail("no bit flip near the middle keeps the stream's length; the fixture needs another damage")
    write_at(archive, start + half + shift, flipped)
    with zipfile.ZipFile(archive) as zf, pytest.raises(zipfile.BadZipFile, match="CRC"):
        zf.read(big.name)
    return CrcDamage(archive.parent, archive, big.name, big.size)


@pytest.fixture(scope="module")
def crc_damaged_stored(bench_scale: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> CrcDamage:
    """A 40 MiB stored member (over the 32 MiB read whole) with one flipped byte."""
    folder = tmp_path_factory.mktemp("crc_damaged_stored")
    archive = folder / "big_stored.zip"
    payload = np.random.default_rng(8).integers(0, 256, 40 << 20, dtype=np.uint8).tobytes()
    bench_scale.write_stored_zip(archive, [b"big/stored.bin", b"big/small.txt"], [payload, b"small\n"],
                                 0x4A00, 0x58AE)
    info = zip_members(folder)["big/stored.bin"].info
    flip_byte(archive, data_offset(archive, info) + info.file_size // 2, 0x01)
    with zipfile.ZipFile(archive) as zf, pytest.raises(zipfile.BadZipFile, match="CRC"):
        zf.read(info)
    return CrcDamage(folder, archive, info.filename, info.file_size)


@pytest.fixture(params=["deflated-stream", "stored-40MiB"])
def crc_damaged(request: pytest.FixtureRequest) -> CrcDamage:
    return request.getfixturevalue({"deflated-stream": "crc_damaged_stream",
                                    "stored-40MiB": "crc_damaged_stored"}[request.param])


def _read_in_order(c: Collection, damage: CrcDamage) -> None:
    """Read the member start to end through Collection.open: must fail with the CRC."""
    with c.open(damage.name) as f, pytest.raises(MemberError, match="CRC") as err:
        while f.read(1 << 20):
            pass
    assert str(damage.archive) in str(err.value) and damage.name in str(err.value)


def test_crc_damage_fails_every_read_in_order_through_the_api(crc_damaged: CrcDamage, tmp_path: Path) -> None:
    """README: a large member's CRC is checked when it is read in order to the end, where
    the last read fails; a second pass in order from the start fails too: nothing wrong is
    served twice."""
    with Collection(str(crc_damaged.folder), index_dir=str(tmp_path / "index")) as c:
        _read_in_order(c, crc_damaged)
        _read_in_order(c, crc_damaged)


def test_crc_damage_fails_a_read_to_the_end_through_the_mount(mount: MountFactory, crc_damaged: CrcDamage,
                                                              flags: int) -> None:
    """A start-to-end read through the kernel, as the loader's md5 check does, ends in EIO."""
    live = mount(crc_damaged.folder)
    live.expect_log(re.escape(crc_damaged.name))
    fd = _fd(live.path(crc_damaged.name), flags)
    total = 0
    try:
        with pytest.raises(OSError) as err:
            for block in _read_to_end(fd, 1 << 20):
                total += len(block)
        assert err.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert total < crc_damaged.size
