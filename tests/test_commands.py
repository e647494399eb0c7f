"""Commands touch only their own and never print a traceback (issue 21, rows 9-13 and
the CLI part of row 7).

Every command runs as ``python -m bioscanfs`` in a subprocess against real causes: an
archive the kernel refuses to open (root's permission bypass dropped with setpriv), a
real open-file limit (RLIMIT_NOFILE of the child), a real tmpfs, a real busy FUSE mount,
/dev/full. Archives are written with tests/craft.py; expected members
come from zipfile.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Iterator, List

import pytest
from conftest import (
    MountFactory,
    assert_one_error_line,
    expected_tree,
    force_unmount,
    is_mounted,
    prebuild_index,
    run_cli,
    walk_mount,
    zip_members,
    zip_paths,
)
from craft import Entry, write_zip

#: Run as root, a command reads any file; without these capabilities the kernel checks
#: the permission bits for root as for anyone (capabilities(7)).
_NO_OVERRIDE = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])
needs_permission_checks = pytest.mark.skipif(bool(_NO_OVERRIDE) and shutil.which("setpriv") is None,
                                             reason="root without setpriv: permission bits are not enforced")
#: The open-file limit the child commands get, and enough archives to need more.
FILE_LIMIT = 160
MANY = 100


def small_zips(folder: Path, count: int) -> Path:
    """``count`` one-member archives a000.zip ... (honest, stored), in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_zip(folder / f"a{i:03d}.zip", [Entry(f"d/f{i:03d}.txt".encode(), f"member {i}\n".encode())])
    return folder


