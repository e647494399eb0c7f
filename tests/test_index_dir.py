"""The index folder: trusted, whole, bounded and tidy.

Who may have written it (issue 16), builders that meet, full and read-only folders
(issue 16), headers that could not be read back and warnings per member (issue 21 row 7),
superseded and leftover files (issue 21 row 8). Mounts are real FUSE mounts through the
``mount`` fixture (both engines); full and read-only folders are real tmpfs mounts;
"another user" is uid 65534 (the tests run as root).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest
from conftest import (
    PYTHON,
    MountFactory,
    assert_one_error_line,
    assert_serves_members,
    copy_archives,
    index_files,
    is_mounted,
    run_cli,
    touch,
    zip_members,
    zip_paths,
)
from craft import Entry, write_zip

from bioscanfs import store
from bioscanfs.errors import UntrustedIndexError
from bioscanfs.index import load_tree
from bioscanfs.sources import open_sources

SMALL_ZIPS = ["BIOSCAN_5M_cropped_256_eval.zip", "BIOSCAN_5M_cropped_256_train.zip"]
NOBODY = 65534
HOUR, DAY = 3600, 86400


@pytest.fixture
def small_set(fake_set: Path, tmp_path: Path) -> Path:
    """A private copy of two small generated zips, free to be touched."""
    return copy_archives(fake_set, tmp_path / "set", SMALL_ZIPS)


def temporaries(index_dir: Path) -> List[str]:
    return [p.name for p in index_dir.iterdir() if p.name.startswith(".tmp-")]


def age(path: Path, seconds: float) -> None:
    """Set a file's mtime ``seconds`` into the past, as if it was last used then."""
    when = time.time() - seconds
    os.utime(path, (when, when))


def assert_one_whole_index(index_dir: Path, archives: int) -> None:
    """One tree (of ``archives`` archives), no temporary; the file whole (magic, header
    and every array inside it)."""
    (name,) = index_files(index_dir)
    assert name.endswith(".tree") and temporaries(index_dir) == []
    assert len(assert_whole(index_dir / name)["__extra__"]["kept"]) == archives


def assert_whole(path: Path) -> Dict[str, Any]:
    """The file holds its whole header and all its arrays (a half-written one does not)."""
    header = store.read_header(str(path))
    assert header is not None, path
    loaded = store.load(str(path), header["key"])
    assert loaded is not None, path
    return loaded


def warning_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if "WARNING" in line or line.startswith("warning:")]


# -- real tmpfs folders ------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(point: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``point`` for the duration; always unmounted after."""
    point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        for command in (["umount", str(point)], ["umount", "-l", str(point)]):
            if is_mounted(point):
                subprocess.run(command, capture_output=True)


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def full_index_dir(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs filled up to its last 48 KiB: the first few members files fit, the
    tree does not (its header does, its arrays do not, so the save fails midway).

    Requested before ``mount``, so it is unmounted after the bioscanfs mounts are."""
    with tmpfs(tmp_path / "full", "size=1m,mode=0700") as folder:
        (folder / "filler").write_bytes(b"\0" * (free_bytes(folder) - (48 << 10)))
        yield folder


@pytest.fixture
def read_only_index_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty read-only tmpfs (root writes to a folder whatever its mode; not to this)."""
    with tmpfs(tmp_path / "ro", "size=1m,mode=0755,ro") as folder:
        yield folder


# == issue 16: a folder or file another user could have written ====================================
def _another_users(path: Path) -> None:
    os.chown(path, NOBODY, NOBODY)


def _world_writable(path: Path) -> None:
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | stat.S_IWOTH)


def _group_writable(path: Path) -> None:
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | stat.S_IWGRP)


#: Each way a folder or file becomes writable by another user.
UNSAFE = [_another_users, _world_writable, _group_writable]


