"""Shared test machinery: generated archive sets, the one mount helper, zipfile references.

Every expected value comes from CPython's zipfile (an independent reader); every
archive comes from the generators in scripts/ or from zipfile itself, and corrupt
cases edit bytes of such an archive. Mounts are real FUSE mounts of the CLI.
"""
from __future__ import annotations

import calendar
import contextlib
import errno
import importlib.util
import os
import re
import select
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Callable, Dict, Iterable, Iterator, List, Optional, Pattern, Sequence, Set, Tuple, Union

import click.testing
import pytest
import zygote

from bioscanfs import Collection, store
from bioscanfs.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
#: Liveness bounds only (a hung mount must not hang the suite); never speed checks.
MOUNT_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0
#: The longest sleep of a wait for a mount or a process (between checks of the clock).
_TICK = 0.02
#: A server or CLI run: forked by tests/zygote.py, or a real interpreter.
Process = Union[zygote.ForkedProcess, subprocess.Popen]

#: Log lines that fail a mount test unless the test declared them with Mount.expect_log.
_PROBLEM_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^warning:|^Error|\w+Warning:|Exception")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # APPNOTE 4.3.7: signature ... name and extra lengths
#: APPNOTE 4.3.7 local file header / 4.3.12 central directory header: (offset, format) of
#: the fields tests edit in place.
LOCAL_FIELDS = {"method": (8, "<H"), "crc32": (14, "<I"), "compressed_size": (18, "<I"),
                "size": (22, "<I"), "name_length": (26, "<H")}
CENTRAL_FIELDS = {"method": (10, "<H"), "crc32": (16, "<I"), "compressed_size": (20, "<I"),
                  "size": (24, "<I"), "name_length": (28, "<H"), "header_offset": (42, "<I")}
_CENTRAL_LENGTHS = struct.Struct("<4s24xHHH")  # signature ... name, extra, comment lengths

# Hypothesis caches in ./.hypothesis unless told otherwise: keep the repository clean.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "bioscanfs-tests-hypothesis"))


