"""What the native engine (bioscanfs/_nativefs.c) promises beyond what both engines share,
and the checks of its paths that both engines must pass too.

On native mounts only (each test says why): the extension is built; listings carry
attributes (READDIRPLUS), so a walk sends no LOOKUP; whole reads of small stored and
deflated members never reach Python; they are read with O_DIRECT, and through the page
cache where that is refused. On both engines: a second read pass asks the server nothing
(counted with the kernel's fuse tracepoints); the C whole-read path and the Python fallback
serve zipfile's bytes; a corrupt stored or deflated member gets EIO. Every archive
comes from scripts/make_fake_bioscan.py; every read goes through the kernel.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import re
import stat
import subprocess
import sys
import threading
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from conftest import (
    Member,
    Mount,
    assert_eio,
    assert_serves_members,
    copy_archives,
    data_offset,
    expected_tree,
    flip_byte,
    load_script,
    mounted,
    zip_contents,
    zip_members,
    zip_paths,
)
from craft import Entry, deflated, raw_deflate, write_zip

from bioscanfs import cli, nativefs, serving
from bioscanfs.reader import WHOLE_READ_MAX

TRACEFS = Path("/sys/kernel/tracing")
SEND_EVENT = "events/fuse/fuse_request_send"
#: print fmt of fuse_request_send: "connection %u req %llu opcode %u (%s) len %u".
_REQUEST = re.compile(r"fuse_request_send: connection \d+ req \d+ opcode \d+ \((\w+)\)")
_ENTRIES = re.compile(r"entries-in-buffer/entries-written: (\d+)/(\d+)")


def test_native_engine_is_built_and_the_default() -> None:
    """CI installs gcc and libfuse3-dev, so a missing extension is a build failure, not a skip."""
    assert nativefs.available(), "bioscanfs._nativefs is not built, or its member layout is not index.FILE_DTYPE"
    assert cli._engine(None) is nativefs.serve


@pytest.fixture
def fresh_mount(fake_set: Path, tmp_path: Path, engine: str) -> Iterator[Mount]:
    """A fresh mount of the fake set per engine: the kernel has cached no name, attribute or page."""
    with mounted([fake_set], tmp_path / engine, engine=engine) as live:
        yield live


@pytest.fixture
def native_mount(fake_set: Path, tmp_path: Path) -> Iterator[Mount]:
    """The same on the native engine only, for the tests of a C-only mechanism."""
    with mounted([fake_set], tmp_path / "native", engine="native") as live:
        yield live


# Native only: READDIRPLUS and the listing's inode are the C engine's (mfusepy lists names
# only); test_engines.py compares the attributes themselves on both engines.
def test_listings_carry_attributes(native_mount: Mount, fake_members: Dict[str, Member]) -> None:
    """os.scandir + DirEntry.stat() of every folder on a fresh mount: the attributes that came
    with the listing (READDIRPLUS, see the tracepoint test) are zipfile's size and the tree's
    mode and link count, and the listing's inode is the one stat reports."""
    tree = expected_tree(fake_members)
    seen = set()
    for folder in sorted(tree):
        with os.scandir(native_mount.path(folder)) as entries:
            for entry in entries:
                path = f"{folder}/{entry.name}" if folder else entry.name
                st = entry.stat()
                assert entry.inode() == st.st_ino, path
                if path in tree:
                    subdirs = sum(f"{path}/{name}" in tree for name in tree[path])
                    assert entry.is_dir() and st.st_mode == stat.S_IFDIR | 0o555, (path, oct(st.st_mode))
                    assert st.st_nlink == 2 + subdirs, path
                else:
                    member = fake_members[path]
                    assert entry.is_file() and st.st_mode == stat.S_IFREG | 0o444, (path, oct(st.st_mode))
                    assert (st.st_size, st.st_nlink) == (member.info.file_size, 1), path
                    assert st.st_mtime_ns == member.mtime * 10**9, path
                seen.add(path)
    assert seen == (set(tree) - {""}) | set(fake_members)


