"""System mounts (issue 19): ``mount -t fuse.bioscanfs``, an fstab line, plain ``umount``,
and the mount table's type and source.

mount(8) runs mount.fuse3, which runs ``bioscanfs SOURCE MOUNTPOINT -o OPTIONS`` through
/bin/sh with no PATH: these tests link this interpreter's console script into
/usr/local/bin (putting back whatever link was there; a lock keeps concurrent runs apart)
and run mount and umount with an empty environment, as root. systemd is not PID 1 here,
so the options of a systemd ``.mount`` unit are run through mount(8) from an fstab file
(``mount -T``), which is what systemd does with them, and through the mapping itself.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Iterator, List, NamedTuple, Sequence

import pytest
from conftest import (
    EXIT_TIMEOUT,
    MOUNT_TIMEOUT,
    MountFactory,
    assert_one_error_line,
    copy_archives,
    force_unmount,
    is_mounted,
    run_cli,
    zip_contents,
    zip_members,
)

from bioscanfs import mount_helper
from bioscanfs.cli import mount as mount_command

HELPER_LINK = Path("/usr/local/bin/bioscanfs")
_LOCK = Path(tempfile.gettempdir()) / "bioscanfs-test-system-mount.lock"
#: What every mount here must not log (the daemon logs to INDEX_DIR/bioscanfs.log).
_BAD_LOG_LINE = re.compile(r"Traceback|\b(WARNING|ERROR|CRITICAL)\b")


class TableEntry(NamedTuple):
    """One line of /proc/self/mounts."""

    source: str
    fstype: str
    options: List[str]


def table_entry(point: Path) -> TableEntry:
    """The mount table's line for ``point`` (octal escapes undone); fails if there is none."""
    def unescape(text: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)

    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target, fstype, options = line.split()[:4]
        if unescape(target) == str(point):
            return TableEntry(unescape(source), fstype, options.split(","))
    raise AssertionError(f"{point} is not in /proc/self/mounts")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory, make_fake: ModuleType) -> Path:
    """One imgtype and the metadata zip, stored and deflated members."""
    out = tmp_path_factory.mktemp("system_set")
    make_fake.make_set(out, images=40, deflate_fraction=0.5, seed=3, imgtypes=["cropped_256"])
    return out


@pytest.fixture(scope="module")
def helper_on_path() -> Iterator[None]:
    """This environment's ``bioscanfs`` script linked where mount.fuse3's shell finds it."""
    if os.geteuid() != 0:
        pytest.skip("mount -t and a plain umount of a FUSE filesystem need root")
    if not shutil.which("mount.fuse3", path="/usr/sbin:/sbin"):
        pytest.skip("no mount.fuse3 (Debian: apt install fuse3)")
    script = Path(sys.executable).parent / "bioscanfs"
    if not script.is_file() or not HELPER_LINK.parent.is_dir():
        pytest.skip(f"no console script {script}, or no {HELPER_LINK.parent}")
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if HELPER_LINK.exists() and not HELPER_LINK.is_symlink():
            pytest.skip(f"{HELPER_LINK} is an installed program: not replaced by a test")
        previous = os.readlink(HELPER_LINK) if HELPER_LINK.is_symlink() else None
        if previous is not None:
            HELPER_LINK.unlink()
        HELPER_LINK.symlink_to(script)
        try:
            yield
        finally:
            HELPER_LINK.unlink()
            if previous is not None:
                HELPER_LINK.symlink_to(previous)


def run_bare(*command: str) -> subprocess.CompletedProcess:
    """A command with an empty environment, as systemd or an init script runs mount(8)."""
    return subprocess.run(list(command), env={}, capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                          stdin=subprocess.DEVNULL, cwd="/")