# -- scripts/ generators -----------------------------------------------------------------
def load_script(name: str) -> ModuleType:
    """Import scripts/NAME.py by path: the fixture writers are scripts, not a package."""
    spec = importlib.util.spec_from_file_location(f"bioscan_scripts_{name}", REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def make_fake() -> ModuleType:
    """scripts/make_fake_bioscan.py, the writer of small realistic package sets."""
    return load_script("make_fake_bioscan")


@pytest.fixture(scope="session")
def bench_scale() -> ModuleType:
    """scripts/bench_scale.py, the fast bulk (ZIP64) stored-zip writer."""
    return load_script("bench_scale")


@pytest.fixture(scope="session")
def fake_set(tmp_path_factory: pytest.TempPathFactory, make_fake: ModuleType) -> Path:
    """A folder of every package form (all four imgtypes + metadata), 40% deflated members.

    Shared by the whole session: tests must copy archives before editing them.
    """
    out = tmp_path_factory.mktemp("fake_set")
    make_fake.make_set(out, images=300, deflate_fraction=0.4, seed=0)
    prebuild_index([out], tmp_path_factory.mktemp("fake_set_index"))
    return out


#: Index folders built once per session, by the sources they index: a mount of exactly
#: those sources with no index folder of its own starts from a copy, and maps the tree
#: instead of building it again (0.75 s of the fake set's 1 s mount here; most tests of a
#: session mount it). Options that change the tree (--skip-bad, --views) still build,
#: beside the copy; tests of building give an index folder or edit a copy of the archives.
_PREBUILT: Dict[Tuple[Path, ...], Path] = {}


def prebuild_index(sources: Sequence[Path], index_dir: Path, views: Sequence[str] = ()) -> None:
    """Build the index of ``sources`` that a test mount with these ``views`` makes (the
    default: ``--views none``) in ``index_dir``, and offer copies of it to later mounts of
    the same sources. Called again with other views, the folder holds one tree for each."""
    Collection(*map(str, sources), index_dir=str(index_dir), views=tuple(views)).close()
    _PREBUILT[tuple(sources)] = index_dir


def fresh_index(sources: Sequence[Path], index_dir: Path) -> Path:
    """``index_dir``, new, holding a copy of the prebuilt index of ``sources`` if there is
    one (for CLI runs whose subject is not the build; see ``_PREBUILT``)."""
    if tuple(sources) in _PREBUILT:
        shutil.copytree(_PREBUILT[tuple(sources)], index_dir)
    return index_dir


# -- zipfile as the reference --------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    """One member as zipfile sees it."""

    archive: Path
    info: zipfile.ZipInfo

    @property
    def mtime(self) -> int:
        """The entry's DOS date and time read as UTC, as the mount must report it."""
        return calendar.timegm(self.info.date_time + (0, 0, 0))

    @property
    def deflated(self) -> bool:
        return self.info.compress_type == zipfile.ZIP_DEFLATED

    def read(self) -> bytes:
        with zipfile.ZipFile(self.archive) as zf:
            return zf.read(self.info)


def zip_paths(folder: Path) -> List[Path]:
    """The .zip files of a folder in name order (the order bioscanfs gives precedence)."""
    return sorted(p for p in folder.iterdir() if p.suffix == ".zip" and p.is_file())


def zip_members(folder: Path) -> Dict[str, Member]:
    """Every file member of every zip in ``folder``, by path; the first archive wins."""
    members: Dict[str, Member] = {}
    for archive in zip_paths(folder):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    members.setdefault(info.filename, Member(archive, info))
    return members


def zip_contents(members: Dict[str, Member]) -> Dict[str, bytes]:
    """The bytes of every member, opening each archive once."""
    out: Dict[str, bytes] = {}
    by_archive: Dict[Path, List[str]] = {}
    for path, member in members.items():
        by_archive.setdefault(member.archive, []).append(path)
    for archive, paths in by_archive.items():
        with zipfile.ZipFile(archive) as zf:
            for path in paths:
                out[path] = zf.read(members[path].info)
    return out


def expected_tree(paths: Iterable[str]) -> Dict[str, Set[str]]:
    """Directory -> the names it holds, derived from member paths (no directory entries)."""
    tree: Dict[str, Set[str]] = {"": set()}
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth - 1])
            tree.setdefault(parent, set()).add(parts[depth - 1])
            if depth < len(parts):
                tree.setdefault("/".join(parts[:depth]), set())
    return tree


def listing(tree: Dict[str, Set[str]], folder: str) -> List[str]:
    """A folder's names as bioscanfs lists them (``ls``, Collection.listdir): subdirectories
    first, then files, each sorted."""
    join = (lambda name: f"{folder}/{name}") if folder else (lambda name: name)
    names = tree[folder]
    return sorted(n for n in names if join(n) in tree) + sorted(n for n in names if join(n) not in tree)


def largest_image(members: Dict[str, "Member"], deflated: bool) -> str:
    """The path of the largest image member stored (or deflated): deterministic, and
    several pages long in the generated sets."""
    return max((m.info.file_size, p) for p, m in members.items()
               if p.startswith("bioscan5m/images/") and m.deflated == deflated)[1]


def walk_mount(root: Path) -> Dict[str, Set[str]]:
    """Directory -> names, as the kernel lists them (os.listdir, os.lstat)."""
    tree: Dict[str, Set[str]] = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        names = set(os.listdir(root / rel if rel else root))
        tree[rel] = names
        for name in names:
            child = f"{rel}/{name}" if rel else name
            if stat.S_ISDIR(os.lstat(root / child).st_mode):
                pending.append(child)
    return tree