# -- request economy, counted by the kernel ------------------------------------------------------
class FuseRequests:
    """The requests the kernel sends to one FUSE mount, read from a private tracefs instance."""

    def __init__(self, instance: Path) -> None:
        self._instance = instance

    def watch(self, point: Path) -> None:
        """Record the requests to the mount at ``point`` from now on, and only those."""
        dev = os.stat(point).st_dev
        # The event's connection is the kernel's dev_t of the mount, MAJOR << 20 | MINOR (MINORBITS).
        (self._instance / SEND_EVENT / "filter").write_text(f"connection == {os.major(dev) << 20 | os.minor(dev)}")
        (self._instance / SEND_EVENT / "enable").write_text("1")
        self.take()

    def take(self) -> Counter[str]:
        """Requests by opcode name since the last call; empties the buffer."""
        text = (self._instance / "trace").read_text()
        (self._instance / "trace").write_text("")
        entries = _ENTRIES.search(text)
        assert entries, f"no entries line in the trace header:\n{text[:500]}"
        kept, written = map(int, entries.groups())
        assert kept == written, f"the trace buffer overflowed ({kept} of {written} events kept)"
        return Counter(_REQUEST.findall(text))


@pytest.fixture
def fuse_requests() -> Iterator[FuseRequests]:
    """The fuse_request_send event in a tracefs instance of its own, removed afterwards, so the
    global tracing state (tracing_on, events, buffer) is never touched. Mounts tracefs if needed;
    skips on a kernel without fuse tracepoints."""
    mount_tracefs = not (TRACEFS / "instances").is_dir()
    if mount_tracefs:
        if "tracefs" not in Path("/proc/filesystems").read_text():
            pytest.skip("this kernel has no tracefs, so no fuse tracepoints")
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True, capture_output=True)
    try:
        if not (TRACEFS / SEND_EVENT).is_dir():
            pytest.skip(f"this kernel has no fuse tracepoints ({TRACEFS / SEND_EVENT})")
        instance = TRACEFS / "instances" / f"bioscanfs-tests-{os.getpid()}"
        instance.mkdir()
        try:
            yield FuseRequests(instance)
        finally:
            (instance / SEND_EVENT / "enable").write_text("0")
            instance.rmdir()
    finally:
        if mount_tracefs:
            subprocess.run(["umount", str(TRACEFS)], check=True, capture_output=True)


def test_second_read_pass_asks_nothing(fresh_mount: Mount, fake_members: Dict[str, Member],
                                       fuse_requests: FuseRequests) -> None:
    """Whole reads of every stored member, twice. First pass: at most one READ per file, and
    OPEN answered ENOSYS once and then never asked again, so no RELEASE. Second pass: names,
    attributes and pages all come from the kernel's caches; only Python's isatty() ioctl still
    reaches the server."""
    expected = zip_contents({p: m for p, m in fake_members.items() if not m.deflated})
    fuse_requests.watch(fresh_mount.point)
    passes = []
    for _ in range(2):
        for path, data in expected.items():
            with open(fresh_mount.path(path), "rb") as f:
                assert f.read() == data, path
        passes.append(fuse_requests.take())
    first, second = passes
    assert first["FUSE_READ"] <= len(expected), first
    assert first["FUSE_OPEN"] <= 1 and first["FUSE_RELEASE"] == 0, first
    assert set(second) <= {"FUSE_IOCTL"}, second


# Native only: the attributes come with the listing (READDIRPLUS) in the C engine alone.
def test_walk_and_stat_send_no_lookup(native_mount: Mount, fake_members: Dict[str, Member],
                                      fuse_requests: FuseRequests) -> None:
    """os.walk + os.stat of every file on a fresh mount: every name and attribute comes with the
    listings (READDIRPLUS), so the kernel sends no LOOKUP and no GETATTR."""
    fuse_requests.watch(native_mount.point)
    stats = [os.stat(os.path.join(folder, name)) for folder, _, files in os.walk(native_mount.point)
             for name in files]
    requests = fuse_requests.take()
    assert len(stats) == len(fake_members)
    assert requests["FUSE_READDIRPLUS"] > 0, requests
    assert requests["FUSE_LOOKUP"] == requests["FUSE_GETATTR"] == requests["FUSE_READDIR"] == 0, requests


