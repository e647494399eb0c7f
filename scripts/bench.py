#!/usr/bin/env python3
"""Read through the mount at the speed of extracted files: bioscanfs (and ratarmount) vs an extracted copy.

One run builds or reuses a synthetic cropped_256 package set (members of ~8 KB, the size of
the real JPEGs, at the real paths, split over the four real zip names: random bytes when all
are stored, synthetic JPEGs when some are deflated, since deflating random bytes only copies
them and would hide the cost of inflating), extracts
a copy to local disk, mounts the zips, and times on every target, row by row:

- walk + stat of the whole tree (os.walk, os.stat of every file);
- whole-file reads (open/read/close) of one fixed, shuffled sample of files, with 1, 4 and 8
  threads and with 4 processes;

each as a cold pass (caches dropped; FUSE targets unmounted and mounted afresh, since a FUSE
mount's dentries survive drop_caches only partly) followed by a warm pass over the same files.
Rows interleave the targets, so the noise of a shared machine hits them alike.

    python scripts/bench.py [--set DIR] [--images N] [--files N] [--deflate-fraction F]
        [--threads 1,4,8] [--processes 4] [--opener open|unbuffered] [--extra-mount-args "..."]
        [--no-ratarmount] [--json]

Exit status: 0 when bioscanfs meets every target, 1 when it misses one, 2 on error.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from _benchutil import (
    BenchError,
    Target,
    bioscanfs_target,
    can_drop_caches,
    filesystem_type,
    find_ratarmount,
    guest_halt_poll_ns,
    interleaved,
    log,
    page_cache_bytes,
    parse_counts,
    ratarmount_target,
    run_main,
    time_forked,
)
from _fakeids import ProcessIds
from _zipkit import dos_stamp, make_jpeg, packages, random_payloads, split_ids, write_image_zip
from bench_scale import write_stored_zip

from bioscanfs.layout import image_path

IMGTYPE = "cropped_256"
DEFAULT_IMAGES = 91_000
MARKER = "bench-set.json"
EXTRACTED = "extracted"
#: Files of the sample compared byte for byte with the extracted copy on every mount.
BYTE_CHECK_FILES = 200
#: (name, pass, threshold): bioscanfs files/s over extracted files/s, same run.
TARGETS = (("random whole-file reads", "cold", 0.9),
           ("random whole-file reads", "warm", 0.8),
           ("walk+stat", "cold", 0.25))
MB = 1e6


# ---------------------------------------------------------------- the package set

@dataclass
class PackageSet:
    """The zips of a benchmark set and what they hold (member path -> size)."""

    folder: Path
    zips: List[Path]
    sizes: Dict[str, int]
    deflate_fraction: float

    @property
    def extracted(self) -> Path:
        return self.folder / EXTRACTED


def _jpegs(rng: np.random.Generator, count: int) -> List[bytes]:
    """Synthetic JPEGs of about 9 KB (160 x 120, quality 70-95), which deflate by 1-3 % as
    real ones do."""
    return [make_jpeg(rng, 160, 120, f"bench {i}") for i in range(count)]


def _build_set(folder: Path, images: int, deflate_fraction: float, seed: int = 0) -> None:
    """Write the cropped_256 zips as the real package splits them, members in random order.

    Stored-only sets use bench_scale's bulk writer (seconds for ~100,000 members); sets with
    deflated members go through _zipkit's zipfile writer, which can deflate.
    """
    folder.mkdir(parents=True, exist_ok=True)
    by_split = split_ids(ProcessIds(seed).take(images), images, seed)
    rng = np.random.default_rng([seed, 2])
    dos_time, dos_date = dos_stamp(2024, 5, 14, 9, 30)
    names = []
    for filename, group in packages(IMGTYPE, by_split, rng).items():
        group = [group[i] for i in rng.permutation(len(group)).tolist()]
        payloads = _jpegs(rng, len(group)) if deflate_fraction > 0 else random_payloads(rng, len(group))
        members = [image_path(pid, split, IMGTYPE) for split, pid in group]
        log(f"writing {filename}: {len(members):,} members")
        if deflate_fraction > 0:
            write_image_zip(folder / filename, list(zip(members, payloads)), rng, deflate_fraction)
        else:
            write_stored_zip(folder / filename, [m.encode() for m in members], payloads, dos_time, dos_date)
        names.append(filename)
    # Written last: a folder with the marker holds a complete set.
    (folder / MARKER).write_text(json.dumps(
        {"images": images, "deflate_fraction": deflate_fraction, "seed": seed, "zips": names}, indent=1))


def open_set(folder: Path, images: Optional[int], deflate_fraction: Optional[float]) -> PackageSet:
    """Reuse the set in ``folder`` or build it there; refuse a folder holding something else."""
    marker = folder / MARKER
    if not marker.exists():
        if folder.exists() and any(folder.iterdir()):
            raise BenchError(f"{folder}: not empty and not a benchmark set (no {MARKER}); "
                             "give --set a new or empty folder")
        _build_set(folder, images or DEFAULT_IMAGES, deflate_fraction or 0.0)
    meta = json.loads(marker.read_text())
    for name, wanted in (("images", images), ("deflate_fraction", deflate_fraction)):
        if wanted is not None and meta[name] != wanted:
            raise BenchError(f"{folder} holds a set with {name}={meta[name]}, not {wanted}; "
                             "give another --set folder")
    zips = [folder / name for name in meta["zips"]]
    sizes: Dict[str, int] = {}
    for path in zips:
        with zipfile.ZipFile(path) as zf:
            sizes.update((info.filename, info.file_size) for info in zf.infolist())
    return PackageSet(folder, zips, sizes, meta["deflate_fraction"])


def extract(pset: PackageSet) -> None:
    """Extract every zip into ``extracted/`` once; a half-done extraction is started again."""
    if pset.extracted.exists():
        return
    partial = pset.folder / (EXTRACTED + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for path in pset.zips:
        log(f"extracting {path.name}")
        with zipfile.ZipFile(path) as zf:
            zf.extractall(partial)
    partial.rename(pset.extracted)


# ---------------------------------------------------------------- workloads

Measured = Tuple[int, Optional[int], float]  #: files, bytes read (None: none read), seconds


def walk_stat(root: Path) -> Measured:
    """os.walk the tree and stat every file; no bytes are read."""
    started = time.perf_counter()
    files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            os.stat(os.path.join(folder, name))
            files += 1
    return files, None, time.perf_counter() - started


#: How files are opened: ``open`` as PIL.Image.open(path) does (before Python 3.14, open()
#: asks isatty: one ioctl per open, which FUSE forwards to the daemon); ``unbuffered``
#: with buffering=0, which skips it (like torchvision.io.read_file or Python 3.14's open).
OPENERS = {"open": -1, "unbuffered": 0}


def read_files(paths: Sequence[str], buffering: int) -> int:
    """Open, read whole and close each file; returns the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=buffering) as fh:
            total += len(fh.read())
    return total