def data_offset(archive: Path, info: zipfile.ZipInfo) -> int:
    """Where a member's data starts: after its local header, name and local extra field."""
    with open(archive, "rb") as f:
        f.seek(info.header_offset)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    assert signature == b"PK\x03\x04", f"{archive}: no local header at {info.header_offset}"
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def write_at(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    """Corrupt one byte of a file in place."""
    with open(path, "rb") as f:
        f.seek(offset)
        byte = f.read(1)
    write_at(path, offset, bytes([byte[0] ^ mask]))


def _central_offsets(archive: Path) -> Dict[str, int]:
    """Where each member's central directory header starts, by name."""
    with zipfile.ZipFile(archive) as zf:
        pos, names = zf.start_dir, [info.orig_filename for info in zf.infolist()]
    data = archive.read_bytes()
    out = {}
    for name in names:
        signature, n, m, k = _CENTRAL_LENGTHS.unpack_from(data, pos)
        assert signature == b"PK\x01\x02"
        out[name] = pos
        pos += 46 + n + m + k
    return out


def edit_headers(archive: Path, name: str, local: bool = True, central: bool = True, **values: int) -> None:
    """Set header fields of one member in place, in its local and/or central header."""
    with zipfile.ZipFile(archive) as zf:
        local_at = zf.getinfo(name).header_offset
    central_at = _central_offsets(archive)[name]
    with open(archive, "r+b") as f:
        for field_name, value in values.items():
            places = ([(local_at, LOCAL_FIELDS)] if local and field_name in LOCAL_FIELDS else []) + \
                     ([(central_at, CENTRAL_FIELDS)] if central else [])
            for base, fields in places:
                at, fmt = fields[field_name]
                f.seek(base + at)
                f.write(struct.pack(fmt, value))


def replace_name_bytes(archive: Path, old: bytes, new: bytes) -> None:
    """Rewrite a member name in place in its local and central headers (same length).

    zipfile cannot write some names (CP437 bytes, invalid UTF-8 with the UTF-8 flag,
    NUL): write a placeholder, then edit the archive's bytes.
    """
    assert len(old) == len(new)
    data = archive.read_bytes()
    assert data.count(old) == 2, f"{old!r} must occur once per header, found {data.count(old)}"
    archive.write_bytes(data.replace(old, new))


def copy_archives(src: Path, dst: Path, names: Optional[Sequence[str]] = None) -> Path:
    """Copy some (default: all) zips of ``src`` into a new folder ``dst``, which it returns."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in zip_paths(src):
        if names is None or path.name in names:
            shutil.copy2(path, dst / path.name)
    return dst


# -- the CLI and the mount table -----------------------------------------------------------
def run_cli(*args: object, timeout: float = MOUNT_TIMEOUT, stdin: Union[str, bytes, None] = None,
            env: Optional[Dict[str, str]] = None, binary: bool = False, prefix: Sequence[str] = (),
            stdout: Union[int, IO[bytes]] = subprocess.PIPE) -> subprocess.CompletedProcess:
    """Run ``python -m bioscanfs ARGS`` (after ``prefix``, e.g. setpriv) and capture its
    output: text, undecodable bytes replaced so that a wrong byte cannot raise here, or
    bytes with ``binary`` (what `cat` writes). ``stdin`` is fed to the command (nothing by
    default); ``env`` replaces the environment (a test's own XDG_CACHE_HOME); ``stdout``
    may be a file to write to instead (/dev/full). Forked by tests/zygote.py, unless
    ``prefix`` or ``env`` asks for a new interpreter."""
    if prefix:
        feed = {"stdin": subprocess.DEVNULL} if stdin is None else {
            "input": stdin.encode() if isinstance(stdin, str) else stdin}
        done = subprocess.run([*prefix, PYTHON, "-m", "bioscanfs", *map(str, args)], stdout=stdout,
                              stderr=subprocess.PIPE, timeout=timeout, env=env, **feed)
    else:
        done = _run_forked(args, timeout, stdin.encode() if isinstance(stdin, str) else stdin, env, stdout)
    if binary:
        return done
    return subprocess.CompletedProcess(done.args, done.returncode, (done.stdout or b"").decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))


def _run_forked(args: Sequence[object], timeout: float, feed: Optional[bytes], env: Optional[Dict[str, str]],
                stdout: Union[int, IO[bytes]] = subprocess.PIPE) -> subprocess.CompletedProcess:
    """``subprocess.run`` of ``python -m bioscanfs ARGS`` through zygote.spawn, its output
    captured in files (a child of the zygote cannot write to our pipes' other ends unread)."""
    with tempfile.TemporaryFile() as given, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if feed is not None:
            given.write(feed)
            given.seek(0)
        proc = zygote.spawn(args, stdin=subprocess.DEVNULL if feed is None else given,
                            stdout=out if stdout == subprocess.PIPE else stdout, stderr=err, env=env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, code, out.read() if stdout == subprocess.PIPE else None,
                                           err.read())


def _unescape(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field_text)


def mount_table() -> str:
    with open("/proc/self/mounts") as f:
        return f.read()


def is_mounted(point: Path) -> bool:
    """True for live and dead (ENOTCONN) mounts alike, unlike os.path.ismount."""
    target = str(point)
    return any(len(fields) > 1 and _unescape(fields[1]) == target
               for fields in (line.split() for line in mount_table().splitlines()))


def force_unmount(point: Path) -> None:
    """Last-resort cleanup: whatever state the mount is in, it is gone afterwards."""
    for command in (["fusermount3", "-u", str(point)], ["fusermount", "-u", str(point)],
                    ["umount", "-l", str(point)]):
        if not is_mounted(point):
            return
        subprocess.run(command, capture_output=True)


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def server_pids(point: Path) -> List[int]:
    """Live processes whose command line is a bioscanfs mount at ``point``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"bioscanfs" in argv and b"mount" in argv and str(point).encode() in argv and _alive(int(entry)):
            pids.append(int(entry))
    return pids


def assert_serves_members(live: "Mount", members: Dict[str, Member]) -> None:
    """The mount shows exactly the members' tree, and every member reads back as zipfile reads it."""
    assert walk_mount(live.point) == expected_tree(members)
    for path, data in zip_contents(members).items():
        assert live.path(path).read_bytes() == data, path


def rss(pid: int, field_name: str = "VmRSS") -> int:
    """Resident set size of a process in bytes: now (VmRSS) or its peak so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field_name} for {pid}")


def touch(archive: Path) -> None:
    """The archive's mtime moved on by a second, its bytes unchanged."""
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def index_files(index_dir: Path) -> Dict[str, Tuple[int, int]]:
    """Index file name -> (inode, mtime): any rewrite or new file shows up as a change."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in index_dir.iterdir()
            if p.suffix in store.SUFFIXES}


def read_windows(size: int) -> List[Tuple[int, int]]:
    """(offset, length) pairs around page and kernel read-size boundaries and the end of a
    ``size``-byte file, past it included."""
    offsets = {0, 1, 4095, 4096, 4097, size // 3, 131071, 131072, 131073, size - 4097,
               size - 1, size, size + 1, size + 100_000}
    lengths = {0, 1, 2, 4095, 4096, 4097, 65536, 131072, 131073, 300_000, size}
    return sorted((o, n) for o in offsets for n in lengths if o >= 0)


def assert_preads(path: Path, data: bytes, windows: Sequence[Tuple[int, int]], flags: int = 0) -> None:
    """os.pread of each window through one descriptor (opened with ``flags``, e.g. O_DIRECT)
    equals the slice of ``data``."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        for offset, length in windows:
            assert os.pread(fd, length, offset) == data[offset:offset + length], (path, offset, length)
    finally:
        os.close(fd)


def read_direct(path: Path, chunk: int = 1 << 20) -> bytes:
    """A whole file read with O_DIRECT: every byte comes from the daemon, not the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out, offset = [], 0
        while True:
            got = os.pread(fd, chunk, offset)
            if not got:
                return b"".join(out)
            out.append(got)
            offset += len(got)
    finally:
        os.close(fd)


def errno_of(call: Callable[[], object]) -> int:
    """The errno an OSError carries, or 0 when the call succeeds."""
    try:
        call()
    except OSError as err:
        return err.errno
    return 0


def assert_eio(read: Callable[[], object], what: object) -> None:
    """``read()`` fails with EIO: no bytes, and no other error (``what`` names the case)."""
    with pytest.raises(OSError) as err:
        read()
    assert err.value.errno == errno.EIO, (what, err.value)


def assert_one_error_line(done: subprocess.CompletedProcess, mentions: str) -> None:
    """A user error: non-zero exit, no traceback, one 'Error:' line that names the problem.

    click's usage lines ('Usage: ...', 'Try ...') around a usage error are not counted.
    """
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in done.stderr.splitlines()
             if line.strip() and not line.startswith(("Usage:", "Try '"))]
    assert len(lines) == 1, output
    assert lines[0].startswith("Error:") and mentions in lines[0], output


# -- the one mount helper -------------------------------------------------------------------
@dataclass
class Mount:
    """A live bioscanfs mount and what its teardown checks."""

    point: Path
    log: Path
    index_dir: Path
    proc: Optional[Process]   #: the foreground server; None in daemon mode
    pid: int
    expected_exit: int = 0             #: the foreground server's exit code at teardown
    allowed: List[Pattern[str]] = field(default_factory=list)

    def expect_log(self, pattern: str) -> None:
        """Declare log lines this test provokes on purpose (a regex searched in each line)."""
        self.allowed.append(re.compile(pattern))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def unexpected_log_lines(self) -> List[str]:
        return [line for line in self.log_text().splitlines()
                if "Traceback" in line
                or (_PROBLEM_LINE.search(line) and not any(p.search(line) for p in self.allowed))]

    def path(self, member: str) -> Path:
        return self.point / member


def _start(sources: Sequence[Path], workdir: Path, args: Sequence[str], index_dir: Optional[Path],
           daemon: bool, engine: str) -> Mount:
    point = workdir / "mnt"
    point.mkdir(parents=True)
    index_dir = index_dir or fresh_index(sources, workdir / "index")
    # Views (tests/test_views.py) only where a test asks for them: the other tests check
    # the archives' own tree, which views/ would add to.
    views = [] if any(str(arg).startswith("--views") for arg in args) else ["--views", "none"]
    command = ["mount", *map(str, sources), str(point), "--index-dir", str(index_dir), "--engine", engine,
               *views, *map(str, args)]
    if daemon:
        done = run_cli(*command)
        mount = Mount(point, index_dir / "bioscanfs.log", index_dir, None, 0)
        # The contract: the command returns 0 only once the tree is there.
        if done.returncode != 0 or not is_mounted(point):
            _cleanup(mount)
            pytest.fail(f"daemon mount returned {done.returncode}, mounted={is_mounted(point)}\n"
                        f"stdout: {done.stdout}\nstderr: {done.stderr}\nlog: {mount.log_text()}")
        pids = server_pids(point)
        if len(pids) != 1:
            _cleanup(mount)
            pytest.fail(f"expected one server process for {point}, found {pids}")
        mount.pid = pids[0]
        return mount
    log = workdir / "mount.log"
    with _mount_table_changes() as changed:
        with open(log, "wb") as out:
            proc = zygote.spawn(command + ["-f"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        mount = Mount(point, log, index_dir, proc, proc.pid)
        _wait_mounted(mount, proc, changed)
    return mount


@contextlib.contextmanager
def _mount_table_changes() -> Iterator[Callable[[], object]]:
    """A wait that returns when the mount table changes, or after _TICK at most. The kernel
    flags /proc/self/mountinfo (POLLPRI) at each mount and unmount after it is opened, so a
    test waiting for its mount wakes as it appears, not on the next tick of a fixed sleep."""
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        yield lambda: poller.poll(_TICK * 1000)
    finally:
        os.close(fd)


def _wait_mounted(mount: Mount, proc: Process, changed: Callable[[], object]) -> None:
    """Until the foreground server's mount is in the table; fails the test (after cleaning
    up) if the server exits first or MOUNT_TIMEOUT passes."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(mount.point):
        if proc.poll() is not None:
            _cleanup(mount)
            pytest.fail(f"mount exited with {proc.returncode} before mounting:\n{mount.log_text()}")
        if time.monotonic() > deadline:
            _cleanup(mount)
            pytest.fail(f"{mount.point} not mounted after {MOUNT_TIMEOUT} s\n--- log:\n{mount.log_text()}"
                        f"\n--- mount table:\n{mount_table()}")
        changed()


def _cleanup(mount: Mount) -> None:
    """Unmount and stop the server whatever happened; checks nothing."""
    force_unmount(mount.point)
    if mount.proc is not None and mount.proc.poll() is None:
        mount.proc.kill()
        mount.proc.wait(timeout=EXIT_TIMEOUT)   # liveness: see test_umount_clears_a_stale_mount
    elif mount.proc is None and mount.pid and _alive(mount.pid):
        os.kill(mount.pid, 9)


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_TICK)
    return True


def umount_in_process(point: Path) -> click.testing.Result:
    """`bioscanfs umount POINT`, the command's own code run in this process: every mount's
    teardown goes through it, and a new interpreter per teardown (numpy and all, ~0.6 s of
    CPU) would cost more than the rest of most tests. Tests of the command as users start
    it (exit code, output, a busy or stale mount) run it with run_cli."""
    return click.testing.CliRunner().invoke(cli_main, ["umount", str(point)])


def _stop(mount: Mount) -> List[str]:
    """Unmount through the CLI; the problems found (bad exit, leftover mount, bad log lines)."""
    problems: List[str] = []
    try:
        if is_mounted(mount.point):
            done = umount_in_process(mount.point)
            if done.exit_code != 0 or is_mounted(mount.point):
                problems.append(f"bioscanfs umount returned {done.exit_code}: {done.output.strip()} "
                                f"{done.exception!r}")
        if mount.proc is not None:
            try:
                code = mount.proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"server did not exit within {EXIT_TIMEOUT} s of the unmount")
            else:
                if code != mount.expected_exit:
                    problems.append(f"server exited with {code}, expected {mount.expected_exit}")
        elif not _wait_gone(mount.pid):
            problems.append(f"daemon {mount.pid} did not exit within {EXIT_TIMEOUT} s of the unmount")
    finally:
        _cleanup(mount)
    problems += [f"unexpected log line: {line}" for line in mount.unexpected_log_lines()]
    return problems


