#!/usr/bin/env python3
"""The multi-GB metadata CSV through the mount vs CPython's zipfile, in one run.

Builds (or reuses) a metadata zip whose CSV member is deflated and about 1.5 GB, mounts
it, and measures:

- a sequential read of the whole member in 1 MiB pieces, in-process through ``zipfile``
  (the same zlib family, no FUSE), then through the mount (page cache dropped first, when
  root): once with nothing else in the timed loop, and once with the md5 that the
  bioscan-dataset loader computes on every dataset creation (the same in both loops);
- random 4 KiB reads at random offsets through the mount (page cache dropped first, when
  root), on a fresh mount and again after the sequential pass built the seek points;
- the daemon's RSS, sampled every 20 ms throughout, and its high-water mark.

    python scripts/bench_csv.py [--dir DIR] [--csv-bytes N] [--reads N] [--json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from _benchutil import bioscanfs_target, can_drop_caches, drop_caches, rss, server_pid
from make_fake_bioscan import make_set

from bioscanfs.layout import METADATA_CSV, METADATA_ZIP

CHUNK = 1 << 20


class RssSampler(threading.Thread):
    """Samples a process's VmRSS until stopped; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            try:
                self.peak = max(self.peak, rss(self.pid))
            except OSError:
                return

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def read_stream(stream) -> None:
    while stream.read(CHUNK):
        pass


def md5_stream(stream) -> str:
    digest = hashlib.md5()
    while block := stream.read(CHUNK):
        digest.update(block)
    return digest.hexdigest()


def random_reads(path: Path, size: int, count: int, seed: int) -> List[float]:
    """Latencies of 4 KiB preads at random offsets, in seconds."""
    rng = random.Random(seed)
    latencies = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(count):
            offset = rng.randrange(0, size - 4096)
            started = time.perf_counter()
            if len(os.pread(fd, 4096, offset)) != 4096:
                raise SystemExit(f"short read at {offset}")
            latencies.append(time.perf_counter() - started)
    finally:
        os.close(fd)
    return latencies


def percentiles(latencies: List[float]) -> Dict[str, float]:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50_ms": pick(0.5), "p95_ms": pick(0.95), "max_ms": ordered[-1] * 1000}


def zipfile_passes(archive: Path) -> Tuple[zipfile.ZipInfo, str, Dict[str, float]]:
    """The CSV member's entry, its md5, and the seconds of reading it in-process with zipfile
    (read only, and read + md5)."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(METADATA_CSV)
        seconds = {}
        for kind, consume in (("read", read_stream), ("md5", md5_stream)):
            started = time.perf_counter()
            with zf.open(info) as member:
                expected = consume(member)
            seconds[kind] = time.perf_counter() - started
    return info, expected, seconds


def mount_passes(folder: Path, size: int, expected: str, reads: int, drop: bool) -> Tuple[dict, Dict[str, float]]:
    """Random reads on a fresh mount, the two sequential passes, random reads again, and the
    daemon's RSS peak; returns (results, sequential seconds)."""
    results: Dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-csv-") as tmp:
        root = Path(tmp) / "mnt"
        root.mkdir()
        target = bioscanfs_target("bioscanfs", [folder], root, Path(tmp) / "index")
        try:
            target.mount()
            sampler = RssSampler(server_pid(root, "bioscanfs"))
            sampler.start()
            path = root / METADATA_CSV
            if drop:
                drop_caches()
            results["random_fresh_mount"] = percentiles(random_reads(path, size, reads, seed=1))
            seconds = {}
            for kind, consume in (("read", read_stream), ("md5", md5_stream)):
                if drop:
                    drop_caches()
                started = time.perf_counter()
                with open(path, "rb") as member:
                    got = consume(member)
                seconds[kind] = time.perf_counter() - started
            if got != expected:
                raise SystemExit(f"md5 through the mount {got} != zipfile {expected}")
            if drop:
                drop_caches()
            results["random_after_sequential"] = percentiles(random_reads(path, size, reads, seed=2))
            results["daemon_rss_peak_mb"] = sampler.stop() / 2**20
        finally:
            target.close()
    return results, seconds


#: Issue 15's targets: a sequential read at least zipfile's speed, random reads' p95, daemon RSS.
TARGET_RATIO, TARGET_P95_MS, TARGET_RSS_MB = 1.0, 50, 400


def print_results(results: dict, reads: int) -> None:
    """One line per measurement, with its target."""
    print(f"CSV member: {results['csv_bytes']:,} bytes ({results['compressed_bytes']:,} deflated); "
          f"caches dropped: {results['caches_dropped']}")
    for kind, what in (("read", "sequential read"), ("md5", "sequential read + md5")):
        seq = results[f"sequential_{kind}"]
        print(f"{what}: zipfile in-process {seq['zipfile_mb_s']:.0f} MB/s, "
              f"through the mount {seq['mount_mb_s']:.0f} MB/s, ratio {seq['ratio']:.2f} (target >= {TARGET_RATIO})")
    for key in ("random_fresh_mount", "random_after_sequential"):
        r = results[key]
        print(f"random 4 KiB reads ({key.replace('_', ' ')}, {reads}): p50 {r['p50_ms']:.1f} ms, "
              f"p95 {r['p95_ms']:.1f} ms (target <= {TARGET_P95_MS}), max {r['max_ms']:.1f} ms")
    print(f"daemon RSS peak (sampled every 20 ms): {results['daemon_rss_peak_mb']:.0f} MB (target <= {TARGET_RSS_MB})")
    print("command: python scripts/bench_csv.py " + " ".join(sys.argv[1:]))


def main(argv: Optional[List[str]] = None) -> int:
    """Build or reuse the metadata zip, measure zipfile, then the mount; print or dump JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache/bioscanfs-bench/csv")
    parser.add_argument("--csv-bytes", type=int, default=1_500_000_000)
    parser.add_argument("--reads", type=int, default=300, help="random 4 KiB reads per pass")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    archive = args.dir / METADATA_ZIP
    if not archive.exists():
        print(f"writing a {args.csv_bytes:,}-byte CSV into {archive}", file=sys.stderr, flush=True)
        make_set(args.dir, images=16, imgtypes=(), csv_bytes=args.csv_bytes)
    info, expected, zipfile_seconds = zipfile_passes(archive)
    size, drop = info.file_size, can_drop_caches()
    results, mount_seconds = mount_passes(args.dir, size, expected, args.reads, drop)
    results.update({"csv_bytes": size, "compressed_bytes": info.compress_size, "caches_dropped": drop})
    for kind in ("read", "md5"):
        results[f"sequential_{kind}"] = {
            "zipfile_mb_s": size / zipfile_seconds[kind] / 1e6, "mount_mb_s": size / mount_seconds[kind] / 1e6,
            "ratio": zipfile_seconds[kind] / mount_seconds[kind],
        }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_results(results, args.reads)
    return 0

if __name__ == "__main__":
    sys.exit(main())
