"""The mounted tree through the kernel: bytes, attributes, listings, errors, lifecycle.

Everything is read with plain open()/os.stat()/os.listdir() on a real FUSE mount and
compared with what zipfile reads from the same archives.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import signal
import stat
import threading
import time
import zipfile
import zlib
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, List

import numpy as np
import pytest
from conftest import (
    EXIT_TIMEOUT,
    Member,
    Mount,
    MountFactory,
    assert_eio,
    assert_one_error_line,
    assert_preads,
    copy_archives,
    data_offset,
    expected_tree,
    flip_byte,
    fresh_index,
    is_mounted,
    largest_image,
    read_windows,
    run_cli,
    walk_mount,
    zip_contents,
    zip_members,
)

from bioscanfs.serving import READAHEAD_KB, widen_readahead

IMGTYPES = ("original_full", "cropped", "original_256", "cropped_256")
#: Split -> md5 hex chars of its chunk folder (bioscan5m.md, "Paths inside the zips").
CHUNK_WIDTH = {"pretrain": 2, "train": 1, "other_heldout": 1, "val": 0, "test": 0,
               "val_unseen": 0, "test_unseen": 0, "key_unseen": 0}
METADATA_CSV = "bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv"


# -- bytes and attributes ---------------------------------------------------------------------
def test_every_member_reads_back_identical(fake_mount: Mount, fake_members: Dict[str, Member]) -> None:
    """The whole mixed stored/deflated set, each member read whole through the kernel."""
    expected = zip_contents(fake_members)
    assert any(m.deflated for m in fake_members.values()) and not all(m.deflated for m in fake_members.values())
    for path, data in expected.items():
        assert fake_mount.path(path).read_bytes() == data, path


def test_small_cache_still_serves_every_deflated_member(mount: MountFactory, fake_set: Path,
                                                        fake_members: Dict[str, Member]) -> None:
    """With a 1 KiB cache nothing decoded is kept; every read must decode afresh, correctly."""
    live = mount(fake_set, args=["--cache-size", "1K"])
    deflated = {p: m for p, m in fake_members.items() if m.deflated}
    expected = zip_contents(deflated)
    for _ in range(2):
        for path, data in expected.items():
            assert live.path(path).read_bytes() == data, path


def test_file_attributes(fake_mount: Mount, fake_members: Dict[str, Member]) -> None:
    """Exact size, 0444, owner, and mtime = the entry's DOS time read as UTC."""
    for path, member in fake_members.items():
        st = os.stat(fake_mount.path(path))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444, path
        assert st.st_size == member.info.file_size, path
        assert st.st_mtime_ns == member.mtime * 10**9, path
        assert (st.st_uid, st.st_gid, st.st_nlink) == (os.getuid(), os.getgid(), 1), path


def test_directory_attributes(fake_mount: Mount, fake_members: Dict[str, Member]) -> None:
    """0555 directories whose link count is 2 + their subdirectories."""
    tree = expected_tree(fake_members)
    for folder, names in tree.items():
        st = os.stat(fake_mount.path(folder))
        subdirs = sum(1 for name in names if (f"{folder}/{name}" if folder else name) in tree)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o555, folder
        assert st.st_nlink == 2 + subdirs, folder
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), folder


def _readahead_knob(point: Path) -> Path:
    """The readahead knob of the mount at ``point``: its own backing device's, by st_dev."""
    dev = os.stat(point).st_dev
    return Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")


def test_readahead_is_widened(fake_mount: Mount) -> None:
    """As root the mount's own backing device reads ahead READAHEAD_KB, so a sequential
    reader (the CSV's md5) gets 1 MiB requests instead of the kernel's 128 KiB. A
    foreground server widens it on a thread of its own once the kernel took its INIT
    reply, so shortly after the mount answers (a daemon's parent, before it returns)."""
    assert os.geteuid() == 0, "the suite runs as root (FUSE mounts)"
    knob = _readahead_knob(fake_mount.point)
    deadline = time.monotonic() + 5
    while int(knob.read_text()) != READAHEAD_KB and time.monotonic() < deadline:
        time.sleep(0.01)
    assert int(knob.read_text()) == READAHEAD_KB