@pytest.mark.parametrize("make_unsafe", UNSAFE)
@pytest.mark.parametrize("command", ["mount", "index", "info"])
def test_index_folder_others_could_write_is_refused(small_set: Path, tmp_path: Path, mountpoint: Path,
                                                     command: str, make_unsafe) -> None:
    """One 'Error:' line naming the folder and --index-dir; nothing read or written there.

    The refusal comes before either engine starts, so one run covers both."""
    folder = tmp_path / "index"
    folder.mkdir(mode=0o755)
    make_unsafe(folder)
    args = [mountpoint, "-f"] if command == "mount" else []
    done = run_cli(command, small_set, *args, "--index-dir", folder)
    if command == "index":  # its progress bar prints its label first, to stderr (cli.py)
        done.stderr = done.stderr.replace("indexing\n", "", 1)
    assert_one_error_line(done, str(folder))
    assert "--index-dir" in done.stderr, done.stderr
    assert index_files(folder) == {} and temporaries(folder) == []
    assert not is_mounted(mountpoint)


def test_sticky_shared_folder_is_accepted(mount: MountFactory, small_set: Path, tmp_path: Path) -> None:
    """A world-writable folder with the sticky bit (like /tmp): others cannot replace our files."""
    folder = tmp_path / "index"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    live = mount(small_set, index_dir=folder)
    assert_serves_members(live, zip_members(small_set))
    assert_one_whole_index(folder, 2)


@pytest.mark.parametrize("kind", ["*.tree", "*.files.col"])
@pytest.mark.parametrize("make_unsafe", UNSAFE)
def test_index_file_others_could_write_is_refused(small_set: Path, tmp_path: Path, mountpoint: Path,
                                                  make_unsafe, kind: str) -> None:
    """A file the mount would read (the tree or one of its column files) that another user
    could have written: one line naming it."""
    folder = tmp_path / "index"
    assert run_cli("index", small_set, "--index-dir", folder).returncode == 0
    target = sorted(folder.glob(kind))[0]
    make_unsafe(target)
    done = run_cli("mount", small_set, mountpoint, "-f", "--index-dir", folder)
    assert_one_error_line(done, str(target))
    assert not is_mounted(mountpoint)


def test_api_refuses_with_its_own_error(small_set: Path, tmp_path: Path) -> None:
    """Through the API the refusal is an UntrustedIndexError (a BioscanError) naming the folder."""
    folder = tmp_path / "index"
    folder.mkdir()
    _another_users(folder)
    sources = open_sources([([str(p)], False) for p in zip_paths(small_set)])
    try:
        with pytest.raises(UntrustedIndexError, match=str(folder)):
            load_tree(sources, str(folder))
    finally:
        for src in sources:
            src.close()


def test_default_folder_is_created_private_whatever_the_umask(small_set: Path, tmp_path: Path,
                                                               engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default folder is ours: created 0700 under umask 002, so the check passes for
    it in `index` and in a daemon mount (which opens its log there first)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    point = tmp_path / "mnt"
    point.mkdir()
    old = os.umask(0o002)
    try:
        done = run_cli("index", small_set)
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE((cache / "bioscanfs").stat().st_mode) == 0o700
        shutil.rmtree(cache)
        done = run_cli("mount", small_set, point, "--engine", engine)
        assert done.returncode == 0 and is_mounted(point), done.stderr
        members = zip_members(small_set)
        for path, member in members.items():
            assert (point / path).read_bytes() == member.read(), path
        assert run_cli("umount", point).returncode == 0
    finally:
        os.umask(old)
        if is_mounted(point):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
    assert stat.S_IMODE((cache / "bioscanfs").stat().st_mode) == 0o700
    assert_one_whole_index(cache / "bioscanfs", 2)


@pytest.mark.parametrize("touched", [False, True], ids=["as-built", "archive-touched"])
def test_shared_read_only_index_is_mapped_by_another_user(fake_set: Path, touched: bool) -> None:
    """The README's recipe: root builds the index in a 0755 folder; another user maps it
    (no rebuild, no warning) though the folder is root's and not writable by them; also
    once an archive was touched since (the same directory: the index still holds)."""
    shared = Path(tempfile.mkdtemp(prefix="bioscanfs-shared-"))  # outside pytest's 0700 tmp
    try:
        os.chmod(shared, 0o755)
        archives = copy_archives(fake_set, shared / "set", SMALL_ZIPS)
        folder = shared / "index"
        folder.mkdir(mode=0o755)
        assert run_cli("index", archives, "--index-dir", folder).returncode == 0
        built = index_files(folder)
        if touched:
            touch(zip_paths(archives)[0])
        done = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             PYTHON, "-m", "bioscanfs", "info", "--json", archives, "--index-dir", folder],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, HOME=str(shared)))
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr
        assert json.loads(done.stdout)["totals"]["members"] == len(zip_members(archives))
        assert index_files(folder) == built
    finally:
        shutil.rmtree(shared)


