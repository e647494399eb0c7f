#!/usr/bin/env python3
"""Full-scale BIOSCAN-5M benchmark data: the cropped_256 per-split zips with all 5,150,850 members.

CPython's zipfile takes many minutes for five million members, so the zip records are
built here in bulk with numpy (stored members of a few bytes each); the whole set is
written in well under two minutes and about 1.1 GB.

    python scripts/bench_scale.py write OUTDIR [--total N] [--seed S] [--packages P]
    python scripts/bench_scale.py run OUTDIR [--total N] [--packages P] [--compare CHECKOUT]
                                         [--no-ratarmount] [--json]
    python scripts/bench_scale.py remount SET --index-dir DIR [--compare CHECKOUT --compare-index-dir DIR]
                                             [--repeat N] [--work DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

import numpy as np
from _benchutil import can_drop_caches, drop_caches, find_ratarmount, fusermount, rss, run_measured, server_pid
from _fakeids import ProcessIds
from _zipkit import dos_stamp, split_counts

from bioscanfs.layout import EVAL_SPLITS, IMGTYPES, SPLIT_SIZES, image_path
from bioscanfs.mounts import is_mounted
from bioscanfs.sources import FileSource
from bioscanfs.zipdir import read_end_record

#: The checkout this script belongs to, which its bioscanfs runs come from.
REPO = Path(__file__).resolve().parent.parent

FULL_TOTAL = sum(SPLIT_SIZES.values())  # 5,150,850
IMGTYPE = "cropped_256"

#: A 32-bit field holding this says "the value is in the ZIP64 record or extra field".
_MARK32 = 0xFFFFFFFF
#: A 16-bit entry count holding this says the same.
_MARK16 = 0xFFFF
#: Offsets and sizes from here on need ZIP64 (the marker itself cannot be a value).
_ZIP64_LIMIT = _MARK32
#: Members per batch of records: bounds the numpy temporaries to a few hundred MB.
_BATCH = 1 << 18
_UTF8_FLAG = 0x0800
_UNIX = 3 << 8  # "version made by" high byte: external attributes are Unix modes
_FILE_MODE = 0o100644 << 16

_LOCAL = np.dtype([
    ("sig", "<u4"), ("need", "<u2"), ("flags", "<u2"), ("method", "<u2"),
    ("time", "<u2"), ("date", "<u2"), ("crc", "<u4"), ("csize", "<u4"), ("usize", "<u4"),
    ("nlen", "<u2"), ("xlen", "<u2"),
])
_CENTRAL = np.dtype([
    ("sig", "<u4"), ("made", "<u2"), ("need", "<u2"), ("flags", "<u2"), ("method", "<u2"),
    ("time", "<u2"), ("date", "<u2"), ("crc", "<u4"), ("csize", "<u4"), ("usize", "<u4"),
    ("nlen", "<u2"), ("xlen", "<u2"), ("clen", "<u2"), ("disk", "<u2"), ("iattr", "<u2"),
    ("eattr", "<u4"), ("offset", "<u4"),
])
assert _LOCAL.itemsize == 30 and _CENTRAL.itemsize == 46


def _records(headers: np.ndarray, tails: bytes, tail_lens: np.ndarray) -> np.ndarray:
    """Bytes of header[0] + tail[0] + header[1] + tail[1] + ..., built without a per-record loop.

    A byte mask marks where the fixed-size headers go; boolean assignment then fills the
    header bytes and the concatenated tails into their places in order.
    """
    n = len(headers)
    width = headers.dtype.itemsize
    lengths = np.column_stack((np.full(n, width, np.int64), tail_lens)).ravel()
    is_header = np.repeat(np.tile(np.array([True, False]), n), lengths)
    out = np.empty(is_header.size, np.uint8)
    out[is_header] = headers.view(np.uint8)
    out[~is_header] = np.frombuffer(tails, np.uint8)
    return out


def _end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    """ZIP64 end record and locator (when needed) followed by the classic end record."""
    out = b""
    if count >= _MARK16 or cd_offset >= _ZIP64_LIMIT or cd_size >= _ZIP64_LIMIT:
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, _UNIX | 45, 45, 0, 0,
                           count, count, cd_size, cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, cd_offset + cd_size, 1)
    short_count = min(count, _MARK16)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, short_count, short_count,
                       cd_size if cd_size < _ZIP64_LIMIT else _MARK32,
                       cd_offset if cd_offset < _ZIP64_LIMIT else _MARK32, 0)
    return out


def write_stored_zip(path: Union[str, Path], names: list[bytes], payloads: list[bytes],
                     dos_time: int, dos_date: int) -> None:
    """Write a zip of stored (uncompressed) members, ``names[i]`` holding ``payloads[i]``.

    Names are flagged UTF-8. ZIP64 is used where APPNOTE 6.3 requires it: a ZIP64 end
    record for >= 65,535 entries or a central directory past 4 GiB, and a ZIP64 extra
    field (0x0001) for each local header offset >= 0xFFFFFFFF. Payloads must stay under
    4 GiB each (the sizes are never written as ZIP64).
    """
    n = len(names)
    if n != len(payloads):
        raise ValueError(f"{n} names but {len(payloads)} payloads")
    name_lens = np.fromiter(map(len, names), np.int64, n)
    sizes = np.fromiter(map(len, payloads), np.int64, n)
    if n and (name_lens.max() > 0xFFFF or sizes.max() >= _ZIP64_LIMIT):
        raise ValueError("a name is over 65,535 bytes or a payload is 4 GiB or more")
    crcs = np.fromiter(map(zlib.crc32, payloads), np.uint32, n)
    record_lens = 30 + name_lens + sizes
    offsets = np.cumsum(record_lens) - record_lens
    zip64 = offsets >= _ZIP64_LIMIT
    need = np.where(zip64, 45, 20)

    def headers(dtype: np.dtype, signature: int, part: slice) -> np.ndarray:
        """The fields local and central headers share, for one batch of members."""
        hdr = np.zeros(len(names[part]), dtype)
        hdr["sig"] = signature
        hdr["need"] = need[part]
        hdr["flags"] = _UTF8_FLAG
        hdr["time"], hdr["date"] = dos_time, dos_date
        hdr["crc"] = crcs[part]
        hdr["csize"] = hdr["usize"] = sizes[part]
        hdr["nlen"] = name_lens[part]
        return hdr

    with open(path, "wb") as fh:
        for lo in range(0, n, _BATCH):
            part = slice(lo, lo + _BATCH)
            hdr = headers(_LOCAL, 0x04034B50, part)
            tails = b"".join(itertools.chain.from_iterable(zip(names[part], payloads[part])))
            fh.write(_records(hdr, tails, name_lens[part] + sizes[part]).data)

        cd_offset = int(record_lens.sum())
        for lo in range(0, n, _BATCH):
            part = slice(lo, lo + _BATCH)
            big = zip64[part]
            hdr = headers(_CENTRAL, 0x02014B50, part)
            hdr["made"] = _UNIX | need[part]
            hdr["xlen"] = np.where(big, 12, 0)
            hdr["eattr"] = _FILE_MODE
            hdr["offset"] = np.where(big, _MARK32, offsets[part])
            # The ZIP64 extra of a member holds only its offset: the one field set to the marker.
            extras = [struct.pack("<HHQ", 1, 8, off) if wide else b""
                      for off, wide in zip(offsets[part].tolist(), big.tolist())]
            tails = b"".join(itertools.chain.from_iterable(zip(names[part], extras)))
            fh.write(_records(hdr, tails, name_lens[part] + hdr["xlen"]).data)
        cd_size = fh.tell() - cd_offset
        fh.write(_end_records(n, cd_offset, cd_size))


def write_scale_set(outdir: Union[str, Path], total: int = FULL_TOTAL, seed: int = 0,
                    packages: int = 1) -> list[Path]:
    """Write the per-split zips (pretrain in two standalone halves) of ``packages`` imgtypes
    (cropped_256 first) into ``outdir``: four archives per imgtype, the same processids in each.

    Each member holds its processid and a newline; members are in random order. Returns
    the zip paths.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    by_split = scale_ids(total, seed)
    pretrain = [("pretrain", pid) for pid in by_split.pop("pretrain")]
    half = (len(pretrain) + 1) // 2
    evals = [(split, pid) for split in EVAL_SPLITS for pid in by_split[split]]
    # The eval splits were concatenated split by split: mix them like the other zips.
    np.random.default_rng([seed, 1]).shuffle(evals)
    parts = {"pretrain.01": pretrain[:half], "pretrain.02": pretrain[half:],
             "train": [("train", pid) for pid in by_split.pop("train")], "eval": evals}
    dos_time, dos_date = dos_stamp(2024, 5, 14, 9, 30)
    paths = []
    for imgtype in package_imgtypes(packages):
        for part, members in parts.items():
            path = outdir / f"BIOSCAN_5M_{imgtype}_{part}.zip"
            write_stored_zip(path,
                             [image_path(pid, split, imgtype).encode() for split, pid in members],
                             [pid.encode() + b"\n" for _, pid in members],
                             dos_time, dos_date)
            paths.append(path)
    return paths