def read_threads(paths: Sequence[str], threads: int, buffering: int) -> Tuple[int, float]:
    """Each thread reads an interleaved share of the (shuffled) list; returns (bytes, seconds)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read_files, [paths[i::threads] for i in range(threads)], [buffering] * threads))
    return total, time.perf_counter() - started


def read_processes(paths: Sequence[str], processes: int, buffering: int) -> Tuple[int, float]:
    """Each forked process reads an interleaved share; returns (bytes, seconds), forking not timed."""
    shares = [paths[i::processes] for i in range(processes)]
    totals, seconds = time_forked(functools.partial(read_files, buffering=buffering), shares)
    return sum(totals), seconds


# ---------------------------------------------------------------- running

@dataclass
class Row:
    """One measurement: a label and what it runs on a target's root."""

    label: str
    kind: str  #: "walk+stat" or "random whole-file reads" (the target it counts toward)
    run: Callable[[Path], Measured]


@dataclass
class Result:
    row: str
    pass_: str
    target: str
    files: int
    bytes: Optional[int]
    seconds: float
    ratio: Optional[float] = None
    cache_growth: Optional[int] = None  #: page cache bytes added by a cold read pass (caches dropped before)

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds

    @property
    def mb_per_s(self) -> Optional[float]:
        return None if self.bytes is None else self.bytes / MB / self.seconds

    def as_dict(self) -> dict:
        return {"measurement": self.row, "pass": self.pass_, "target": self.target, "files": self.files,
                "bytes": self.bytes, "seconds": round(self.seconds, 4),
                "files_per_s": round(self.files_per_s, 1),
                "mb_per_s": None if self.mb_per_s is None else round(self.mb_per_s, 2),
                "ratio": None if self.ratio is None else round(self.ratio, 3),
                "page_cache_growth_bytes": self.cache_growth}