# == issue 16: builders that meet, full and read-only folders ======================================
def test_two_mounts_and_an_index_command_at_once(mount: MountFactory, fake_set: Path, tmp_path: Path) -> None:
    """All three start together on an empty folder: all succeed, both mounts serve the
    right bytes, and the folder ends with one whole index that the next run maps."""
    folder = tmp_path / "index"
    with ThreadPoolExecutor(max_workers=3) as pool:
        mounts = [pool.submit(mount, fake_set, index_dir=folder) for _ in range(2)]
        indexed = pool.submit(run_cli, "index", fake_set, "--index-dir", folder, "--views", "none")  # as mounts here
        lives = [m.result() for m in mounts]
        done = indexed.result()
    assert done.returncode == 0, done.stderr
    members = zip_members(fake_set)
    for live in lives:
        assert_serves_members(live, members)
    assert_one_whole_index(folder, len(zip_paths(fake_set)))
    built = index_files(folder)
    assert run_cli("index", fake_set, "--index-dir", folder, "--views", "none").returncode == 0
    assert index_files(folder) == built, "the index left behind was not the one mapped"


def test_full_index_folder_serves_from_memory(full_index_dir: Path, mount: MountFactory, fake_set: Path) -> None:
    """A full disk: the mount serves from memory with one warning, leaves no temporary and
    no partial file; once there is room, the next mount writes a whole index."""
    live = mount(fake_set, index_dir=full_index_dir)
    live.expect_log("cannot write the index")
    assert_serves_members(live, zip_members(fake_set))
    assert len(warning_lines(live.log_text())) == 1, live.log_text()
    assert "No space left" in live.log_text()
    assert temporaries(full_index_dir) == []
    assert not list(full_index_dir.glob("*.tree"))
    (full_index_dir / "filler").unlink()
    live = mount(fake_set, index_dir=full_index_dir)
    assert_one_whole_index(full_index_dir, len(zip_paths(fake_set)))


def test_read_only_index_folder_serves_from_memory(read_only_index_dir: Path, mount: MountFactory,
                                                   small_set: Path) -> None:
    """A read-only folder: one warning, the right bytes, nothing written."""
    live = mount(small_set, index_dir=read_only_index_dir)
    live.expect_log("cannot write the index")
    assert_serves_members(live, zip_members(small_set))
    assert len(warning_lines(live.log_text())) == 1, live.log_text()
    assert os.listdir(read_only_index_dir) == []


def test_failed_save_removes_its_temporary(tmp_path: Path) -> None:
    """store.save that runs out of room midway raises and leaves nothing behind."""
    with tmpfs(tmp_path / "tiny", "size=64k,mode=0700") as folder:
        target = folder / "x.tree"
        with pytest.raises(OSError) as err:
            store.save(str(target), "key", {"big": np.arange(1 << 16, dtype=np.uint64)})
        assert err.value.errno == errno.ENOSPC
        assert os.listdir(folder) == []


def test_short_file_is_never_trusted(tmp_path: Path) -> None:
    """A file cut anywhere (a killed or failed writer) loads as absent, never as an index."""
    target = tmp_path / "x.tree"
    arrays = {"a": np.arange(1000, dtype=np.uint32), "b": np.frombuffer(b"names" * 50, np.uint8)}
    store.save(str(target), "key", dict(arrays), {"extra": 1})
    whole = target.read_bytes()
    assert store.load(str(target), "key") is not None
    for cut in range(0, len(whole), 7):
        target.write_bytes(whole[:cut])
        assert store.load(str(target), "key") is None, cut


# == issue 21 row 7: never write what cannot be read back; warnings summarised ======================
def test_save_refuses_a_header_load_would_refuse(tmp_path: Path) -> None:
    """A header over the bound that load accepts is refused when saving (EFBIG), with
    nothing left in the folder: no index that every mount would rebuild."""
    target = tmp_path / "index" / "x.members"
    target.parent.mkdir()
    with pytest.raises(OSError) as err:
        store.save(str(target), "key", {"a": np.zeros(4, np.uint8)}, ["w" * 1000] * 20_000)
    assert err.value.errno == errno.EFBIG and "header" in str(err.value)
    assert os.listdir(target.parent) == []