def scale_ids(total: int = FULL_TOTAL, seed: int = 0) -> dict[str, list[str]]:
    """The processids of each split in a scale set (what ``write_scale_set`` writes)."""
    counts = split_counts(total)
    pids = ProcessIds(seed).take(sum(counts.values()))
    order = np.random.default_rng(seed).permutation(len(pids))
    by_split: dict[str, list[str]] = {}
    start = 0
    for split, count in counts.items():
        by_split[split] = [pids[i] for i in order[start:start + count].tolist()]
        start += count
    return by_split


def package_imgtypes(packages: int) -> list[str]:
    """The imgtypes of a set of ``packages`` packages: cropped_256 first, as in the one-package set."""
    if not 1 <= packages <= len(IMGTYPES):
        raise SystemExit(f"--packages: 1 to {len(IMGTYPES)}")
    return [IMGTYPE] + [t for t in IMGTYPES if t != IMGTYPE][:packages - 1]


def _cmd_write(args: argparse.Namespace) -> int:
    """``write``: make the scale set and say what was written, how big, and how fast."""
    started = time.perf_counter()
    paths = write_scale_set(args.outdir, total=args.total, seed=args.seed, packages=args.packages)
    elapsed = time.perf_counter() - started
    for path in paths:
        print(f"{path.name}: {path.stat().st_size:,} bytes")
    size = sum(path.stat().st_size for path in paths)
    members = sum(split_counts(args.total).values()) * args.packages
    print(f"wrote {members:,} members in {len(paths)} zips, {size:,} bytes, in {elapsed:.1f} s")
    return 0