def test_widening_the_readahead_never_waits_on_the_mount(mount: MountFactory, fake_set: Path) -> None:
    """widen_readahead reads the mount table and the knob only: with the server stopped it
    still returns (a server thread waiting on its own mount could not be reaped after a
    SIGKILL). The knob already shows the widened value, not the INIT reply's, so it gives
    up after its wait and leaves the knob as it was."""
    live = mount(fake_set)
    assert live.proc is not None
    knob = _readahead_knob(live.point)
    live.proc.send_signal(signal.SIGSTOP)
    try:
        call = threading.Thread(target=widen_readahead, args=(str(live.point), 0.2), daemon=True)
        call.start()
        call.join(5)
        assert not call.is_alive(), "widen_readahead waited on the stopped server's mount"
    finally:
        live.proc.send_signal(signal.SIGCONT)
    assert int(knob.read_text()) == READAHEAD_KB


# -- listings ---------------------------------------------------------------------------------
def test_listings_equal_member_paths(fake_mount: Mount, fake_members: Dict[str, Member]) -> None:
    """Every directory lists exactly the names the member paths imply (no dir entries exist)."""
    assert not any(name.endswith("/") for m in fake_members.values() for name in [m.info.filename])
    assert walk_mount(fake_mount.point) == expected_tree(fake_members)


def test_dataset_layout(fake_mount: Mount) -> None:
    """All imgtypes and splits, md5 chunk folders of the right width, and the metadata files."""
    images = fake_mount.path("bioscan5m/images")
    assert set(os.listdir(images)) == set(IMGTYPES)
    for imgtype in IMGTYPES:
        assert set(os.listdir(images / imgtype)) == set(CHUNK_WIDTH), imgtype
        for split, width in CHUNK_WIDTH.items():
            folder = images / imgtype / split
            entries = os.listdir(folder)
            assert entries, folder
            if width == 0:
                assert all(name.endswith(".jpg") and (folder / name).is_file() for name in entries), folder
                continue
            for chunk in entries:
                assert len(chunk) == width and (folder / chunk).is_dir(), folder / chunk
                for name in os.listdir(folder / chunk):
                    processid = name[:-len(".jpg")]
                    assert hashlib.md5(processid.encode()).hexdigest()[:width] == chunk, name
    assert set(os.listdir(fake_mount.path("bioscan5m/metadata"))) == {"csv", "jsonld"}
    assert fake_mount.path(METADATA_CSV).is_file()


# -- partial reads ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_stored_set(tmp_path_factory: pytest.TempPathFactory, bench_scale: ModuleType) -> Path:
    """A stored member bigger than one kernel read (128 KiB) and than 1 MiB, via write_stored_zip."""
    out = tmp_path_factory.mktemp("big_stored")
    payload = np.random.default_rng(7).integers(0, 256, (1 << 20) + 12_345, dtype=np.uint8).tobytes()
    bench_scale.write_stored_zip(out / "big.zip", [b"big/stored.bin", b"big/tiny.bin"],
                                 [payload, b"tiny\n"], 0x4A00, 0x58AE)
    return out


@pytest.fixture(scope="module")
def pread_cases(fake_members: Dict[str, Member], big_stored_set: Path) -> Dict[str, Member]:
    """Stored and deflated images, the deflated CSV (> 128 KiB) and a > 1 MiB stored member."""
    big = zip_members(big_stored_set)["big/stored.bin"]
    cases = {path: fake_members[path] for path in (largest_image(fake_members, deflated=False),
                                                 largest_image(fake_members, deflated=True))}
    cases[METADATA_CSV] = fake_members[METADATA_CSV]
    cases["big/stored.bin"] = big
    assert fake_members[METADATA_CSV].deflated and fake_members[METADATA_CSV].info.file_size > 131072
    return cases


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "O_DIRECT"])
def test_partial_reads(mount: MountFactory, fake_set: Path, big_stored_set: Path,
                       pread_cases: Dict[str, Member], direct: bool) -> None:
    """os.pread at many offsets and sizes equals the slice of zipfile's bytes.

    Through the page cache the kernel asks for whole pages; with O_DIRECT it passes
    each offset and size to the filesystem as they are.
    """
    live = mount(fake_set, big_stored_set)
    for path, member in pread_cases.items():
        data = member.read()
        assert_preads(live.path(path), data, read_windows(len(data)), os.O_DIRECT if direct else 0)