@pytest.fixture
def bad_names_set(tmp_path: Path) -> Path:
    """One zip of 6,000 members whose 1,000-byte names (a single component) are skipped,
    and two good members. Unsummarised, their warnings make an 18 MB index header."""
    folder = tmp_path / "bad_names"
    folder.mkdir()
    bad = [Entry(f"{i:05d}".encode() + "é".encode() * 497 + b".jpg", b"x", flags=0x800) for i in range(6000)]
    good = [Entry(b"ok/a.txt", b"first\n"), Entry(b"ok/b.txt", b"second\n")]
    write_zip(folder / "names.zip", good + bad)
    return folder


def test_many_bad_names_are_a_few_lines_and_a_loadable_index(mount: MountFactory, bad_names_set: Path,
                                                             tmp_path: Path) -> None:
    """Thousands of skipped names: a handful of log lines with a count, and an index that
    the next mount maps instead of rebuilding."""
    folder = tmp_path / "index"
    live = mount(bad_names_set, index_dir=folder)
    live.expect_log("skipped|more members")
    assert_serves_members(live, {path: m for path, m in zip_members(bad_names_set).items() if path.startswith("ok/")})
    lines = warning_lines(live.log_text())
    assert len(lines) <= 30, f"{len(lines)} warning lines"
    assert any("5,990 more members" in line for line in lines), lines
    built = index_files(folder)
    again = mount(bad_names_set, index_dir=folder)
    again.expect_log("skipped|more members")
    assert index_files(folder) == built, "the index could not be read back, so it was rebuilt"


def test_index_command_summarises_bad_names(bad_names_set: Path, tmp_path: Path) -> None:
    """`bioscanfs index` prints the summary, not one line per member, and succeeds."""
    done = run_cli("index", bad_names_set, "--index-dir", tmp_path / "index")
    assert done.returncode == 0, done.stderr
    assert len(warning_lines(done.stderr)) <= 12, done.stderr
    assert_one_whole_index(tmp_path / "index", 1)