def _run_timed(command: list[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of a command run to completion; fails loudly."""
    elapsed, peak, status = run_measured(command, env, cwd)
    if status != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return elapsed, peak


def _list_chunk(mountpoint: Path) -> tuple[float, int]:
    """(seconds, entries) to list and stat one 18,000-entry pretrain chunk folder (``ls -l``)."""
    folder = mountpoint / "bioscan5m/images" / IMGTYPE / "pretrain/00"
    started = time.perf_counter()
    names = os.listdir(folder)
    for name in names:
        os.stat(folder / name)
    return time.perf_counter() - started, len(names)


def _unmount(mountpoint: Path) -> None:
    for command in [*fusermount(mountpoint), ["umount", str(mountpoint)]]:
        if subprocess.run(command, capture_output=True).returncode == 0:
            break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and is_mounted(str(mountpoint)):
        time.sleep(0.1)


def _drop_page_cache() -> bool:
    """Write back and drop the page cache (as after a reboot); False when not allowed (not root)."""
    if not can_drop_caches():
        return False
    drop_caches()
    return True


def _measure_mounts(label: str, command: list[str], mountpoint: Path, server: str, index_dir: Optional[Path],
                    members: int, checkout: Optional[Path] = None) -> list[dict]:
    """Cold mount (index built), warm remount, remount with a dropped page cache, remount
    with the largest archive touched (bioscanfs only); each with the daemon's RSS after
    listing a chunk, the cold one with the index's size."""
    rows = []
    largest = _largest(Path(command[command.index("mount") + 1])) if index_dir is not None else None
    for phase in PHASES:
        change = _CHANGES.get(phase)
        if (phase == "page cache dropped" and not _drop_page_cache()) or (change and largest is None):
            continue
        with change(largest) if change else contextlib.nullcontext() as added:
            os.sync()   # each phase starts with no dirty pages left by the one before (its index, the change)
            # ``python -m`` imports from its working folder first: the checkout measured.
            seconds, peak = _run_timed(command, dict(os.environ, PYTHONPATH=str(checkout)) if checkout else None,
                                       checkout)
            if added:
                _check_added(mountpoint, *added)
            listing, entries = _list_chunk(mountpoint)
            resident = rss(server_pid(mountpoint, server))
            _unmount(mountpoint)
        row = {"tool": label, "phase": phase, "seconds": seconds, "mount_command_peak_rss": peak,
               "server_rss_after_listing": resident, "chunk_listing_seconds": listing, "chunk_entries": entries}
        if phase == "cold mount" and index_dir is not None:
            row["index_bytes_per_member"] = sum(p.stat().st_size for p in index_dir.iterdir()
                                                if p.is_file() and p.suffix in (".tree", ".col", ".members")) / members
        rows.append(row)
    return rows


def _largest(folder: Path) -> Path:
    return max(folder.glob("*.zip"), key=lambda p: p.stat().st_size)


@contextlib.contextmanager
def _touched(archive: Path) -> Iterator[None]:
    """The archive with a new mtime and the same bytes, its old mtime back after."""
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        yield
    finally:
        os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))


