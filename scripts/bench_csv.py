#!/usr/bin/env python3
"""The multi-GB metadata CSV through the mount vs CPython's zipfile, in one run.

Builds (or reuses) a metadata zip whose CSV member is deflated and about 1.5 GB, mounts
it, and measures:

- a sequential read of the whole member in 1 MiB pieces, in-process through ``zipfile``
  (the same zlib family, no FUSE), then through the mount, back to back, page cache
  dropped before each when root: once with nothing else in the timed loop, and once with
  the md5 that the bioscan-dataset loader computes on every dataset creation (the same in
  both loops); ``--rounds`` times, interleaved, the ratio being the median of the rounds';
- random 4 KiB reads at random offsets through the mount (page cache dropped first, when
  root), on a fresh mount and again after the sequential pass built the seek points;
- the daemon's RSS, sampled every 20 ms throughout, and its high-water mark.

    python scripts/bench_csv.py [--dir DIR] [--csv-bytes N] [--reads N] [--rounds N] [--json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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


#: The sequential passes: (name, what the timed loop does with the stream).
KINDS = (("read", read_stream), ("md5", md5_stream))


def timed_pass(consume: Callable, opener: Callable, drop: bool) -> Tuple[float, object]:
    """Seconds of ``consume`` over the stream ``opener`` gives (caches dropped first, when
    allowed: both sides read the archive from disk), and what it returned."""
    if drop:
        drop_caches()
    started = time.perf_counter()
    with opener() as member:
        got = consume(member)
    return time.perf_counter() - started, got


def sequential_rounds(archive: Path, path: Path, rounds: int, drop: bool) -> Dict[str, Dict[str, List[float]]]:
    """Each round, for each kind: in-process zipfile, then the mount, back to back, so that
    the machine's noise hits both alike; the seconds of each, by kind and side."""
    seconds = {kind: {"zipfile": [], "mount": []} for kind, _ in KINDS}
    with zipfile.ZipFile(archive) as zf:
        for _ in range(rounds):
            for kind, consume in KINDS:
                in_process, expected = timed_pass(consume, lambda: zf.open(METADATA_CSV), drop)
                mounted, got = timed_pass(consume, lambda: open(path, "rb"), drop)
                if got != expected:
                    raise SystemExit(f"md5 through the mount {got} != zipfile {expected}")
                seconds[kind]["zipfile"].append(in_process)
                seconds[kind]["mount"].append(mounted)
    return seconds


def mount_passes(archive: Path, size: int, reads: int, rounds: int, drop: bool) -> dict:
    """Random reads on a fresh mount, the sequential rounds, random reads again, and the
    daemon's RSS peak."""
    results: Dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-csv-") as tmp:
        root = Path(tmp) / "mnt"
        root.mkdir()
        target = bioscanfs_target("bioscanfs", [archive.parent], root, Path(tmp) / "index")
        try:
            target.mount()
            sampler = RssSampler(server_pid(root, "bioscanfs"))
            sampler.start()
            path = root / METADATA_CSV
            if drop:
                drop_caches()
            results["random_fresh_mount"] = percentiles(random_reads(path, size, reads, seed=1))
            seconds = sequential_rounds(archive, path, rounds, drop)
            for kind, _ in KINDS:
                side = seconds[kind]
                results[f"sequential_{kind}"] = {
                    "zipfile_mb_s": size / statistics.median(side["zipfile"]) / 1e6,
                    "mount_mb_s": size / statistics.median(side["mount"]) / 1e6,
                    "ratios": [z / m for z, m in zip(side["zipfile"], side["mount"])],
                }
                results[f"sequential_{kind}"]["ratio"] = statistics.median(results[f"sequential_{kind}"]["ratios"])
            if drop:
                drop_caches()
            results["random_after_sequential"] = percentiles(random_reads(path, size, reads, seed=2))
            results["daemon_rss_peak_mb"] = sampler.stop() / 2**20
        finally:
            target.close()
    return results


#: Issue 15's targets: a sequential read at least zipfile's speed, random reads' p95, daemon RSS.
TARGET_RATIO, TARGET_P95_MS, TARGET_RSS_MB = 1.0, 50, 400


def print_results(results: dict, reads: int) -> None:
    """One line per measurement, with its target."""
    print(f"CSV member: {results['csv_bytes']:,} bytes ({results['compressed_bytes']:,} deflated); "
          f"caches dropped: {results['caches_dropped']}")
    for kind, what in (("read", "sequential read"), ("md5", "sequential read + md5")):
        seq = results[f"sequential_{kind}"]
        rounds = ", ".join(f"{r:.2f}" for r in seq["ratios"])
        print(f"{what}: zipfile in-process {seq['zipfile_mb_s']:.0f} MB/s, through the mount "
              f"{seq['mount_mb_s']:.0f} MB/s (medians), ratio {seq['ratio']:.2f}, median of the rounds' "
              f"{rounds} (target >= {TARGET_RATIO})")
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
    parser.add_argument("--rounds", type=int, default=3, help="sequential passes of each side, interleaved")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    archive = args.dir / METADATA_ZIP
    if not archive.exists():
        print(f"writing a {args.csv_bytes:,}-byte CSV into {archive}", file=sys.stderr, flush=True)
        make_set(args.dir, images=16, imgtypes=(), csv_bytes=args.csv_bytes)
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(METADATA_CSV)
    drop = can_drop_caches()
    results = mount_passes(archive, info.file_size, args.reads, args.rounds, drop)
    results.update({"csv_bytes": info.file_size, "compressed_bytes": info.compress_size, "caches_dropped": drop})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_results(results, args.reads)
    return 0

if __name__ == "__main__":
    sys.exit(main())