def helper_pids(point: Path) -> List[int]:
    """Live processes started as ``bioscanfs ... POINT ...`` (the helper form)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if str(point).encode() in argv and any(a.endswith(b"/bioscanfs") for a in argv) and state not in "ZX":
            found.append(int(entry))
    return found


@contextlib.contextmanager
def system_mount(point: Path, log: Path, command: Sequence[str]) -> Iterator[None]:
    """Mount with ``command`` (mount(8), empty environment), one server; then
    ``umount POINT`` must unmount it, the server must exit and its log hold no problem."""
    done = run_bare(*command)
    try:
        assert done.returncode == 0 and is_mounted(point), f"{command}: {done.stdout}{done.stderr}"
        pids = helper_pids(point)
        assert len(pids) == 1, pids
        yield
        done = run_bare("/usr/bin/umount", str(point))
        assert done.returncode == 0 and not is_mounted(point), done.stderr
        deadline = time.monotonic() + EXIT_TIMEOUT
        while helper_pids(point):
            assert time.monotonic() < deadline, f"server still running {EXIT_TIMEOUT} s after umount"
            time.sleep(0.05)
        text = log.read_text(errors="replace") if log.exists() else ""
        assert not [line for line in text.splitlines() if _BAD_LOG_LINE.search(line)], text
    finally:
        force_unmount(point)
        for pid in helper_pids(point):
            os.kill(pid, 9)


def assert_reads_as_zipfile(point: Path, folder: Path) -> None:
    """A stored and a deflated member (and the metadata CSV) read back as zipfile reads them."""
    members = zip_members(folder)
    picks = {next(p for p, m in members.items() if m.info.compress_type == method)
             for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)}
    picks.add(next(p for p in members if p.endswith(".csv")))
    for path, data in zip_contents({p: members[p] for p in picks}).items():
        assert (point / path).read_bytes() == data, path


def test_mount_t_then_umount(small_set: Path, helper_on_path: None, engine: str, tmp_path: Path) -> None:
    """``mount -t fuse.bioscanfs SOURCE POINT -o ...`` serves the tree with the engine the
    options name; the table says fuse.bioscanfs from SOURCE, read-only; ``umount`` ends it."""
    point, index = tmp_path / "mnt", tmp_path / "index"
    point.mkdir()
    command = ["/usr/bin/mount", "-t", "fuse.bioscanfs", str(small_set), str(point),
               "-o", f"index_dir={index},engine={engine}"]
    with system_mount(point, index / "bioscanfs.log", command):
        entry = table_entry(point)
        assert (entry.source, entry.fstype) == (str(small_set), "fuse.bioscanfs")
        assert "ro" in entry.options
        assert_reads_as_zipfile(point, small_set)


#: An fstab line's options as an administrator writes them for a systemd automount: our
#: flags, FUSE options, and what only mount(8) and systemd read. ``users`` makes mount(8)
#: add nosuid,nodev,noexec.
FSTAB_OPTIONS = ("ro,allow_other,index_dir={index},log={log},engine={engine},cache_size=64M,skip_bad,"
                 "allow_incomplete,verbose,defaults,nofail,noauto,_netdev,users,comment=systemd.automount,"
                 "x-systemd.automount,x-systemd.idle-timeout=600,x-systemd.mount-timeout=30,"
                 "x-systemd.requires=network-online.target")


def test_fstab_line(small_set: Path, helper_on_path: None, engine: str, tmp_path: Path) -> None:
    """An fstab line with systemd's options mounts through ``mount -T FSTAB POINT``: the
    bookkeeping options are dropped, ours are applied (``verbose`` puts the INFO line in
    ``log``), the FUSE ones reach the kernel, and ``umount`` ends it."""
    point, index, log = tmp_path / "mnt", tmp_path / "index", tmp_path / "logs" / "mount.log"
    point.mkdir()
    options = FSTAB_OPTIONS.format(index=index, log=log, engine=engine)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a comment line\n{small_set}  {point}  fuse.bioscanfs  {options}  0  0\n")
    with system_mount(point, log, ["/usr/bin/mount", "-T", str(fstab), str(point)]):
        entry = table_entry(point)
        assert (entry.source, entry.fstype) == (str(small_set), "fuse.bioscanfs")
        assert {"ro", "noexec", "nosuid", "nodev", "allow_other"} <= set(entry.options), entry.options
        assert_reads_as_zipfile(point, small_set)
        assert "mounted " in log.read_text()
    assert list(index.glob("*.tree")), "index_dir= was not used"


#: A value for each ``bioscanfs mount`` flag that takes one ({file}: an existing file).
#: A new flag fails test_every_mount_flag_maps until it is given one here.
FLAG_SAMPLES = {"cache_size": "64M", "log": "/var/log/b.log", "engine": "python", "password_file": "{file}",
                "cache_dir": "/var/cache/ranges", "cache_max": "5G", "index_dir": "/var/cache/bioscanfs",
                "verbose": "2", "foreground": None, "single_threaded": None, "skip_bad": None,
                "allow_incomplete": None, "views": "order+species", "cache_archives": "no"}


def test_every_mount_flag_maps(tmp_path: Path) -> None:
    """Each ``bioscanfs mount`` flag given as ``-o key[=value]`` (``_`` or ``-``) sets what
    the flag sets on the command line; FUSE options pass on in order."""
    secret = tmp_path / "password"
    secret.write_text("x\n")
    flags = mount_helper.mount_flags(mount_command)
    assert set(flags) == set(FLAG_SAMPLES)
    positional = [str(tmp_path), str(tmp_path)]
    for key, value in FLAG_SAMPLES.items():
        value = value and value.format(file=secret)
        option = flags[key]
        name = max(option.opts, key=len)
        direct = [name] * int(value) if option.count else [name] + ([value] if value is not None else [])
        for spelling in (key, key.replace("_", "-")):
            item = spelling if value is None else f"{spelling}={value}"
            args = mount_helper.mount_arguments([*positional, "-o", f"allow_other,{item},uid=0"], mount_command)
            assert args[0] == "mount" and args[-2:] == positional, args
            helper = mount_command.make_context("mount", args[1:]).params
            expected = mount_command.make_context("mount", [*direct, "-o", "allow_other,uid=0", *positional]).params
            assert helper == expected, item


def test_bookkeeping_options_are_dropped() -> None:
    """What fstab, mount(8) and systemd add means nothing to FUSE: dropped; the ``no``
    forms narrow the mount: kept."""
    given = ["defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "group",
             "rw", "ro", "dev", "suid", "exec", "x-systemd.automount", "x-systemd.device-timeout=5",
             "x-mount.mkdir=0755", "x-gvfs-show", "comment=systemd.automount",
             "nodev", "nosuid", "noexec", "allow_other", "default_permissions"]
    assert mount_helper.sort_options(given, mount_command) == \
        ([], ["nodev", "nosuid", "noexec", "allow_other", "default_permissions"])


@pytest.mark.parametrize("args, mentions", [
    (["{set}", "{point}", "-o", "skip_bad=yes"], "skip_bad=yes: skip_bad takes no value"),
    (["{set}", "{point}", "-o", "index_dir"], "index_dir: needs a value"),
    (["{set}", "{point}", "-o", "verbose=lots"], "verbose=lots"),
    (["{set}", "{point}", "extra", "-o", "ro"], "expected SOURCE MOUNTPOINT"),
    (["mout", "{set}", "{point}"], "No such command 'mout'"),
])
def test_helper_call_errors(small_set: Path, mountpoint: Path, args: List[str], mentions: str) -> None:
    """A helper call it cannot take is one line naming the option, and no mount; a
    mistyped command without ``-o`` is still a mistyped command."""
    done = run_cli(*[a.format(set=small_set, point=mountpoint) for a in args])
    assert_one_error_line(done, mentions)


@pytest.mark.parametrize("sources, shown", [
    (["https://user:secret@data.example.org:8443/b5m/?X-Amz-Signature=abc#x"], "https://data.example.org:8443/b5m/"),
    (["s3://bucket/bioscan5m/"], "s3://bucket/bioscan5m/"),
    (["/data/a.zip", "/data/b.zip", "/data/c.zip"], "/data/a.zip +2"),
    (["/data/a,b\\c"], "/data/a\\,b\\\\c"),
])
def test_source_name(sources: List[str], shown: str) -> None:
    """No credential or signed query reaches the world-readable mount table; ``,`` and
    ``\\`` are escaped for libfuse's option parser."""
    assert mount_helper.source_name(sources) == shown


def test_table_source_is_the_folder(small_set: Path, mount: MountFactory, tmp_path: Path) -> None:
    """Mounted by the CLI too, the table names the source folder, even with a comma, a
    space and a backslash in its name (escaped for libfuse, unescaped by the kernel)."""
    folder = copy_archives(small_set, tmp_path / "set, one\\two")
    live = mount(folder)
    entry = table_entry(live.point)
    assert (entry.source, entry.fstype) == (str(folder), "fuse.bioscanfs")
    assert "ro" in entry.options

