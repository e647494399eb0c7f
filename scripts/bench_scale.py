#!/usr/bin/env python3
"""Full-scale BIOSCAN-5M benchmark data: the cropped_256 per-split zips with all 5,150,850 members.

CPython's zipfile takes many minutes for five million members, so the zip records are
built here in bulk with numpy (stored members of a few bytes each); the whole set is
written in well under two minutes and about 1.1 GB.

    python scripts/bench_scale.py write OUTDIR [--total N] [--seed S]
    python scripts/bench_scale.py run OUTDIR [--total N] [--no-ratarmount] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _fakeids import ProcessIds  # noqa: E402
from _benchutil import find_ratarmount, rss, server_pid  # noqa: E402
from bioscanfs.layout import EVAL_SPLITS, SPLIT_SIZES, image_path  # noqa: E402

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


def split_counts(total: int = FULL_TOTAL) -> dict[str, int]:
    """Members per split: the real split sizes scaled by total / 5,150,850, at least 1 each."""
    return {split: max(1, round(size * total / FULL_TOTAL)) for split, size in SPLIT_SIZES.items()}


def _dos_stamp(year: int, month: int, day: int, hour: int, minute: int) -> tuple[int, int]:
    """(time, date) fields of a DOS timestamp."""
    return (hour << 11) | (minute << 5), ((year - 1980) << 9) | (month << 5) | day


def write_scale_set(outdir: Union[str, Path], total: int = FULL_TOTAL, seed: int = 0) -> list[Path]:
    """Write the cropped_256 per-split zips (pretrain in two standalone halves) into ``outdir``.

    Each member holds its processid and a newline; members are in random order. Returns
    the zip paths.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    counts = split_counts(total)
    pids = ProcessIds(seed).take(sum(counts.values()))
    order = np.random.default_rng(seed).permutation(len(pids))
    by_split: dict[str, list[str]] = {}
    start = 0
    for split, count in counts.items():
        by_split[split] = [pids[i] for i in order[start:start + count].tolist()]
        start += count
    del pids, order

    pretrain = [("pretrain", pid) for pid in by_split.pop("pretrain")]
    half = (len(pretrain) + 1) // 2
    packages = {
        f"BIOSCAN_5M_{IMGTYPE}_pretrain.01.zip": pretrain[:half],
        f"BIOSCAN_5M_{IMGTYPE}_pretrain.02.zip": pretrain[half:],
        f"BIOSCAN_5M_{IMGTYPE}_train.zip": [("train", pid) for pid in by_split.pop("train")],
        f"BIOSCAN_5M_{IMGTYPE}_eval.zip":
            [(split, pid) for split in EVAL_SPLITS for pid in by_split[split]],
    }
    # The eval splits were concatenated split by split: mix them like the other zips.
    np.random.default_rng([seed, 1]).shuffle(packages[f"BIOSCAN_5M_{IMGTYPE}_eval.zip"])
    dos_time, dos_date = _dos_stamp(2024, 5, 14, 9, 30)
    paths = []
    for filename, members in packages.items():
        path = outdir / filename
        write_stored_zip(path,
                         [image_path(pid, split, IMGTYPE).encode() for split, pid in members],
                         [pid.encode() + b"\n" for _, pid in members],
                         dos_time, dos_date)
        paths.append(path)
    return paths


def _cmd_write(args: argparse.Namespace) -> int:
    """``write``: make the scale set and say what was written, how big, and how fast."""
    started = time.perf_counter()
    paths = write_scale_set(args.outdir, total=args.total, seed=args.seed)
    elapsed = time.perf_counter() - started
    for path in paths:
        print(f"{path.name}: {path.stat().st_size:,} bytes")
    size = sum(path.stat().st_size for path in paths)
    members = sum(split_counts(args.total).values())
    print(f"wrote {members:,} members in {len(paths)} zips, {size:,} bytes, in {elapsed:.1f} s")
    return 0


