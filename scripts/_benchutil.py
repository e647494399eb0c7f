"""What the benchmark scripts share: mounting and unmounting the tools compared, dropping
caches, a server's pid and RSS, timing forked workers, and the machine facts a figure needs.

Owns the life cycle of a measured tree (a folder, or a FUSE mount remounted for each cold
pass); knows nothing of how the data was written (_zipkit.py) or what is measured.
Scripts run with the interpreter of the venv that scripts/setup-env makes, where
bioscanfs is installed.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

from bioscanfs.mounts import is_mounted

#: Seconds a mount may take to serve its tree (an index build of ~100,000 members included).
MOUNT_TIMEOUT = 600.0
#: KVM guests' idle-loop polling (cpuidle-haltpoll): how long an idle core polls before it halts.
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")

T = TypeVar("T")
R = TypeVar("R")


class BenchError(Exception):
    """Something that makes the run's figures meaningless: reported in one line, exit status 2."""


def log(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the table or the JSON."""
    print(message, file=sys.stderr, flush=True)


def run_main(main: Callable[[], int], name: str) -> None:
    """Exit with ``main()``'s status; a BenchError is one line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(2)


def parse_counts(text: str) -> List[int]:
    """'0,2,4' -> [0, 2, 4]: thread, process or worker counts from the command line."""
    try:
        counts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected counts such as 1,4,8") from None
    if any(n < 0 for n in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: counts cannot be negative")
    return counts


# ---------------------------------------------------------------- tools

def find_ratarmount() -> Optional[str]:
    """ratarmount next to this interpreter or on PATH, if ``ratarmount --help`` works."""
    beside = Path(sys.executable).parent / "ratarmount"
    program = str(beside) if beside.exists() else shutil.which("ratarmount")
    if program is None:
        return None
    try:
        works = subprocess.run([program, "--help"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return program if works else None


def server_pid(mountpoint: Path, name: str) -> int:
    """The process that serves a mount point: the newest whose command line names both."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(name.encode() in a for a in args) and str(mountpoint).encode() in args:
            found.append(int(entry))
    if not found:
        raise SystemExit(f"no {name} process serves {mountpoint}")
    return max(found)


def rss(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of a process in bytes (``VmRSS``; ``VmHWM``: its peak so far), 0
    when the kernel does not say."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


#: How often ``run_measured`` reads a child's peak RSS, and every how many reads it looks
#: for the child's own children again (a walk of /proc, ~2.5 ms: kept off the CPU the
#: measured command needs).
_PEAK_POLL = 0.02
_TREE_POLLS = 10


def process_tree(pid: int) -> List[int]:
    """A process and its descendants now (by the parent in each ``/proc/PID/stat``: this
    kernel has no ``/proc/PID/task/TID/children``)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue   # ended meanwhile
            children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry))
    pids, at = [pid], 0
    while at < len(pids):
        pids += children.get(pids[at], [])
        at += 1
    return pids


def run_measured(command: Sequence[str], env: Optional[dict] = None, cwd: Optional[Path] = None,
                 stdout: Optional[int] = None) -> Tuple[float, int, int]:
    """(wall seconds, peak RSS in bytes, exit status) of a command run to completion. The
    peak is the largest VmHWM of the command and of the processes it starts (``bioscanfs
    mount`` builds a missing index in a child), read by a thread every _PEAK_POLL until it
    exits (a process it starts is found within _TREE_POLLS reads). ``ru_maxrss`` of a child
    starts from this process's peak at the fork, so it says more of the script than of the
    command. The time ends when the child does (``wait4``), not at a poll."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT if stdout else None)
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        polls, pids = 0, [proc.pid]
        while not done.is_set():
            if polls % _TREE_POLLS == 0:
                pids = process_tree(proc.pid)
            polls += 1
            for pid in pids:
                try:
                    peak[0] = max(peak[0], rss(pid, "VmHWM"))
                except (OSError, ValueError):
                    pass   # exited, or between fork and exec
            done.wait(_PEAK_POLL)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, _ = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    done.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, peak[0], proc.returncode


# ---------------------------------------------------------------- caches and machine

def tree_bytes(path: Path) -> int:
    """Bytes of an index's tree file and of the column files its header names."""
    from bioscanfs import store

    header = store.read_header(str(path)) or {}
    named = {spec[3] for spec in header.get("arrays", {}).values() if len(spec) == 4}
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in named)


def can_drop_caches() -> bool:
    """Only root may write drop_caches, and some containers refuse even root."""
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    """Write dirty pages out, then drop the page cache, dentries and inodes."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def page_cache_bytes() -> int:
    """The kernel's page cache ("Cached" in /proc/meminfo), in bytes."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/meminfo has no Cached line")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (tmpfs would make "cold" reads come from RAM)."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            target = fields[1].replace("\\040", " ")
            inside = resolved == target or resolved.startswith(target.rstrip("/") + "/")
            if inside and len(target) >= len(best):
                best, kind = target, fields[2]
    return kind


def guest_halt_poll_ns() -> Optional[int]:
    """The guest halt-polling window, or None off KVM. A core that has halted takes tens of
    microseconds to wake in a VM, and each FUSE round trip wakes one or two cores (README,
    Tuning), so figures from runs with different windows do not compare."""
    try:
        return int(HALT_POLL.read_text())
    except (OSError, ValueError):
        return None


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was around a run."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------- targets

class Target:
    """A tree to measure: the extracted copy, or a FUSE mount that is remounted for each cold pass."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root

    def make_cold(self, drop: bool) -> None:
        """Drop the caches (when allowed) so that the next pass reads from disk."""
        if drop:
            drop_caches()

    def close(self) -> None:
        """Nothing to release for a plain folder."""


class MountTarget(Target):
    """A FUSE filesystem started by ``mount_command`` at ``root``."""

    def __init__(self, name: str, root: Path, mount_command: List[str], unmount_commands: List[List[str]]) -> None:
        super().__init__(name, root)
        self.mount_command = mount_command
        self.unmount_commands = unmount_commands

    def mount(self) -> float:
        """Mount and wait until the tree is served; returns the seconds it took."""
        started = time.perf_counter()
        done = subprocess.run(self.mount_command, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"{self.name}: mount failed ({shlex.join(self.mount_command)}):\n"
                             f"{done.stdout}{done.stderr}")
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not (is_mounted(str(self.root)) and os.listdir(self.root)):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: {self.root} not live {MOUNT_TIMEOUT:.0f} s after mounting")
            time.sleep(0.05)
        return time.perf_counter() - started

    def unmount(self) -> None:
        """Try each unmount command until the mount point is gone."""
        for command in self.unmount_commands:
            if not is_mounted(str(self.root)):
                return
            subprocess.run(command, capture_output=True)
        deadline = time.monotonic() + 30
        while is_mounted(str(self.root)):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: cannot unmount {self.root}")
            time.sleep(0.05)

    def make_cold(self, drop: bool) -> None:
        """A fresh mount, then dropped caches: nothing read while mounting stays cached either."""
        self.unmount()
        self.mount()
        super().make_cold(drop)

    def close(self) -> None:
        """Unmount, if mounted."""
        self.unmount()


def store_command(work: Path, folder: Path, root: Path, latency_ms: float) -> List[str]:
    """The command that mounts ``folder`` at ``root`` through scripts/bench_store.c (a
    stand-in for a network file system: each read that misses the page cache waits
    ``latency_ms``), compiled into ``work`` first (gcc, libfuse3-dev). The command returns
    once mounted; unmount with ``fusermount(root)``."""
    program = work / "bench_store"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True)
    built = subprocess.run(["gcc", "-O2", "-o", str(program), str(Path(__file__).with_name("bench_store.c")),
                            *flags.stdout.split()], capture_output=True, text=True)
    if flags.returncode or built.returncode:
        raise BenchError(f"cannot build scripts/bench_store.c (gcc, libfuse3-dev):\n{flags.stderr}{built.stderr}")
    return ["env", f"STORE_FOLDER={folder}", f"STORE_LATENCY_US={round(latency_ms * 1000)}", str(program), str(root)]


def fusermount(root: Path) -> List[List[str]]:
    """The commands that unmount a FUSE mount of any tool, in the order to try them."""
    return [[tool, "-u", str(root)] for tool in ("fusermount3", "fusermount") if shutil.which(tool)]


def bioscanfs_target(name: str, sources: Sequence[Path], root: Path, index_dir: Path,
                     extra_args: Sequence[str] = ()) -> MountTarget:
    """bioscanfs serving ``sources`` at ``root``, run by this interpreter so that it follows the venv."""
    command = [sys.executable, "-m", "bioscanfs", "mount", *map(str, sources), str(root),
               "--index-dir", str(index_dir), *extra_args]
    return MountTarget(name, root, command,
                       [[sys.executable, "-m", "bioscanfs", "umount", str(root)], *fusermount(root)])


def ratarmount_target(name: str, program: str, zips: Sequence[Path], root: Path, index_dir: Path) -> MountTarget:
    """ratarmount merging all ``zips`` into one tree, its indexes kept in ``index_dir``."""
    index_dir.mkdir(parents=True, exist_ok=True)
    command = [program, "--index-folders", str(index_dir), *map(str, zips), str(root)]
    return MountTarget(name, root, command, fusermount(root))


# ---------------------------------------------------------------- timing

def interleaved(rows: Sequence[R], targets: Sequence[Target], drop: bool) -> Iterator[Tuple[R, Target, str]]:
    """Yield (row, target, "cold") then (row, target, "warm") for each row and each target in
    turn, so that the noise of a shared machine hits the targets alike.

    Before the cold pass the target is made cold (a fresh mount, caches dropped when
    ``drop``); after the warm pass it is closed: one mount live at a time, so an idle
    server keeps its memory and threads out of the others' way.
    """
    for row in rows:
        for target in targets:
            target.make_cold(drop)
            try:
                yield row, target, "cold"
                yield row, target, "warm"
            finally:
                target.close()


def _forked_worker(work: Callable[[Sequence[str]], T], share: Sequence[str], barrier, results) -> None:
    """Forked worker: starts with the others, reports ``work(share)`` or the error."""
    barrier.wait()
    try:
        results.put(work(share))
    except Exception as err:  # reported to the parent, which stops the run
        results.put(BenchError(f"{type(err).__name__}: {err}"))


def time_forked(work: Callable[[Sequence[str]], T], shares: Sequence[Sequence[str]]) -> Tuple[List[T], float]:
    """Run ``work`` on each share in its own forked process; returns (results, seconds).

    The clock starts when all children are forked and waiting at a barrier, so forking
    is not timed; it stops when the last result is in.
    """
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(shares) + 1)
    results = ctx.Queue()
    workers = [ctx.Process(target=_forked_worker, args=(work, share, barrier, results)) for share in shares]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    got = [results.get() for _ in workers]
    seconds = time.perf_counter() - started
    for worker in workers:
        worker.join()
    errors = [item for item in got if isinstance(item, BenchError)]
    if errors:
        raise BenchError(f"a worker process failed: {errors[0]}")
    return got, seconds