# -- bytes: the C whole read, the Python fallback, corrupt members ---------------------------------
def _sample(members: Dict[str, Member], rng: random.Random) -> Dict[str, Member]:
    """Per compression method its smallest, its largest and four random members, plus every
    metadata member (the deflated CSV spans several kernel reads)."""
    picks = {p for p in members if not p.endswith(".jpg")}
    for method in {m.info.compress_type for m in members.values()}:
        by_size = sorted((m.info.file_size, p) for p, m in members.items() if m.info.compress_type == method)
        picks |= {by_size[0][1], by_size[-1][1]} | {p for _, p in rng.sample(by_size, 4)}
    return {p: members[p] for p in sorted(picks)}


def _random_windows(size: int, rng: random.Random) -> List[Tuple[int, int]]:
    """(offset, length): the whole member, then random windows, some reaching past its end."""
    return [(0, size), (0, size + 1)] + [
        (rng.randrange(size + 2), rng.choice([1, 4096, rng.randrange(1, size + 8192)])) for _ in range(40)]


@pytest.mark.parametrize("flags", [0, os.O_DIRECT], ids=["page-cache", "O_DIRECT"])
def test_preads_equal_zipfile(fresh_mount: Mount, fake_members: Dict[str, Member], flags: int) -> None:
    """os.pread at random offsets and sizes equals zipfile's bytes, for every compression method.

    Files are opened with Python's open(), as loaders open them (its isatty() check reaches the
    server too). With O_DIRECT each pread reaches the server as it is: on the native engine a
    whole read of a stored member is answered in C, every other read by the Python fallback."""
    rng = random.Random(flags)
    sample = _sample(fake_members, rng)
    assert {m.info.compress_type for m in sample.values()} == {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
    for path, data in zip_contents(sample).items():
        with open(fresh_mount.path(path), "rb", opener=lambda p, f: os.open(p, f | flags)) as f:
            for offset, length in _random_windows(len(data), rng):
                assert os.pread(f.fileno(), length, offset) == data[offset:offset + length], (path, offset, length)


@pytest.mark.parametrize("deflated", [False, True], ids=["stored", "deflated"])
def test_corrupt_member_gets_eio(fake_set: Path, tmp_path: Path, engine: str, deflated: bool) -> None:
    """A byte flipped at the start, middle or end of a stored or deflated member's data: the C
    checks (native engine: stream end, length, CRC-32) refuse it (no bytes pushed on open, no
    whole read) and hand the read to Python, which refuses it, whole or partial, with EIO and
    logs archive and member; the mount lives on and the members next to it still read right."""
    folder = copy_archives(fake_set, tmp_path / "zips", ["BIOSCAN_5M_original_256.zip"])
    archive = folder / "BIOSCAN_5M_original_256.zip"
    members = zip_members(folder)
    order = sorted(members, key=lambda p: members[p].info.header_offset)
    kind = [i for i, p in enumerate(order[1:-1], start=1) if members[p].deflated == deflated]
    chosen = [kind[0], kind[len(kind) // 2], kind[-1]]
    bad = [order[i] for i in chosen]
    neighbours = {order[i + step] for i in chosen for step in (-1, 1)}
    assert not neighbours & set(bad)
    expected = zip_contents({p: members[p] for p in neighbours})
    # A deflate stream's last byte may hold only padding bits: its flip can change nothing.
    for path, where in zip(bad, (0.0, 0.5, 0.9 if deflated else 1.0)):
        size = members[path].info.compress_size
        flip_byte(archive, data_offset(archive, members[path].info) + min(int(size * where), size - 1))
    with zipfile.ZipFile(archive) as zf:  # the corruption is real for an independent reader
        for path in bad:
            with pytest.raises((zipfile.BadZipFile, zlib.error)):
                zf.read(path)

    with mounted([folder], tmp_path / engine, engine=engine) as live:
        for path in bad:
            live.expect_log(re.escape(path))
            assert_eio(live.path(path).read_bytes, path)
            fd = os.open(live.path(path), os.O_RDONLY | os.O_DIRECT)
            try:
                assert_eio(functools.partial(os.pread, fd, 1, 0), path)
            finally:
                os.close(fd)
            lines = [line for line in live.log_text().splitlines() if path in line]
            assert lines and all("ERROR" in line and str(archive) in line for line in lines), live.log_text()
        assert os.listdir(live.point) == ["bioscan5m"]
        for path, data in expected.items():
            assert live.path(path).read_bytes() == data, path


# -- one copy in memory: stored members are read with O_DIRECT -------------------------------------
def _resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, as util-linux's fincore (mincore(2)) counts them."""
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


#: The most the kernel asks for in one READ (32 pages): larger files are read in pieces.
KERNEL_READ = 128 << 10


def _whole_in_c(members: Dict[str, Member]) -> Dict[str, Member]:
    """The members the C path reads whole: stored or deflated, not empty, and read in one
    READ (the C limit, WHOLE_READ_MAX, is larger)."""
    assert KERNEL_READ <= WHOLE_READ_MAX
    return {p: m for p, m in members.items() if 0 < m.info.file_size <= KERNEL_READ}


# Native only: which reads reach Python is the C engine's split of the work.
def test_small_stored_and_deflated_members_are_served_in_c(fake_set: Path, tmp_path: Path,
                                                           fake_members: Dict[str, Member]) -> None:
    """Whole reads of small stored and deflated members never reach Python (with -vv the
    engine logs each read it hands to Python); a partial read does, and is logged."""
    sample = _whole_in_c(fake_members)
    assert sum(m.deflated for m in sample.values()) >= 20 and sum(not m.deflated for m in sample.values()) >= 20
    with mounted([fake_set], tmp_path / "native", args=["-vv"], engine="native") as live:
        served = {path: live.path(path).read_bytes() for path in sample}
        assert served == zip_contents(sample)
        assert "read through Python" not in live.log_text()
        path = next(p for p, m in sample.items() if m.deflated and m.info.file_size > 2)
        fd = os.open(live.path(path), os.O_RDONLY | os.O_DIRECT)
        try:
            os.pread(fd, 1, 1)
        finally:
            os.close(fd)
        assert f"{path}: " in live.log_text() and "read through Python" in live.log_text()


def _uncache(archives: List[Path]) -> None:
    """The archives' pages out of the page cache (written back first: only clean ones go)."""
    for archive in archives:
        fd = os.open(archive, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    assert sum(map(_resident_bytes, archives)) == 0


# Native only: the O_DIRECT descriptor is the C engine's; the Python reader reads through the cache.
def test_whole_reads_leave_the_archive_uncached(fake_set: Path, tmp_path: Path,
                                                fake_members: Dict[str, Member]) -> None:
    """With --cache-archives no, every small stored or deflated member read through a fresh
    mount (each open asks isatty, which stores the file in the mount's page cache): the
    archives' own pages stay out of the cache, so each file is in memory once, as an
    extracted file would be, not twice. The bytes are zipfile's."""
    sample = _whole_in_c(fake_members)
    assert len(sample) >= 20
    archives = zip_paths(fake_set)
    with mounted([fake_set], tmp_path / "native", args=["--cache-archives", "no"], engine="native") as live:
        _uncache(archives)
        served = {path: live.path(path).read_bytes() for path in sample}
        assert sum(map(_resident_bytes, archives)) == 0, "members were read through the archive's page cache"
    assert served == zip_contents(sample)


# Native only: how the C engine reads an archive; the Python reader has one way.
def test_cached_archives_are_read_around(fake_set: Path, tmp_path: Path, fake_members: Dict[str, Member]) -> None:
    """With --cache-archives yes (auto's choice for archives this small), one whole read
    brings the aligned READ_AROUND span around the member into the archive's page cache,
    far more than the member, so that its neighbours are read from memory; every member's
    bytes are still zipfile's. The span is a hint to the kernel (posix_fadvise): one clean-
    clone CI run in several showed only the member's pages, so a second member is tried."""
    sample = _whole_in_c(fake_members)
    archive = max(zip_paths(fake_set), key=lambda p: p.stat().st_size)
    size = archive.stat().st_size
    # The two members farthest from both ends, whose spans lie wholly inside the archive.
    candidates = sorted(((p, m) for p, m in sample.items() if m.archive == archive),
                        key=lambda pm: -min(pm[1].info.header_offset, size - pm[1].info.header_offset))[:2]
    with mounted([fake_set], tmp_path / "native", args=["--cache-archives", "yes"], engine="native") as live:
        resident = []
        for path, member in candidates:   # a second try: a loaded machine may drop a hint or its pages
            low = member.info.header_offset & ~(nativefs.READ_AROUND - 1)
            window = min(low + nativefs.READ_AROUND, size) - low
            assert window >= 4 * (member.info.compress_size + 4096), "the fixture archive is too small to tell"
            _uncache([archive])
            assert live.path(path).read_bytes() == member.read()
            resident.append((_resident_bytes(archive), window))
            if resident[-1][0] >= window - 4096:
                break
        else:
            raise AssertionError(f"no read brought its span into the page cache: (resident, span) {resident}")
        assert {p: live.path(p).read_bytes() for p in sample} == zip_contents(sample)


@pytest.mark.no_c
def test_archives_are_cached_when_they_fit_in_a_quarter_of_memory() -> None:
    """auto reads through the page cache the archives that fit in CACHED_SHARE of memory."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = int(nativefs.CACHED_SHARE * memory)
    assert nativefs.read_through_cache([share // 2, share // 2])
    assert not nativefs.read_through_cache([share // 2, share // 2 + 1])
    assert nativefs.read_through_cache([memory], choice=True) and not nativefs.read_through_cache([1], choice=False)


def _memory_cgroup(name: str) -> Tuple[Path, str]:
    """A new memory cgroup (v1 where that hierarchy is mounted, else v2) and the file of its limit."""
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "cgroup.procs").exists():
        return v1 / name, "memory.limit_in_bytes"
    return Path("/sys/fs/cgroup") / name, "memory.max"


@pytest.mark.no_c
def test_memory_is_the_cgroups_where_it_is_limited(tmp_path: Path) -> None:
    """A server in a cgroup limited to 1 GiB (as a Slurm job's) weighs its archives against
    1 GiB, not against the machine's memory: the job's page cache is charged there."""
    group, limit_file = _memory_cgroup(f"bioscanfs-test-{os.getpid()}")
    group.mkdir()
    try:
        if not (group / limit_file).exists():
            pytest.skip(f"no memory controller in {group.parent} (its cgroup.subtree_control)")
        (group / limit_file).write_text(str(1 << 30))
        child = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
                 "from bioscanfs import nativefs; print(nativefs.memory_bytes())")
        done = subprocess.run([sys.executable, "-c", child, str(group / "cgroup.procs")],
                              capture_output=True, text=True, check=True)
        assert int(done.stdout) == 1 << 30
        assert nativefs.memory_bytes() > 1 << 30
    finally:
        group.rmdir()


# Native only: the C engine's fallback when O_DIRECT is refused.
def test_archive_on_a_filesystem_without_o_direct(fake_set: Path, tmp_path: Path) -> None:
    """ramfs refuses O_DIRECT at open: the C path then reads through the page cache, and every
    member still reads as zipfile reads it, stored and deflated, whole and in windows."""
    ramfs = tmp_path / "ramfs"
    ramfs.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "bioscanfs-test", str(ramfs)], check=True, capture_output=True)
    try:
        folder = copy_archives(fake_set, ramfs / "zips", ["BIOSCAN_5M_original_256.zip"])
        archive = folder / "BIOSCAN_5M_original_256.zip"
        with pytest.raises(OSError) as refused:
            os.close(os.open(archive, os.O_RDONLY | os.O_DIRECT))
        assert refused.value.errno == errno.EINVAL
        members = zip_members(folder)
        assert any(m.deflated for m in _whole_in_c(members).values()) and any(
            not m.deflated for m in _whole_in_c(members).values())
        with mounted([folder], tmp_path / "native", engine="native") as live:
            assert_serves_members(live, members)
            rng = random.Random(7)
            for path, data in zip_contents(_sample(members, rng)).items():
                with open(live.path(path), "rb") as f:
                    for offset, length in _random_windows(len(data), rng):
                        assert os.pread(f.fileno(), length, offset) == data[offset:offset + length], path
    finally:
        subprocess.run(["umount", str(ramfs)], check=True, capture_output=True)


def _bad_deflate_members() -> Dict[str, Entry]:
    """Small deflated members the C inflate path must refuse: a stream cut short, one that
    inflates past its declared size, one whose CRC-32 is wrong, one with bytes after its end."""
    plain = bytes(range(256)) * 200
    stream = raw_deflate(plain)
    return {
        "truncated": Entry(b"bad/truncated", stream[:len(stream) // 2], method=8, size=len(plain),
                           crc=zlib.crc32(plain)),
        "past-size": Entry(b"bad/past-size", stream, method=8, size=len(plain) - 1, crc=zlib.crc32(plain[:-1])),
        "wrong-crc": Entry(b"bad/wrong-crc", stream, method=8, size=len(plain), crc=zlib.crc32(plain) ^ 1),
        "bytes-after-end": Entry(b"bad/bytes-after-end", stream + b"\0" * 16, method=8, size=len(plain),
                                 crc=zlib.crc32(plain)),
    }


@pytest.mark.parametrize("case", sorted(_bad_deflate_members()))
def test_bad_deflate_stream_gets_eio(case: str, tmp_path: Path, engine: str) -> None:
    """The C inflate path (native) refuses each bad stream and hands it to Python, which
    names the fault: EIO, whole or partial, one log line; honest members beside it read."""
    folder = tmp_path / "zips"
    folder.mkdir()
    good = [deflated(b"good/%d" % i, bytes([i]) * 5000 + b"tail") for i in range(3)]
    write_zip(folder / "streams.zip", [good[0], _bad_deflate_members()[case], *good[1:]])
    with mounted([folder], tmp_path / engine, engine=engine) as live:
        live.expect_log(re.escape(f"bad/{case}"))
        assert_eio(live.path(f"bad/{case}").read_bytes, case)
        want = [bytes([i]) * 5000 + b"tail" for i in range(3)]
        assert [live.path(f"good/{i}").read_bytes() for i in range(3)] == want


@contextlib.contextmanager
def _slow_store(folder: Path, workdir: Path, latency_ms: int) -> Iterator[Path]:
    """``folder`` seen through scripts/bench_store.c: a stand-in for a network file system,
    each read that misses the page cache waiting ``latency_ms`` (built with gcc and
    libfuse3-dev, which the C engine needs too)."""
    view = workdir / "store"
    view.mkdir(parents=True)
    benchutil = load_script("_benchutil")
    subprocess.run(benchutil.store_command(workdir, folder, view, latency_ms), check=True, capture_output=True)
    try:
        yield view
    finally:
        subprocess.run(benchutil.fusermount(view)[0], check=True, capture_output=True)


def _peak_threads(pid: int, stop: threading.Event) -> int:
    """The most threads process ``pid`` had while sampled, until ``stop`` is set."""
    peak = 0
    while not stop.is_set():
        peak = max(peak, len(os.listdir(f"/proc/{pid}/task")))
        stop.wait(0.005)
    return peak


# Native only: the bound on reads in flight is the C engine's own (serving.max_workers);
# the mfusepy engine runs libfuse's loop as mfusepy sets it up.
def test_reads_in_flight_are_not_capped_at_ten(fake_set: Path, tmp_path: Path,
                                               fake_members: Dict[str, Member]) -> None:
    """With every archive read waiting 50 ms on a slow store (as on a cluster's network file
    system), 24 readers at once keep more workers busy than libfuse's default bound of 10
    (the server then had 11 threads at most, with its main thread), and every member they
    read is zipfile's. Exact reads (--cache-archives no): each goes to the store."""
    assert serving.max_workers() >= 16
    members = {path: m for path, m in fake_members.items() if m.archive.name == "BIOSCAN_5M_original_256.zip"}
    with _slow_store(fake_set, tmp_path / "slow", latency_ms=50) as view, \
            mounted([view], tmp_path / "native", ["--cache-archives", "no"], engine="native") as live:
        expected = zip_contents(members)
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=2) as sampler:
            peak = sampler.submit(_peak_threads, live.pid, stop)
            with ThreadPoolExecutor(max_workers=24) as readers:
                read = list(readers.map(lambda path: (path, live.path(path).read_bytes()), sorted(expected)[:240]))
            stop.set()
        assert all(data == expected[path] for path, data in read)
        assert peak.result() >= 14, f"at most {peak.result()} threads served 24 readers"