#: What the "one archive grown" phase appends to the largest archive's first folder.
_GROWN_NAME = b"grown-by-bench.jpg"
_GROWN_DATA = b"appended after the index was built\n" * 64


@contextlib.contextmanager
def _grown(archive: Path) -> Iterator[tuple[str, bytes]]:
    """The archive with one more stored member, written where its central directory was and
    followed by the directory again with the new record and new end records: a change of
    content that the index must parse again. Yields (the new member's path, its bytes);
    the archive's bytes and mtime are put back after. The old directory goes through a file
    beside the archive, copied in the kernel, not through this process's memory."""
    st = archive.stat()
    src = FileSource([str(archive)])
    try:
        end = read_end_record(src)
        first = src.pread(46 + 0xFFFF, end.cd_start)  # the first record and its name
    finally:
        src.close()
    name = first[46:46 + struct.unpack_from("<H", first, 28)[0]].rpartition(b"/")[0] + b"/" + _GROWN_NAME
    offset = end.cd_start
    assert offset < _ZIP64_LIMIT, "the bench's archives keep their data under 4 GiB"
    stamp, crc, size = dos_stamp(2024, 6, 1, 12, 0), zlib.crc32(_GROWN_DATA), len(_GROWN_DATA)
    added = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, _UTF8_FLAG, 0, *stamp, crc, size, size, len(name), 0) \
        + name + _GROWN_DATA
    record = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _UNIX | 20, 20, _UTF8_FLAG, 0, *stamp, crc, size, size,
                         len(name), 0, 0, 0, 0, _FILE_MODE, offset) + name
    kept = archive.with_name(archive.name + ".bench-tail")
    with open(archive, "r+b") as f, open(kept, "w+b") as tail:
        _copy_range(f, tail, offset, 0, st.st_size - offset)
        os.pwrite(f.fileno(), added, offset)
        _copy_range(tail, f, 0, offset + len(added), end.cd_size)
        os.pwrite(f.fileno(), record + _end_records(end.entries + 1, offset + len(added), end.cd_size + len(record)),
                  offset + len(added) + end.cd_size)
    try:
        yield name.decode(), _GROWN_DATA
    finally:
        with open(archive, "r+b") as f, open(kept, "rb") as tail:
            _copy_range(tail, f, 0, offset, st.st_size - offset)
            f.truncate(st.st_size)
        kept.unlink()
        os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_range(src: BinaryIO, dst: BinaryIO, src_at: int, dst_at: int, length: int) -> None:
    """``length`` bytes from ``src_at`` of one file to ``dst_at`` of another, in the kernel."""
    while length > 0:
        done = os.copy_file_range(src.fileno(), dst.fileno(), length, src_at, dst_at)
        if done == 0:
            raise SystemExit(f"{src.name}: shorter than expected")
        src_at, dst_at, length = src_at + done, dst_at + done, length - done