@contextlib.contextmanager
def mounted(sources: Sequence[Path], workdir: Path, args: Sequence[str] = (),
            index_dir: Optional[Path] = None, daemon: bool = False, *, engine: str) -> Iterator[Mount]:
    """Mount ``sources`` with the CLI, yield the live mount, then unmount and check.

    Foreground by default (the server's output goes to a log file); ``daemon=True``
    uses the CLI's own background mode. On leaving, ``bioscanfs umount`` must succeed,
    the server must exit cleanly and the log must hold no traceback and no warning or
    error the test did not declare with ``Mount.expect_log``. The mount is removed even
    when the test fails. ``engine`` is the request loop (``--engine``), with no default: a
    test that mounts takes the ``engine`` fixture, or says why it runs on one engine only.
    """
    mount = _start(sources, workdir, args, index_dir, daemon, engine)
    try:
        yield mount
    except BaseException:
        _cleanup(mount)
        raise
    problems = _stop(mount)
    if problems:
        pytest.fail("\n".join(problems) + f"\n--- log:\n{mount.log_text()}")


MountFactory = Callable[..., Mount]


#: The engines mount tests run on: both, unless BIOSCANFS_TEST_ENGINES names fewer (the
#: sanitizer pass of scripts/test runs the C one alone: no Python engine code is instrumented).
ENGINES = os.environ.get("BIOSCANFS_TEST_ENGINES", "native,python").split(",")


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each test that mounts runs once per engine: the C loop and the mfusepy one."""
    return request.param


@pytest.fixture
def mount(tmp_path: Path, engine: str) -> Iterator[MountFactory]:
    """``mount(*sources, args=(...), index_dir=None, daemon=False)`` -> a live Mount.

    Every mount started through it is unmounted and checked when the test ends.
    """
    with contextlib.ExitStack() as stack:
        count = iter(range(1000))

        def start(*sources: Path, args: Sequence[str] = (), index_dir: Optional[Path] = None,
                  daemon: bool = False) -> Mount:
            workdir = tmp_path / f"mount{next(count)}"
            return stack.enter_context(mounted(sources, workdir, args, index_dir, daemon, engine=engine))

        yield start


@pytest.fixture(scope="module")
def fake_mount(tmp_path_factory: pytest.TempPathFactory, fake_set: Path, engine: str) -> Iterator[Mount]:
    """The shared fake set, mounted once per module and engine for the read-only checks."""
    with mounted([fake_set], tmp_path_factory.mktemp("fake_mount"), engine=engine) as live:
        yield live


@pytest.fixture(scope="session")
def fake_members(fake_set: Path) -> Dict[str, Member]:
    """zipfile's view of the shared fake set."""
    return zip_members(fake_set)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty folder for CLI runs expected to fail; fails the test if left mounted.

    A mount refused before it serves runs no engine; a test that may mount through it
    passes ``--engine`` from the ``engine`` fixture."""
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    if is_mounted(point):
        run_cli("umount", point)
        force_unmount(point)
        pytest.fail(f"{point} was left mounted")