def make_rows(sample: List[str], sample_bytes: int, threads: List[int], processes: List[int],
              buffering: int) -> List[Row]:
    """The measurements; every read row reads the same sample and checks the byte total."""
    def reader(count: int, use_processes: bool) -> Callable[[Path], Measured]:
        def run(root: Path) -> Measured:
            paths = [os.path.join(root, rel) for rel in sample]
            read = read_processes if use_processes else read_threads
            got, seconds = read(paths, count, buffering)
            if got != sample_bytes:
                raise BenchError(f"{root}: read {got:,} bytes, expected {sample_bytes:,}")
            return len(paths), got, seconds
        return run

    rows = [Row("walk+stat", "walk+stat", walk_stat)]
    rows += [Row(f"read {n} thread{'s' * (n > 1)}", "random whole-file reads", reader(n, False)) for n in threads if n]
    rows += [Row(f"read {n} process{'es' * (n > 1)}", "random whole-file reads", reader(n, True))
             for n in processes if n]
    return rows


def run_all(rows: List[Row], targets: List[Target], drop: bool) -> List[Result]:
    """Every row on every target in turn, cold then warm; ratios against extracted files.
    After dropped caches, a cold read pass also records how much the page cache grew:
    a mount that caches archive pages besides its files' pages holds each file twice."""
    results: List[Result] = []
    reference: Dict[Tuple[str, str], float] = {}
    for row, target, pass_ in interleaved(rows, targets, drop):
        cached = page_cache_bytes()
        files, nbytes, seconds = row.run(target.root)
        result = Result(row.label, pass_, target.name, files, nbytes, seconds)
        if drop and pass_ == "cold" and nbytes:
            result.cache_growth = page_cache_bytes() - cached
        result.ratio = result.files_per_s / reference.setdefault((row.label, pass_), result.files_per_s)
        results.append(result)
        log(f"  {row.label:<18} {pass_}  {target.name:<10} {result.files_per_s:>10,.0f} files/s"
            + (f"  ratio {result.ratio:.2f}" if target.name != "extracted" else ""))
    return results


#: Busy work between two isatty calls, as a loader decodes an image between two opens.
ISATTY_WORK_US = 100