@pytest.mark.slow
def test_index_command_with_many_conflicts_maps_or_says_why(tmp_path: Path) -> None:
    """Two releases of one package side by side (80,000 paths whose content differs): the
    index either maps on the next run, or `bioscanfs index` fails with the warning it
    points at, the header size named, and leaves no file that every mount would rewrite."""
    folder, index_dir = tmp_path / "releases", tmp_path / "index"
    folder.mkdir()
    names = [f"bioscan5m/images/cropped_256/pretrain/{i % 100:02d}/{'P' * 90}{i:06d}.jpg".encode()
             for i in range(80_000)]
    for release in (b"1", b"2"):
        write_zip(folder / f"release{release.decode()}.zip", [Entry(name, release) for name in names])
    done = run_cli("index", folder, "--index-dir", index_dir, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode == 0:
        built = index_files(index_dir)
        assert run_cli("index", folder, "--index-dir", index_dir, timeout=300).returncode == 0
        assert index_files(index_dir) == built, "the index could not be read back, so it was rebuilt"
    else:
        assert any("cannot write the index" in line and "header" in line
                   for line in warning_lines(done.stderr)), done.stderr
        assert not list(index_dir.glob("*.tree")) and temporaries(index_dir) == []


# == issue 21 row 8: superseded indexes and leftover temporaries go ================================
def test_superseded_and_leftover_files_are_removed_after_the_grace(small_set: Path, tmp_path: Path) -> None:
    """Five touches write five new indexes; once older than the grace period, the old
    ones, a killed build's temporary and month-old files of other archive sets are
    removed, while fresh ones, other users' and other kinds of files are kept."""
    folder = tmp_path / "index"
    zips = zip_paths(small_set)
    assert run_cli("index", small_set, "--index-dir", folder).returncode == 0
    for _ in range(5):
        touch(zips[0])
        assert run_cli("index", small_set, "--index-dir", folder).returncode == 0
    assert len(index_files(folder)) > 3, "superseded files went before their grace period"
    for path in folder.iterdir():
        age(path, 2 * HOUR)
    # A killed build's temporary (old) and a live build's (fresh); a tree of another set
    # (month-old, and a recent one); another user's old file; the daemon log.
    (folder / ".tmp-killed").write_bytes(b"\0" * 4096)
    age(folder / ".tmp-killed", 2 * HOUR)
    (folder / ".tmp-writing").write_bytes(b"\0" * 4096)
    other_tree = sorted(folder.glob("*.tree"))[0]
    shutil.copy(other_tree, folder / "0123456789abcdef-0123456789abcdef.tree")
    age(folder / "0123456789abcdef-0123456789abcdef.tree", 31 * DAY)
    shutil.copy(other_tree, folder / "fedcba9876543210-0123456789abcdef.tree")
    age(folder / "fedcba9876543210-0123456789abcdef.tree", 2 * DAY)
    shutil.copy(other_tree, folder / "00000000000000aa-0123456789abcdef.members")
    os.chown(folder / "00000000000000aa-0123456789abcdef.members", NOBODY, NOBODY)
    age(folder / "00000000000000aa-0123456789abcdef.members", 31 * DAY)
    (folder / "bioscanfs.log").write_text("log\n")
    age(folder / "bioscanfs.log", 31 * DAY)
    shutil.copy(other_tree, folder / "00000000000000bb-0123456789abcdef.members")  # as version 4 wrote
    age(folder / "00000000000000bb-0123456789abcdef.members", 2 * HOUR)
    # Column files that no tree names: a killed build's (old) and a live build's (fresh).
    (folder / "0123456789abcdef-00000000000000aa.files.col").write_bytes(b"\0" * 64)
    age(folder / "0123456789abcdef-00000000000000aa.files.col", 2 * HOUR)
    (folder / "0123456789abcdef-00000000000000bb.files.col").write_bytes(b"\0" * 64)

    touch(zips[1])
    assert run_cli("index", small_set, "--index-dir", folder).returncode == 0
    left = set(os.listdir(folder))
    kept = {".tmp-writing", "fedcba9876543210-0123456789abcdef.tree",
            "00000000000000aa-0123456789abcdef.members", "bioscanfs.log"}
    assert kept <= left, left
    assert ".tmp-killed" not in left and "0123456789abcdef-0123456789abcdef.tree" not in left
    assert "00000000000000bb-0123456789abcdef.members" not in left, "a retired kind of file outlived the grace"
    ours = index_files(folder).keys() - kept
    assert len(ours) == 1 and sum(name.endswith(".tree") for name in ours) == 1, sorted(ours)
    for name in ours:
        assert_whole(folder / name)
    named = {spec[3] for tree in folder.glob("*.tree") for spec in store.read_header(str(tree))["arrays"].values()
             if len(spec) == 4}
    assert len(named) % 3 == 0 and (folder / "0123456789abcdef-00000000000000bb.files.col").exists()
    assert {p.name for p in folder.glob("*.col")} == named | {"0123456789abcdef-00000000000000bb.files.col"}


def test_files_in_use_are_kept_and_marked_used(small_set: Path, tmp_path: Path) -> None:
    """An index in use is never removed, however old: each run marks it used (its mtime)."""
    folder = tmp_path / "index"
    assert run_cli("index", small_set, "--index-dir", folder).returncode == 0
    built = set(index_files(folder))
    for path in folder.iterdir():
        age(path, 40 * DAY)
    assert run_cli("index", small_set, "--index-dir", folder).returncode == 0
    assert set(index_files(folder)) == built
    assert all(time.time() - (folder / name).stat().st_mtime < HOUR for name in built)


def test_live_mount_keeps_serving_after_its_index_is_removed(mount: MountFactory, small_set: Path,
                                                             tmp_path: Path) -> None:
    """A mapped index that a later build removes (superseded, past its grace) stays valid
    for the mount that mapped it: every path still lists and reads."""
    folder = tmp_path / "index"
    assert run_cli("index", small_set, "--index-dir", folder).returncode == 0
    live = mount(small_set, index_dir=folder)
    mapped = set(index_files(folder))
    for path in folder.iterdir():
        age(path, 2 * HOUR)
    for archive in zip_paths(small_set):
        touch(archive)
    assert run_cli("index", small_set, "--index-dir", folder).returncode == 0
    assert not mapped & set(index_files(folder)), "the mapped index was not removed"
    assert_serves_members(live, zip_members(small_set))