#: Phases of ``_measure_mounts``, in order; those that change the largest archive first.
PHASES = ("cold mount", "warm remount", "page cache dropped", "one archive touched", "one archive grown")
_CHANGES = {"one archive touched": _touched, "one archive grown": _grown}


def _check_added(mountpoint: Path, path: str, data: bytes) -> None:
    """The member a phase added is served with its bytes: the re-indexed tree holds it."""
    with open(mountpoint / path, "rb") as f:
        if f.read() != data:
            raise SystemExit(f"{path}: not served as written after the re-index")


def _one_package(outdir: Path, work: Path) -> Path:
    """A folder of hard links to the cropped_256 archives of a larger set: the one-package set."""
    folder = work / "one-package"
    folder.mkdir()
    for path in outdir.glob(f"BIOSCAN_5M_{IMGTYPE}_*.zip"):
        os.link(path, folder / path.name)
    return folder


def _bioscanfs_runs(sets: list[tuple[str, Path, int]], work: Path, compare: Optional[Path]) -> list[dict]:
    """Every set mounted by this checkout (and by ``compare``'s, set by set, side by side)."""
    mountpoint = work / "mnt"
    mountpoint.mkdir(exist_ok=True)
    checkouts = [("bioscanfs", REPO)] + ([(f"bioscanfs@{compare.name}", compare.resolve())] if compare else [])
    results = []
    for set_label, folder, members in sets:
        for label, checkout in checkouts:
            index_dir = work / f"index-{len(results)}"
            rows = _measure_mounts(label, [sys.executable, "-m", "bioscanfs", "mount", str(folder), str(mountpoint),
                                           "--index-dir", str(index_dir)], mountpoint, "bioscanfs", index_dir,
                                   members, checkout)
            results += [dict(row, set=set_label, members=members) for row in rows]
            shutil.rmtree(index_dir, ignore_errors=True)
    return results


def _cmd_run(args: argparse.Namespace) -> int:
    """``run``: zipfile open vs bioscanfs cold mount, warm remount, remount after a dropped
    page cache, index size and RSS; with ``--packages 4`` next to the one-package figures."""
    outdir = args.outdir.resolve()
    zips = sorted(outdir.glob("BIOSCAN_5M_*.zip"))
    if len(zips) != 4 * args.packages:
        print(f"writing the scale set ({args.total:,} members x {args.packages}) into {outdir}", flush=True)
        zips = write_scale_set(outdir, total=args.total, packages=args.packages)
    per_package = sum(split_counts(args.total).values())
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work)).resolve()
    try:
        sets = [(f"{args.packages} packages", outdir, per_package * args.packages)]
        if args.packages > 1:
            sets.insert(0, ("1 package", _one_package(outdir, work), per_package))
        for path in zips:  # the same warm page cache for every tool
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        seconds, peak = _run_timed([sys.executable, "-c",
                                    "import sys, zipfile\nfor p in sys.argv[1:]: zipfile.ZipFile(p)",
                                    *map(str, sorted(sets[0][1].glob("*.zip")))])
        results = [{"tool": "python zipfile", "phase": "open all archives", "seconds": seconds,
                    "mount_command_peak_rss": peak, "set": sets[0][0], "members": sets[0][2]}]
        results += _bioscanfs_runs(sets, work, args.compare)
        ratarmount = None if args.no_ratarmount else find_ratarmount()
        if ratarmount:
            results += [dict(row, set=sets[0][0], members=sets[0][2]) for row in _measure_mounts(
                "ratarmount", [ratarmount, "--index-folders", str(work / "rindex"),
                               *map(str, sorted(sets[0][1].glob("*.zip"))), str(work / "mnt")],
                work / "mnt", "ratarmount", None, sets[0][2])]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"results": results}, indent=2))
        return 0
    _print_table(results)
    print("\ncommand: python scripts/bench_scale.py run " + " ".join(sys.argv[2:]))
    return 0