def isatty_seconds(path: Path, work_us: float = 0, calls: int = 5_000) -> float:
    """Median seconds of os.isatty() on an open file, each call after ``work_us`` of busy work.

    open() asks it on every open before Python 3.14 (CPython gh-90102): on a FUSE file one
    round trip to the server, which the kernel never answers itself; on a local file a plain
    syscall. With work between calls the server's thread has gone to sleep, and waking it
    (and then the reader) is part of the price."""
    fd = os.open(path, os.O_RDONLY)
    times = []
    try:
        for _ in range(calls):
            until = time.perf_counter() + work_us / 1e6
            while time.perf_counter() < until:
                pass
            started = time.perf_counter()
            os.isatty(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
    return float(np.median(times))


def check_bytes(target: Target, extracted: Path, sample: List[str]) -> None:
    """A benchmark reading wrong bytes is worthless: compare part of the sample with the extracted copy."""
    for rel in sample[:BYTE_CHECK_FILES]:
        if (target.root / rel).read_bytes() != (extracted / rel).read_bytes():
            raise BenchError(f"{target.name}: {rel} differs from the extracted copy")


def check_targets(results: List[Result], kinds: Dict[str, str]) -> List[dict]:
    """Each target: the worst bioscanfs ratio among the rows it covers."""
    checks = []
    for kind, pass_, threshold in TARGETS:
        covered = [r for r in results if r.target == "bioscanfs" and r.pass_ == pass_ and kinds[r.row] == kind]
        if not covered:
            continue
        worst = min(covered, key=lambda r: r.ratio)
        checks.append({"target": f"{kind}, {pass_}", "threshold": threshold, "worst_ratio": round(worst.ratio, 3),
                       "worst_row": f"{worst.row} {pass_}", "passed": worst.ratio >= threshold})
    return checks


# ---------------------------------------------------------------- report

def table(results: List[Result], names: List[str]) -> str:
    """Rows = measurement and pass; per target files/s and MB/s, and the ratio for the mounts."""
    def num(value: Optional[float], fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    widths = {name: 24 if name == "extracted" else 32 for name in names}
    head1 = f"{'measurement':<24}" + "".join(f"{name:<{widths[name]}}" for name in names)
    head2 = f"{'':<24}" + "".join(
        f"{'files/s':>10}{'MB/s':>9}" + ("" if name == "extracted" else f"{'ratio':>8}") + " " * 5
        for name in names)
    lines = [head1.rstrip(), head2.rstrip()]
    by_key = {(r.row, r.pass_, r.target): r for r in results}
    for row, pass_ in dict.fromkeys((r.row, r.pass_) for r in results):
        cells = []
        for name in names:
            r = by_key[(row, pass_, name)]
            cell = f"{r.files_per_s:>10,.0f}{num(r.mb_per_s, ',.1f'):>9}"
            cells.append(cell + ("" if name == "extracted" else f"{num(r.ratio, '.2f'):>8}") + " " * 5)
        lines.append((f"{row + ' ' + pass_:<24}" + "".join(cells)).rstrip())
    return "\n".join(lines)


def names_of(targets: List[Target]) -> List[str]:
    """Column order of the report: extracted first, then the mounts."""
    return [t.name for t in targets]


def default_set_folder(images: Optional[int], deflate_fraction: Optional[float]) -> Path:
    """A cache folder per set shape, so later runs reuse the set and its extracted copy."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = f"set-{images or DEFAULT_IMAGES}"
    if deflate_fraction:
        name += f"-deflate{deflate_fraction:g}"
    return cache / "bioscanfs-bench" / name


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, dest="set_dir",
                        help="folder of the set, built there when absent "
                             "[default: ~/.cache/bioscanfs-bench/set-IMAGES]")
    parser.add_argument("--images", type=int, help=f"members in the set when building it (default {DEFAULT_IMAGES:,})")
    parser.add_argument("--deflate-fraction", type=float,
                        help="share of members deflated rather than stored when building the set (default 0)")
    parser.add_argument("--files", type=int, default=20_000, help="files in the read sample (default 20,000)")
    parser.add_argument("--threads", type=parse_counts, default=[1, 4, 8],
                        help="thread counts, 0 for none (default 1,4,8)")
    parser.add_argument("--processes", type=parse_counts, default=[4], help="process counts, 0 for none (default 4)")
    parser.add_argument("--extra-mount-args", default="",
                        help="more arguments for `bioscanfs mount`, e.g. \"-o allow_other\"")
    parser.add_argument("--opener", choices=sorted(OPENERS), default="open",
                        help="open: as PIL does (asks isatty, one ioctl per open); unbuffered: buffering=0, "
                             "no isatty (default open)")
    parser.add_argument("--no-ratarmount", action="store_true", help="leave ratarmount out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the read sample (default 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser.parse_args(argv)


@dataclass
class Run:
    """One run's inputs and what it measured, filled in step by step by ``main``."""

    args: argparse.Namespace
    command: str
    pset: PackageSet
    sample: List[str]
    drop: bool
    ratarmount: Optional[str]
    rows: List[Row]
    targets: List[Target]
    setup: Dict[str, float]
    results: List[Result]
    isatty: Dict[str, List[float]]

    @property
    def sample_bytes(self) -> int:
        return sum(self.pset.sizes[rel] for rel in self.sample)


def start(args: argparse.Namespace, command: str) -> Run:
    """Open (or build) the set and its extracted copy, draw the sample, plan the rows."""
    folder = (args.set_dir or default_set_folder(args.images, args.deflate_fraction)).absolute()
    pset = open_set(folder, args.images, args.deflate_fraction)
    extract(pset)
    names = sorted(pset.sizes)
    picks = np.random.default_rng(args.seed).permutation(len(names))[:min(args.files, len(names))]
    sample = [names[i] for i in picks.tolist()]
    ratarmount = None if args.no_ratarmount else find_ratarmount()
    run = Run(args, command, pset, sample, can_drop_caches(), ratarmount, [],
              [Target("extracted", pset.extracted)], {}, [], {})
    run.rows = make_rows(sample, run.sample_bytes, args.threads, args.processes, OPENERS[args.opener])
    return run


def measure(run: Run) -> None:
    """First mounts (index builds, byte check), every row on every target, then isatty."""
    # On the set's own disk: an index in a tmpfs would dodge drop_caches.
    with tempfile.TemporaryDirectory(prefix=".run-", dir=run.pset.folder) as tmp:
        work = Path(tmp)
        mounts = [bioscanfs_target("bioscanfs", [run.pset.folder], work / "mnt-bioscanfs", work / "index-bioscanfs",
                                   shlex.split(run.args.extra_mount_args))]
        if run.ratarmount:
            mounts.append(ratarmount_target("ratarmount", run.ratarmount, run.pset.zips, work / "mnt-ratarmount",
                                            work / "index-ratarmount"))
        try:
            for target in mounts:
                target.root.mkdir()
                log(f"first mount of {target.name} (builds its index)")
                run.setup[target.name] = target.mount()
                check_bytes(target, run.pset.extracted, run.sample)
                target.unmount()
                run.targets.append(target)
            log(f"measuring {len(run.rows)} rows x {len(run.targets)} targets x cold+warm")
            run.results = run_all(run.rows, run.targets, run.drop)
            mounts[0].mount()
            run.isatty = {name: [isatty_seconds(root / run.sample[0], us) for us in (0, ISATTY_WORK_US)]
                          for name, root in (("extracted", run.pset.extracted), (mounts[0].name, mounts[0].root))}
        finally:
            for target in mounts:
                target.close()


def notes_of(run: Run, fstype: str) -> List[str]:
    """What a reader of the figures must know: files missing from a walk, caches kept, tmpfs."""
    walk_files = {r.target: r.files for r in run.results if r.row == "walk+stat"}
    notes = [f"{name}: walk found {count:,} files, the set holds {len(run.pset.sizes):,}"
             for name, count in walk_files.items() if count != len(run.pset.sizes)]
    if not run.drop:
        notes.append("caches NOT dropped (needs root): cold passes only follow a fresh mount")
    if fstype == "tmpfs":
        notes.append("the extracted copy is on tmpfs: its cold passes read from RAM")
    if not run.ratarmount and not run.args.no_ratarmount:
        notes.append("ratarmount not installed (ratarmount --help failed): its columns are left out")
    return notes


def summarize(run: Run) -> dict:
    """Everything the run found, as the JSON output holds it."""
    pset, args = run.pset, run.args
    fstype = filesystem_type(pset.extracted)
    checks = check_targets(run.results, {row.label: row.kind for row in run.rows})
    return {
        "command": run.command,
        "set": {"folder": str(pset.folder), "zips": [p.name for p in pset.zips], "files": len(pset.sizes),
                "bytes": sum(pset.sizes.values()), "deflate_fraction": pset.deflate_fraction,
                "extracted": str(pset.extracted), "extracted_filesystem": fstype},
        "sample": {"files": len(run.sample), "bytes": run.sample_bytes, "seed": args.seed, "opener": args.opener},
        "cpus": os.cpu_count(), "guest_halt_poll_ns": guest_halt_poll_ns(), "caches_dropped": run.drop,
        "first_mount_seconds": {name: round(s, 2) for name, s in run.setup.items()},
        "results": [r.as_dict() for r in run.results], "checks": checks,
        "passed": all(c["passed"] for c in checks),
        "isatty_us": {name: {"back_to_back": round(s[0] * 1e6, 2),
                             f"after_{ISATTY_WORK_US}us_work": round(s[1] * 1e6, 2)}
                      for name, s in run.isatty.items()}, "notes": notes_of(run, fstype),
    }


def print_header(run: Run, summary: dict) -> None:
    """The set, the sample and the conditions of the run."""
    pset, halt = run.pset, summary["guest_halt_poll_ns"]
    print(f"set: {pset.folder}: {len(pset.sizes):,} files, {summary['set']['bytes'] / MB:,.0f} MB in "
          f"{len(pset.zips)} zips (deflated share {pset.deflate_fraction:g}); extracted copy on "
          f"{summary['set']['extracted_filesystem']}; {os.cpu_count()} CPUs"
          + ("" if halt is None else f"; guest halt polling {halt:,} ns"))
    print(f"sample: {len(run.sample):,} files, {run.sample_bytes / MB:,.1f} MB, the same shuffled list for every "
          f"target; opened with {run.args.opener!r}")
    print("cold = " + ("caches dropped" if run.drop else "caches NOT dropped")
          + ", mounts remounted; warm = the same pass again. MB = 10^6 bytes; ratio = files/s vs extracted")
    print("first mount (index build): " + ", ".join(f"{n} {s:.1f} s" for n, s in run.setup.items()))


def print_isatty(run: Run) -> None:
    """isatty's cost on both trees, and what one round trip per open predicts for 1 thread warm."""
    isatty = run.isatty
    round_trip = isatty["bioscanfs"][0] - isatty["extracted"][0]
    print(f"isatty (p50, back to back / after {ISATTY_WORK_US} us of work): " + ", ".join(
        f"{name} {s[0] * 1e6:.1f} / {s[1] * 1e6:.1f} us" for name, s in isatty.items()), end="")
    single = {r.target: r for r in run.results if r.row == "read 1 thread" and r.pass_ == "warm"}
    if run.args.opener == "open" and len(single) > 1:
        per_file = 1 / single["extracted"].files_per_s
        print(f"; one back-to-back round trip per open added to an extracted file's {per_file * 1e6:.1f} us "
              f"predicts {per_file / (per_file + round_trip):.2f} for read 1 thread warm "
              f"(measured {single['bioscanfs'].ratio:.2f})", end="")
    print()


def print_report(run: Run, summary: dict) -> None:
    """The table, the targets, page cache growth, isatty, and the notes."""
    print_header(run, summary)
    print()
    print(table(run.results, names_of(run.targets)))
    print()
    print("targets (bioscanfs vs extracted files, same run):")
    for c in summary["checks"]:
        print(f"  {c['target']:<32} >= {c['threshold']:.2f}: {'PASS' if c['passed'] else 'FAIL'}"
              f"  (worst {c['worst_ratio']:.2f}, {c['worst_row']})")
    growth = {name: [r.cache_growth / r.bytes for r in run.results
                     if r.target == name and r.cache_growth is not None and r.bytes] for name in names_of(run.targets)}
    if any(growth.values()):
        print("page cache grown by a cold read pass, per byte read: " + ", ".join(
            f"{name} {min(g):.2f}-{max(g):.2f}" for name, g in growth.items() if g))
    print_isatty(run)
    print(f"byte check: first {min(BYTE_CHECK_FILES, len(run.sample))} sample files identical on every mount; "
          "every read pass returned the sample's exact byte total")
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"command: {run.command}")


def main(argv: Optional[List[str]] = None) -> int:
    """Set, measurements, summary, report; exit status 0 when every target is met."""
    args = parse_args(argv)
    command = shlex.join([sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    run = start(args, command)
    measure(run)
    summary = summarize(run)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_report(run, summary)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    run_main(main, "bench")