def _run_timed(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of a command run to completion; fails loudly."""
    started = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return elapsed, usage.ru_maxrss * 1024


def _list_chunk(mountpoint: Path) -> tuple[float, int]:
    """(seconds, entries) to list and stat one 18,000-entry pretrain chunk folder."""
    folder = mountpoint / "bioscan5m/images" / IMGTYPE / "pretrain/00"
    started = time.perf_counter()
    names = os.listdir(folder)
    for name in names:
        os.stat(folder / name)
    return time.perf_counter() - started, len(names)


def _unmount(mountpoint: Path) -> None:
    for command in (["fusermount3", "-u", str(mountpoint)], ["fusermount", "-u", str(mountpoint)],
                    ["umount", str(mountpoint)]):
        if subprocess.run(command, capture_output=True).returncode == 0:
            break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and str(mountpoint) in Path("/proc/self/mounts").read_text():
        time.sleep(0.1)


def _measure_mounts(label: str, command: list[str], mountpoint: Path, server: str) -> list[dict]:
    """Cold mount (index built), then a warm remount; each with RSS after listing a chunk."""
    rows = []
    for phase in ("cold mount", "warm remount"):
        seconds, peak = _run_timed(command)
        listing, entries = _list_chunk(mountpoint)
        resident = rss(server_pid(mountpoint, server))
        rows.append({"tool": label, "phase": phase, "seconds": seconds, "mount_command_peak_rss": peak,
                     "server_rss_after_listing": resident, "chunk_listing_seconds": listing,
                     "chunk_entries": entries})
        _unmount(mountpoint)
    return rows


def _cmd_run(args: argparse.Namespace) -> int:
    """``run``: zipfile open vs bioscanfs cold mount, warm remount and RSS (vs ratarmount)."""
    outdir = args.outdir
    zips = sorted(outdir.glob("BIOSCAN_5M_*.zip"))
    if len(zips) != 4:
        print(f"writing the scale set ({args.total:,} members) into {outdir}", flush=True)
        zips = write_scale_set(outdir, total=args.total)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    mountpoint = work / "mnt"
    mountpoint.mkdir()
    for path in zips:  # the same warm page cache for every tool
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    results = []
    seconds, peak = _run_timed([sys.executable, "-c",
                                "import sys, zipfile\nfor p in sys.argv[1:]: zipfile.ZipFile(p)",
                                *map(str, zips)])
    results.append({"tool": "python zipfile", "phase": "open all archives", "seconds": seconds,
                    "mount_command_peak_rss": peak})
    results += _measure_mounts("bioscanfs", [sys.executable, "-m", "bioscanfs", "mount", str(outdir),
                                             str(mountpoint), "--index-dir", str(work / "index")],
                               mountpoint, "bioscanfs")
    ratarmount = None if args.no_ratarmount else find_ratarmount()
    if ratarmount:
        results += _measure_mounts("ratarmount", [ratarmount, "--index-folders", str(work / "rindex"),
                                                  *map(str, zips), str(mountpoint)],
                                   mountpoint, "ratarmount")
    shutil.rmtree(work, ignore_errors=True)
    base = results[0]["seconds"]
    if args.json:
        print(json.dumps({"members": sum(split_counts(args.total).values()), "results": results}, indent=2))
        return 0
    print(f"\n{'tool':<15} {'phase':<18} {'seconds':>8} {'vs zipfile':>10} {'peak RSS':>9} "
          f"{'server RSS':>10} {'ls+stat chunk':>14}")
    for row in results:
        server = row.get("server_rss_after_listing")
        listing = row.get("chunk_listing_seconds")
        print(f"{row['tool']:<15} {row['phase']:<18} {row['seconds']:>8.2f} {base / row['seconds']:>9.1f}x "
              f"{row['mount_command_peak_rss'] / 2**20:>7.0f}MB "
              f"{server / 2**20 if server else 0:>8.0f}MB "
              f"{(str(round(listing, 2)) + ' s / ' + str(row['chunk_entries'])) if listing else '-':>14}")
    print("\ncommand: python scripts/bench_scale.py run " + " ".join(sys.argv[2:]))
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
    write.set_defaults(handler=_cmd_write)
    run = commands.add_parser("run", help="measure mount and remount against zipfile and ratarmount")
    run.add_argument("outdir", type=Path, help="folder of the scale set (written if absent)")
    run.add_argument("--total", type=int, default=FULL_TOTAL)
    run.add_argument("--no-ratarmount", action="store_true")
    run.add_argument("--json", action="store_true")
    run.set_defaults(handler=_cmd_run)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