def _print_table(results: list[dict]) -> None:
    """One line per (set, tool, phase); ``vs this`` divides by this checkout's seconds."""
    print(f"\n{'set':<11} {'tool':<22} {'phase':<19} {'seconds':>8} {'vs this':>8} {'peak RSS':>9} "
          f"{'daemon RSS':>10} {'index B/member':>14} {'ls -l chunk':>15}")
    ours = {(r["set"], r["phase"]): r["seconds"] for r in results if r["tool"] == "bioscanfs"}
    for row in results:
        this = ours.get((row["set"], row["phase"]))
        server = row.get("server_rss_after_listing")
        per_member = row.get("index_bytes_per_member")
        listing = row.get("chunk_listing_seconds")
        ratio = f"{row['seconds'] / this:.2f}x" if this else "-"
        daemon = f"{server / 2**20:.0f}MB" if server else "-"
        size = f"{per_member:.1f}" if per_member else "-"
        chunk = f"{listing:.2f} s / {row['chunk_entries']}" if listing else "-"
        print(f"{row['set']:<11} {row['tool']:<22} {row['phase']:<19} {row['seconds']:>8.2f} {ratio:>8} "
              f"{row['mount_command_peak_rss'] / 2**20:>7.0f}MB {daemon:>10} {size:>14} {chunk:>15}")