# -- read-only ------------------------------------------------------------------------------
_WRITES: Dict[str, Callable[[Path, Path], object]] = {
    "open-for-write": lambda f, d: open(f, "r+b"),
    "open-append": lambda f, d: open(f, "ab"),
    "create": lambda f, d: open(d / "new.txt", "xb"),
    "mkdir": lambda f, d: os.mkdir(d / "newdir"),
    "rmdir": lambda f, d: os.rmdir(d),
    "unlink": lambda f, d: os.unlink(f),
    "rename": lambda f, d: os.rename(f, d / "renamed.jpg"),
    "chmod": lambda f, d: os.chmod(f, 0o644),
    "chown": lambda f, d: os.chown(f, 1, 1),
    "truncate": lambda f, d: os.truncate(f, 0),
    "utime": lambda f, d: os.utime(f, (0, 0)),
    "symlink": lambda f, d: os.symlink("x", d / "link"),
    "hardlink": lambda f, d: os.link(f, d / "hard.jpg"),
    "setxattr": lambda f, d: os.setxattr(f, "user.test", b"1"),
}


@pytest.mark.parametrize("operation", sorted(_WRITES))
def test_writes_get_erofs(fake_mount: Mount, fake_members: Dict[str, Member], operation: str) -> None:
    """Every write-type call fails with EROFS and leaves the member as it was."""
    path = largest_image(fake_members, deflated=False)
    member = fake_members[path]
    target = fake_mount.path(path)
    with pytest.raises(OSError) as err:
        _WRITES[operation](target, target.parent)
    assert err.value.errno == errno.EROFS, err.value
    assert target.read_bytes() == member.read()


def test_statvfs(fake_mount: Mount, fake_members: Dict[str, Member]) -> None:
    """statvfs answers: read-only, inode count = files + dirs, blocks cover the bytes."""
    st = os.statvfs(fake_mount.point)
    total = sum(m.info.file_size for m in fake_members.values())
    assert st.f_flag & os.ST_RDONLY
    assert st.f_files == len(fake_members) + len(expected_tree(fake_members))
    assert total <= st.f_blocks * st.f_frsize < total + st.f_frsize
    assert st.f_bfree == st.f_bavail == 0
    assert st.f_namemax == 255