def stderr_lines(done: subprocess.CompletedProcess) -> List[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


# == Row 9: --skip-bad skips what cannot be opened ===================================================
@pytest.fixture
def one_unreadable(tmp_path: Path) -> Iterator[Path]:
    """Three archives, the middle one without read permission (mode 000)."""
    folder = small_zips(tmp_path / "zips", 3)
    (folder / "a001.zip").chmod(0)
    yield folder
    (folder / "a001.zip").chmod(0o644)


@needs_permission_checks
@pytest.mark.parametrize("command", ["info", "ls", "index"])
def test_unreadable_archive_refused_in_one_line(one_unreadable: Path, tmp_path: Path, command: str) -> None:
    done = run_cli(command, one_unreadable, "--index-dir", tmp_path / "index", prefix=_NO_OVERRIDE)
    assert_one_error_line(done, f"{one_unreadable / 'a001.zip'}: Permission denied")


@needs_permission_checks
@pytest.mark.parametrize("command", ["info", "ls", "index"])
def test_skip_bad_skips_an_unreadable_archive(one_unreadable: Path, tmp_path: Path, command: str) -> None:
    """One warning naming the archive and why; the other two are used."""
    args = ["--json"] if command == "info" else ["d"] if command == "ls" else []
    done = run_cli(command, one_unreadable, *args, "--index-dir", tmp_path / "index", "--skip-bad",
               prefix=_NO_OVERRIDE)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    warnings = [line for line in stderr_lines(done) if not line.startswith("indexing")]
    assert len(warnings) == 1 and f"skipping {one_unreadable / 'a001.zip'}: Permission denied" in warnings[0], \
        done.stderr
    if command == "info":
        assert json.loads(done.stdout)["totals"]["archives"] == 2
    elif command == "ls":
        assert done.stdout.split() == ["f000.txt", "f002.txt"]
    else:
        assert "indexed 2 files in 2 folders from 2 archives" in done.stdout


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More archives than FILE_LIMIT descriptors can hold open."""
    return small_zips(tmp_path_factory.mktemp("many"), MANY)


@pytest.mark.parametrize("command", ["info", "ls", "cat", "index", "verify", "mount"])
def test_too_many_archives_for_the_limit_is_one_line(many: Path, tmp_path: Path, mountpoint: Path,
                                                    command: str) -> None:
    """One line naming the limit and both ways out; no traceback, nothing mounted."""
    args = {"cat": ["d/f000.txt"], "mount": [mountpoint]}.get(command, [])
    with file_limit(FILE_LIMIT):
        done = run_cli(command, many, *args, "--index-dir", tmp_path / "index")
    assert_one_error_line(done, f"{MANY} archives need")
    assert f"ulimit -n {FILE_LIMIT}" in done.stderr and "--skip-bad" in done.stderr, done.stderr


@contextlib.contextmanager
def file_limit(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE lowered (inherited by the commands it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip(f"the hard open-file limit is {hard}")
    assert len(os.listdir("/proc/self/fd")) < limit // 2, "the test process holds too many files"
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_skip_bad_mounts_the_archives_the_limit_allows(mount: MountFactory, many: Path) -> None:
    """One warning naming the archives left out; the others are served, and read."""
    with file_limit(FILE_LIMIT):
        live = mount(many, args=["--skip-bad"])
    live.expect_log(r"WARNING skipping \d+ archives")
    warnings = [line for line in live.log_text().splitlines() if "WARNING" in line]
    match = re.search(rf"skipping (\d+) archives, {re.escape(str(many))}/(a\d+\.zip) to {re.escape(str(many))}"
                      rf"/a{MANY - 1:03d}\.zip: .*ulimit -n {FILE_LIMIT}", warnings[0] if warnings else "")
    assert len(warnings) == 1 and match, live.log_text()
    kept = [p for p in zip_paths(many) if p.name < match[2]]
    assert 0 < len(kept) == MANY - int(match[1])
    members = {path: m for path, m in zip_members(many).items() if m.archive in kept}
    assert walk_mount(live.point) == expected_tree(members)
    for path, member in members.items():
        assert live.path(path).read_bytes() == member.read(), path


@pytest.fixture(scope="module")
def past_select(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More archives than select() can watch descriptors (FD_SETSIZE is 1024), indexed
    once for both engines' mounts (the subject is the daemon's pipe, not the build)."""
    folder = small_zips(tmp_path_factory.mktemp("past_select"), 1100)
    with file_limit(4096):
        prebuild_index([folder], tmp_path_factory.mktemp("past_select_index"))
    return folder


def test_daemon_mount_of_more_archives_than_select_watches(mount: MountFactory, past_select: Path) -> None:
    """The daemon's readiness pipe comes after 1,100 archive descriptors: waiting on it
    must not fail (select() raised ValueError, with the mount left up)."""
    with file_limit(4096):
        live = mount(past_select, daemon=True)
    assert len(os.listdir(live.path("d"))) == 1100
    assert live.path("d/f1099.txt").read_bytes() == b"member 1099\n"


# == Rows 10 and 11: umount only our own, through links too ============================================
@contextlib.contextmanager
def tmpfs(point: Path) -> Iterator[Path]:
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "bioscanfs-test", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_umount_refuses_a_tmpfs(tmp_path: Path, busy: bool) -> None:
    with tmpfs(tmp_path / "tmpfs") as point, contextlib.ExitStack() as stack:
        if busy:
            stack.enter_context(open(point / "open-file", "w"))
        done = run_cli("umount", point)
        assert is_mounted(point), "the tmpfs was unmounted"
        assert_one_error_line(done, f"{point}: not a bioscanfs mount (tmpfs")
        for lazy in run_cli("umount", "--lazy", point), run_cli("umount", tmp_path / "tmpfs" / ".." / "tmpfs"):
            assert_one_error_line(lazy, "not a bioscanfs mount")
        assert is_mounted(point)


def test_umount_of_a_busy_mount_needs_lazy(mount: MountFactory, tmp_path: Path) -> None:
    """Busy: refused in one line that says what to do, still serving; --lazy detaches it,
    and the server ends once the last file is closed."""
    small_zips(tmp_path / "zips", 2)
    live = mount(tmp_path / "zips")
    with open(live.path("d/f000.txt"), "rb") as held:
        done = run_cli("umount", live.point)
        assert_one_error_line(done, "busy")
        assert "--lazy" in done.stderr and is_mounted(live.point)
        assert live.path("d/f001.txt").read_bytes() == b"member 1\n"
        done = run_cli("umount", "--lazy", live.point)
        assert done.returncode == 0 and not is_mounted(live.point), done.stderr
        assert held.read() == b"member 0\n"


def test_mount_point_through_a_symlink(mount: MountFactory, tmp_path: Path) -> None:
    """Mounting again through a link (or the folder) is refused, not stacked; umount LINK works."""
    zips = small_zips(tmp_path / "zips", 2)
    live = mount(zips, daemon=True)
    link = tmp_path / "link"
    link.symlink_to(live.point)
    for again in (link, live.point):
        assert_one_error_line(run_cli("mount", zips, again, "--index-dir", live.index_dir),
                              f"{live.point}: already a mount point")
    table = Path("/proc/self/mountinfo").read_text().splitlines()
    assert sum(" " + str(live.point) + " " in line for line in table) == 1
    done = run_cli("umount", link)
    assert (done.returncode, done.stdout.strip()) == (0, f"unmounted {live.point}"), done.stderr
    assert not is_mounted(live.point)


def test_mount_through_a_symlink_lands_on_its_folder(tmp_path: Path, engine: str) -> None:
    zips = small_zips(tmp_path / "zips", 1)
    point = tmp_path / "mnt"
    point.mkdir()
    link = tmp_path / "link"
    link.symlink_to(point)
    try:
        done = run_cli("mount", zips, link, "--engine", engine, "--index-dir", tmp_path / "index")
        assert done.returncode == 0 and f"at {point}" in done.stdout, done.stderr
        assert is_mounted(point) and (link / "d" / "f000.txt").read_bytes() == b"member 0\n"
        assert_one_error_line(run_cli("mount", zips, link, "--index-dir", tmp_path / "index"), "already a mount point")
        assert run_cli("umount", link).returncode == 0 and not is_mounted(point)
    finally:
        force_unmount(point)


# == Row 12: one line, never a traceback ===============================================================
@pytest.mark.parametrize("value", ["inf", "nan", "-5M", "1e999", "12X"])
@pytest.mark.parametrize("option", ["--cache-size", "--cache-max"])
def test_bad_sizes_are_one_line(tmp_path: Path, mountpoint: Path, option: str, value: str) -> None:
    zips = small_zips(tmp_path / "zips", 1)
    done = run_cli("mount", zips, mountpoint, f"{option}={value}", "--index-dir", tmp_path / "index")
    assert_one_error_line(done, option)
    assert not is_mounted(mountpoint)


@pytest.mark.parametrize("command", [["cat", "d/f000.txt"], ["ls", "d"], ["info"]], ids=lambda c: c[0])
def test_output_to_a_full_device_is_one_line(tmp_path: Path, command: List[str]) -> None:
    zips = small_zips(tmp_path / "zips", 1)
    with open("/dev/full", "wb") as full:
        done = run_cli(command[0], zips, *command[1:], "--index-dir", tmp_path / "index", stdout=full)
    assert_one_error_line(done, "cannot write to standard output: No space left on device")


CSV_CASES = {  # id -> (stdin, what the one line names)
    "unknown-split": (b"processid,split\nAACTA1040-20,pretrain\nAACTA161-20,nosuch\n",
                      "AACTA161-20: unknown split 'nosuch'"),
    "short-row": (b"split,processid\nval,AACTA161-20\nval\n", "stdin: line 3: no processid"),
    "empty-processid": (b"processid,split\n,val\n", "stdin: line 2: no processid"),
    "not-utf8": (b"processid,split\nAACTA161-20,val\nAAC\xff\xfe,val\n", "stdin: line 3: not UTF-8 text"),
    "not-utf8-plain": (b"AACTA161-20\n\xff\n", "stdin: line 2: not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_path_csv_bad_input_is_one_line(case: str) -> None:
    stdin, mentions = CSV_CASES[case]
    assert_one_error_line(run_cli("path", "--csv", "--split", "val", stdin=stdin), mentions)


def test_path_csv_header_with_bom_and_crlf() -> None:
    """A spreadsheet's export: byte order mark, CRLF, the split column first."""
    done = run_cli("path", "--csv", stdin=b"\xef\xbb\xbfsplit,processid\r\nval,AACTA161-20\r\n\r\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "bioscan5m/images/cropped_256/val/AACTA161-20.jpg\n", "")


@pytest.mark.parametrize("cause", ["not-a-folder", "read-only"])
def test_index_names_an_unwritable_folder(tmp_path: Path, cause: str) -> None:
    """Before any archive is read: one line with the folder and the reason."""
    zips = small_zips(tmp_path / "zips", 2)
    if cause == "not-a-folder":
        (tmp_path / "file").write_text("")
        folder, reason, prefix = tmp_path / "file" / "index", "Not a directory", []
    else:
        if _NO_OVERRIDE and shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: permission bits are not enforced")
        (tmp_path / "ro").mkdir(mode=0o555)
        folder, reason, prefix = tmp_path / "ro" / "index", "Permission denied", _NO_OVERRIDE
    done = run_cli("index", zips, "--index-dir", folder, prefix=prefix)
    assert_one_error_line(done, f"{folder}: cannot write the index there ({reason})")


# == Row 13: a log that writes any name ===============================================================
def test_read_error_on_a_non_utf8_name_is_one_log_line(mount: MountFactory, tmp_path: Path) -> None:
    """Daemon mode logs to a file: a failed read of a member named in invalid UTF-8 gives
    one ERROR line naming archive and member (escaped), not '--- Logging error ---'."""
    data = b"payload " * 100
    (tmp_path / "zips").mkdir()
    archive = write_zip(tmp_path / "zips" / "a.zip", [
        Entry(b"d/caf\xe9-\xff.bin", data, flags=0x800, crc=zlib.crc32(data) ^ 1),  # UTF-8 flag, not UTF-8
        Entry(b"d/ok.txt", b"fine\n")])
    live = mount(tmp_path / "zips", daemon=True)
    live.expect_log(r"ERROR cannot read d/caf\\udce9-\\udcff\.bin: ")
    # O_DIRECT: one read request (through the page cache, the kernel retries a failed read).
    fd = os.open(live.point / os.fsdecode(b"d/caf\xe9-\xff.bin"), os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as failed:
            os.read(fd, 65536)
    finally:
        os.close(fd)
    assert failed.value.errno == errno.EIO
    lines = live.log_text().splitlines()
    assert len(lines) == 1 and f"{archive}: d/caf\\udce9-\\udcff.bin: CRC" in lines[0], live.log_text()
    assert live.path("d/ok.txt").read_bytes() == b"fine\n"