def _cmd_remount(args: argparse.Namespace) -> int:
    """``remount``: warm remounts and remounts after dropping the page cache of an index
    built once (by the first mount, if absent), repeated and interleaved with ``--compare``'s
    (its own index folder): mount command time and peak RSS, daemon RSS after ``ls -l`` of
    a chunk. A cold build of 20.6 M members takes minutes; remounts are what this repeats.
    Each repeat also times this checkout's imports alone (``python -c "import ..."``), the
    floor of any mount command, warm and after dropping the page cache."""
    checkouts = [("bioscanfs", REPO, args.index_dir)]
    if args.compare:
        if not args.compare_index_dir:
            raise SystemExit("--compare needs --compare-index-dir")
        checkouts.append((f"bioscanfs@{args.compare.name}", args.compare.resolve(), args.compare_index_dir))
    work = Path(tempfile.mkdtemp(prefix="bench-scale-remount-", dir=args.work)).resolve()
    mountpoint = work / "mnt"
    mountpoint.mkdir()
    phases = ["warm remount"] + (["page cache dropped"] if can_drop_caches() else [])
    results = []
    imports = [sys.executable, "-c", "import bioscanfs.cli, bioscanfs.nativefs"]
    try:
        for _, (label, checkout, index_dir) in itertools.product(range(args.repeat), checkouts):
            command = [sys.executable, "-m", "bioscanfs", "mount", str(args.set), str(mountpoint),
                       "--index-dir", str(index_dir)]
            for phase in phases if checkout == REPO else ():
                if phase == "page cache dropped":
                    _drop_page_cache()
                seconds, peak = _run_timed(imports, dict(os.environ, PYTHONPATH=str(checkout)), checkout)
                results.append({"tool": "imports only", "phase": phase, "seconds": seconds,
                                "mount_command_peak_rss": peak, "set": args.set.name})
            for phase in phases:
                if phase == "page cache dropped":
                    _drop_page_cache()
                seconds, peak = _run_timed(command, dict(os.environ, PYTHONPATH=str(checkout)), checkout)
                listing, entries = _list_chunk(mountpoint)
                results.append({"tool": label, "phase": phase, "seconds": seconds, "mount_command_peak_rss": peak,
                                "server_rss_after_listing": rss(server_pid(mountpoint, "bioscanfs")),
                                "chunk_listing_seconds": listing, "chunk_entries": entries, "set": args.set.name})
                _unmount(mountpoint)
    finally:
        _unmount(mountpoint)
        shutil.rmtree(work, ignore_errors=True)
    _print_table(results)
    for label, phase in dict.fromkeys((r["tool"], r["phase"]) for r in results):
        times = sorted(r["seconds"] for r in results if (r["tool"], r["phase"]) == (label, phase))
        print(f"{label:<22} {phase:<19} median {times[len(times) // 2]:.2f} s of {len(times)}: "
              + ", ".join(f"{t:.2f}" for t in times))
    print("\ncommand: python scripts/bench_scale.py remount " + " ".join(sys.argv[2:]))
    return 0


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    """``profile``: build the index of a set in this process and say where the memory goes:
    the peak RSS of each step of the merge (the peak is reset before each, through
    /proc/self/clear_refs), and the arrays the merge holds once it has sorted."""
    from bioscanfs import Collection, merge

    steps: list[tuple[str, int, int, float]] = []
    last = [time.perf_counter()]

    def measured(name: str, method):
        def step(builder, *rest):
            Path("/proc/self/clear_refs").write_text("5\n")  # VmHWM := VmRSS
            out = method(builder, *rest)
            now = time.perf_counter()
            steps.append((name, _status("VmHWM"), _status("VmRSS"), now - last[0]))
            last[0] = now
            if name == "merge":
                held = {k: v.nbytes for k, v in vars(builder).items() if isinstance(v, np.ndarray)}
                steps.append(("  held after merge: " + ", ".join(f"{k} {v / 2**20:.0f}MB" for k, v in held.items()),
                              sum(held.values()), 0, 0.0))
            return out
        return step

    for name in ("add", "add_from_tree", "merge", "write"):
        setattr(merge.Builder, name, measured(name, getattr(merge.Builder, name)))
    work = Path(tempfile.mkdtemp(prefix="bench-scale-profile-", dir=args.work))
    try:
        started = last[0] = time.perf_counter()
        Collection(str(args.set), index_dir=str(work)).close()
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, peak, after, seconds in steps:
        print(f"{name:<40} peak {peak / 2**20:>7.0f} MB" + (f"   after {after / 2**20:>7.0f} MB" if after else "")
              + (f"   {seconds:6.1f} s since the step before" if seconds else ""))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"built in {elapsed:.1f} s; peak RSS of the process {peak_mb:.0f} MB")
    print("command: python scripts/bench_scale.py profile " + " ".join(sys.argv[2:]))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: one subcommand per stage of the scale benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write the full-scale cropped_256 zips")
    write.add_argument("outdir", type=Path)
    write.add_argument("--total", type=int, default=FULL_TOTAL,
                       help=f"members in all (default {FULL_TOTAL:,}, the real dataset)")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--packages", type=int, default=1, help="imgtypes, four archives each (1-4)")
    write.set_defaults(handler=_cmd_write)
    run = commands.add_parser("run", help="measure mount and remount against zipfile and ratarmount")
    run.add_argument("outdir", type=Path, help="folder of the scale set (written if absent)")
    run.add_argument("--total", type=int, default=FULL_TOTAL, help="members per package")
    run.add_argument("--packages", type=int, default=1,
                     help="imgtypes in the set (1-4); with more than one, the one-package figures come too")
    run.add_argument("--compare", type=Path, help="another checkout of bioscanfs, measured side by side")
    run.add_argument("--work", type=Path, help="folder for mount point and indexes (default: the system's temp)")
    run.add_argument("--no-ratarmount", action="store_true")
    run.add_argument("--json", action="store_true")
    run.set_defaults(handler=_cmd_run)
    remount = commands.add_parser("remount", help="repeat warm and dropped-cache remounts of an index built once")
    remount.add_argument("set", type=Path, help="folder of a scale set")
    remount.add_argument("--index-dir", type=Path, required=True, help="this checkout's index (built if absent)")
    remount.add_argument("--compare", type=Path, help="another checkout of bioscanfs, interleaved")
    remount.add_argument("--compare-index-dir", type=Path, help="the other checkout's index folder")
    remount.add_argument("--repeat", type=int, default=3)
    remount.add_argument("--work", type=Path, help="folder for the mount point (default: the system's temp)")
    remount.set_defaults(handler=_cmd_remount)
    profile = commands.add_parser("profile", help="where the memory of an index build goes, step by step")
    profile.add_argument("set", type=Path, help="folder of a scale set")
    profile.add_argument("--work", type=Path, help="folder for the index (default: the system's temp)")
    profile.set_defaults(handler=_cmd_profile)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