# -- corrupt members --------------------------------------------------------------------------
def test_corrupt_members_get_eio_and_neighbours_read(mount: MountFactory, fake_set: Path, tmp_path: Path) -> None:
    """A flipped data byte (stored and deflated) and a destroyed local header give EIO;
    the log names the archive and the member; every other member still reads."""
    folder = copy_archives(fake_set, tmp_path / "corrupt", ["BIOSCAN_5M_original_256.zip"])
    archive = folder / "BIOSCAN_5M_original_256.zip"
    members = zip_members(folder)
    expected = zip_contents(members)
    stored = [p for p, m in sorted(members.items()) if not m.deflated]
    deflated = [p for p, m in sorted(members.items()) if m.deflated]
    bad_data = {stored[0], deflated[0]}
    bad_header = {stored[1], deflated[1]}
    for path in bad_data:
        info = members[path].info
        flip_byte(archive, data_offset(archive, info) + info.compress_size // 2)
    for path in bad_header:
        flip_byte(archive, members[path].info.header_offset)  # 'P' of PK\x03\x04
    with zipfile.ZipFile(archive) as zf:  # the corruption is real for an independent reader
        for path in bad_data | bad_header:
            with pytest.raises((zipfile.BadZipFile, zlib.error)):
                zf.read(path)

    live = mount(folder)
    for path in sorted(bad_data | bad_header):
        live.expect_log(re.escape(path))
        assert_eio(live.path(path).read_bytes, path)
        lines = [line for line in live.log_text().splitlines() if path in line]
        assert lines and str(archive) in lines[0] and "ERROR" in lines[0], live.log_text()
    for path, data in expected.items():
        if path not in bad_data | bad_header:
            assert live.path(path).read_bytes() == data, path


def test_corrupt_large_stored_member_gets_eio(mount: MountFactory, big_stored_set: Path, tmp_path: Path) -> None:
    """Read start to end, a corrupt stored member must fail, whatever its size."""
    folder = copy_archives(big_stored_set, tmp_path / "corrupt")
    archive = folder / "big.zip"
    info = zip_members(folder)["big/stored.bin"].info
    flip_byte(archive, data_offset(archive, info) + info.compress_size // 2)
    live = mount(folder)
    live.expect_log("big/stored.bin")
    assert_eio(live.path("big/stored.bin").read_bytes, "big/stored.bin")


# -- the CLI: daemon mode, errors, stale mounts, signals ---------------------------------------
def test_daemon_mount_is_ready_on_return_and_umount(mount: MountFactory, fake_set: Path,
                                                    fake_members: Dict[str, Member]) -> None:
    """`bioscanfs mount` (no -f) returns 0 only once files read, and its readahead widened;
    `umount` removes the mount."""
    live = mount(fake_set, daemon=True)
    assert _readahead_knob(live.point).read_text() == f"{READAHEAD_KB}\n"
    assert live.path(METADATA_CSV).read_bytes() == fake_members[METADATA_CSV].read()
    done = run_cli("umount", live.point)
    assert done.returncode == 0, done.stderr
    assert not is_mounted(live.point)
    assert os.listdir(live.point) == []


# One engine: each mount is refused before any engine serves.
def test_mount_errors_are_one_line(mountpoint: Path, fake_set: Path, tmp_path: Path) -> None:
    """Missing inputs, no zips, a non-zip .zip: non-zero exit, one clear line, no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "BIOSCAN_5M_cropped_256.zip").write_bytes(b"not a zip at all\n" * 100)
    assert_one_error_line(run_cli("mount", tmp_path / "missing", mountpoint), "missing")
    assert_one_error_line(run_cli("mount", empty, mountpoint, "--index-dir", tmp_path / "i"), "no zip")
    assert_one_error_line(run_cli("mount", garbage, mountpoint, "--index-dir", tmp_path / "i"),
                          "BIOSCAN_5M_cropped_256.zip")
    assert_one_error_line(run_cli("mount", fake_set, tmp_path / "nomnt"), "nomnt")


def test_mount_on_a_mount_point_is_refused(fake_mount: Mount, fake_set: Path) -> None:
    """A second mount on a live mount point is a user error, and the first one survives."""
    assert_one_error_line(run_cli("mount", fake_set, fake_mount.point), "already a mount point")
    assert os.listdir(fake_mount.point) == ["bioscan5m"]


def test_skip_bad_mounts_the_rest(mount: MountFactory, fake_set: Path, tmp_path: Path,
                                  mountpoint: Path) -> None:
    """A truncated archive stops the mount, unless --skip-bad, which warns and serves the rest."""
    folder = copy_archives(fake_set, tmp_path / "mixed",
                           ["BIOSCAN_5M_cropped_256_eval.zip", "BIOSCAN_5M_cropped_256_train.zip"])
    bad = folder / "BIOSCAN_5M_cropped_256_eval.zip"
    good = zip_members(copy_archives(folder, tmp_path / "good", [
        "BIOSCAN_5M_cropped_256_train.zip"]))
    os.truncate(bad, bad.stat().st_size // 2)
    assert_one_error_line(run_cli("mount", folder, mountpoint, "--index-dir", tmp_path / "i"), bad.name)
    live = mount(folder, args=["--skip-bad"])
    live.expect_log(re.escape(bad.name))
    assert bad.name in live.log_text()
    assert walk_mount(live.point) == expected_tree(good)
    for path, data in zip_contents(good).items():
        assert live.path(path).read_bytes() == data


def test_umount_clears_a_stale_mount(mount: MountFactory, fake_set: Path) -> None:
    """After SIGKILL the mount answers ENOTCONN; `bioscanfs umount` still removes it."""
    live = mount(fake_set)
    assert live.proc is not None
    live.proc.kill()
    # Bounded: a server killed while a thread of its own waits on its mount (the readahead
    # thread's statvfs) cannot be reaped; the test fails instead of hanging the suite.
    live.proc.wait(timeout=EXIT_TIMEOUT)
    live.expected_exit = -signal.SIGKILL
    with pytest.raises(OSError) as err:
        os.stat(live.point)
    assert err.value.errno == errno.ENOTCONN
    done = run_cli("umount", live.point)
    assert done.returncode == 0, done.stderr
    assert not is_mounted(live.point)


@contextlib.contextmanager
def _inheriting(signum: int, handler: signal.Handlers) -> Iterator[None]:
    """Children started inside inherit ``handler`` for ``signum`` (an ignored signal stays
    ignored across exec, as under nohup), whatever this process was started with."""
    saved = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, saved)


#: (signal, request loop, disposition the server inherits): every signal on both loops, and
#: every signal inherited ignored, as `nohup` leaves SIGHUP.
_SIGNAL_CASES = [pytest.param(s, loop, signal.SIG_DFL, id=f"{s.name}-{name}")
                 for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                 for name, loop in (("loop-mt", []), ("loop", ["--single-threaded"]))] + \
                [pytest.param(s, [], signal.SIG_IGN, id=f"{s.name}-inherited-ignored")
                 for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]


@pytest.mark.parametrize("signum, loop, inherited", _SIGNAL_CASES)
def test_signal_ends_a_foreground_mount(mount: MountFactory, fake_set: Path, signum: signal.Signals,
                                        loop: List[str], inherited: signal.Handlers) -> None:
    """Each signal ends either request loop (multi-threaded, or -s), also when the server was
    started with it ignored: the mount is gone and the process exits with 0. (The C engine
    puts libfuse's handlers over whatever it inherited, Python's SIGINT handler included.)"""
    with _inheriting(signum, inherited):
        live = mount(fake_set, args=loop)
    assert live.proc is not None
    assert os.listdir(live.point) == ["bioscan5m"]
    live.proc.send_signal(signum)
    assert live.proc.wait(timeout=EXIT_TIMEOUT) == 0, live.log_text()
    assert not is_mounted(live.point)


@pytest.mark.parametrize("mode", [
    pytest.param([], id="daemon"),
    pytest.param(["-f"], id="foreground"),
])
def test_bad_fuse_option_is_one_line(mode: List[str], fake_set: Path, tmp_path: Path, mountpoint: Path,
                                     engine: str) -> None:
    """An -o option libfuse does not know: non-zero exit, one 'Error:' line naming the option, no
    traceback, nothing mounted (the mountpoint fixture fails the test if anything is)."""
    index_dir = fresh_index([fake_set], tmp_path / "index")   # the subject is the option, not the build
    done = run_cli("mount", fake_set, mountpoint, "--index-dir", index_dir, "--engine", engine,
                   "-o", "no_such_option", *mode)
    assert_one_error_line(done, "no_such_option")
    assert not is_mounted(mountpoint)


def test_pillow_opens_a_jpeg(fake_mount: Mount, fake_members: Dict[str, Member]) -> None:
    """The reference loader opens images with PIL: same size and pixels as from zipfile."""
    from PIL import Image

    for deflated in (False, True):
        path = largest_image(fake_members, deflated)
        member = fake_members[path]
        with Image.open(fake_mount.path(path)) as through_mount, Image.open(io.BytesIO(member.read())) as direct:
            assert through_mount.format == "JPEG"
            assert through_mount.size == direct.size
            assert through_mount.tobytes() == direct.tobytes()



def test_archive_truncated_under_a_live_mount_gives_eio(mount: MountFactory, fake_set: Path,
                                                        tmp_path: Path) -> None:
    """Members past the new end of a shrunk archive get EIO, not short or wrong bytes."""
    folder = copy_archives(fake_set, tmp_path / "shrinking", ["BIOSCAN_5M_original_256.zip"])
    archive = folder / "BIOSCAN_5M_original_256.zip"
    members = zip_members(folder)
    expected = zip_contents(members)
    data_end = {p: data_offset(archive, m.info) + m.info.compress_size for p, m in members.items()}
    live = mount(folder)
    cut = archive.stat().st_size // 2
    os.truncate(archive, cut)
    lost = [p for p in members if data_end[p] > cut]  # wholly or partly past the cut
    kept = [p for p in members if data_end[p] <= cut]
    assert kept and any(members[p].info.header_offset < cut for p in lost)
    live.expect_log("cannot read")
    for path in lost:
        assert_eio(live.path(path).read_bytes, path)
    for path in kept:
        assert live.path(path).read_bytes() == expected[path], path
