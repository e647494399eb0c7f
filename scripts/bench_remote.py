#!/usr/bin/env python3
"""Remote archives (issue 10 targets) over a loopback HTTP server with added latency.

Writes ARCHIVES stored zips of ~8 KiB members (20,000 in all by default), serves them with
scripts/_rangeserver.py (the server tests/test_remote.py checks), delaying each ranged
reply by --latency, then measures in one run:

- requests per archive at a cold mount (target <= 3) and a warm remount (<= 1);
- bytes fetched / bytes served for --sample random members (<= 1.5);
- files/s of --threads concurrent readers vs 1 reader, through ``Collection.read`` and
  through a real mount (>= 10x). Each reader run uses its own members, so no cache helps.

    python scripts/bench_remote.py [--members N] [--archives K] [--latency S] [--json]
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from _rangeserver import Request, Site, serving
from _zipkit import dos_stamp
from bench_scale import write_stored_zip

from bioscanfs import Collection

#: A member: (path in the tree, size, CRC-32) - what a read must return.
Member = Tuple[str, int, int]


def write_set(folder: Path, members: int, archives: int, size: int, seed: int) -> List[Member]:
    """``archives`` stored zips holding ``members`` members of ~``size`` random bytes in all."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    dos_time, dos_date = dos_stamp(2024, 5, 14, 9, 30)
    out: List[Member] = []
    per = -(-members // archives)
    for a in range(archives):
        names, payloads = [], []
        for i in range(a * per, min((a + 1) * per, members)):
            names.append(f"bioscan5m/images/cropped_256/train/{i % 64:02x}/member{i:06d}.jpg".encode())
            payloads.append(rng.randbytes(size + rng.randrange(-size // 8, size // 8)))
        write_stored_zip(folder / f"BIOSCAN_5M_cropped_256_part{a:02d}.zip", names, payloads, dos_time, dos_date)
        out += [(n.decode(), len(p), zlib.crc32(p)) for n, p in zip(names, payloads)]
    return out


def per_archive(requests: Sequence[Request]) -> Dict[str, int]:
    """Requests per archive file; folder listings are left out."""
    counts: Dict[str, int] = {}
    for r in requests:
        if not r.path.endswith("/"):
            name = r.path.rpartition("/")[2]
            counts[name] = counts.get(name, 0) + 1
    return counts


def cli(*args: object) -> None:
    """``python -m bioscanfs ARGS``; a failure stops the benchmark with its output."""
    done = subprocess.run([sys.executable, "-m", "bioscanfs", *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"bioscanfs {' '.join(map(str, args))} failed:\n{done.stdout}{done.stderr}")


def timed_reads(read: Callable[[str], bytes], members: Sequence[Member], threads: int) -> float:
    """Files/s reading every member with ``threads`` readers; each read is checked by CRC."""
    def one(member: Member) -> None:
        data = read(member[0])
        if len(data) != member[1] or zlib.crc32(data) != member[2]:
            raise SystemExit(f"{member[0]}: wrong bytes")

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, members))
    return len(members) / (time.perf_counter() - started)


def fetched_bytes(site: Site, mark: int) -> int:
    return sum(r.sent for r in site.since(mark) if r.method == "GET" and r.range)


def run(args: argparse.Namespace, work: Path) -> Dict[str, float]:
    members = write_set(work / "www" / "bioscan", args.members, args.archives, args.size, args.seed)
    samples = random.Random(args.seed).sample(members, 4 * args.sample)
    api_one, api_many, fs_one, fs_many = (samples[i::4] for i in range(4))
    index_dir, point = work / "index", work / "mnt"
    point.mkdir()
    results: Dict[str, float] = {}
    with serving(work / "www") as site:
        site.delay = args.latency
        url = site.url()
        cli("mount", url, point, "--index-dir", index_dir)
        cli("umount", point)
        results["cold_requests_per_archive"] = max(per_archive(site.since(0)).values())
        mark = site.mark()
        cli("mount", url, point, "--index-dir", index_dir)
        try:
            results["warm_requests_per_archive"] = max(per_archive(site.since(mark)).values())
            results["mount_1_files_s"] = timed_reads(lambda p: (point / p).read_bytes(), fs_one, 1)
            results["mount_n_files_s"] = timed_reads(lambda p: (point / p).read_bytes(), fs_many, args.threads)
        finally:
            cli("umount", point)
        with Collection(url, index_dir=str(index_dir)) as collection:
            mark = site.mark()
            results["api_1_files_s"] = timed_reads(collection.read, api_one, 1)
            served = sum(m[1] for m in api_one)
            results["fetched_over_served"] = fetched_bytes(site, mark) / served
            results["api_n_files_s"] = timed_reads(collection.read, api_many, args.threads)
    results["api_speedup"] = results["api_n_files_s"] / results["api_1_files_s"]
    results["mount_speedup"] = results["mount_n_files_s"] / results["mount_1_files_s"]
    return results


def table(args: argparse.Namespace, r: Dict[str, float]) -> str:
    rows = [
        ("requests per archive, cold mount", f"{r['cold_requests_per_archive']:.0f}", "<= 3",
         r["cold_requests_per_archive"] <= 3),
        ("requests per archive, warm remount", f"{r['warm_requests_per_archive']:.0f}", "<= 1",
         r["warm_requests_per_archive"] <= 1),
        (f"bytes fetched / served, {args.sample} random members", f"{r['fetched_over_served']:.3f}", "<= 1.5",
         r["fetched_over_served"] <= 1.5),
        (f"Collection.read files/s, 1 -> {args.threads} readers",
         f"{r['api_1_files_s']:.0f} -> {r['api_n_files_s']:.0f} ({r['api_speedup']:.1f}x)", ">= 10x",
         r["api_speedup"] >= 10),
        (f"mount files/s, 1 -> {args.threads} readers",
         f"{r['mount_1_files_s']:.0f} -> {r['mount_n_files_s']:.0f} ({r['mount_speedup']:.1f}x)", ">= 10x",
         r["mount_speedup"] >= 10),
    ]
    width = max(len(row[0]) for row in rows)
    value_width = max(len(row[1]) for row in rows)
    lines = [f"{'measure':<{width}}  {'value':<{value_width}}  {'target':<7}  met",
             f"{'-' * width}  {'-' * value_width}  {'-' * 7}  ---"]
    lines += [f"{name:<{width}}  {value:<{value_width}}  {target:<7}  {'yes' if ok else 'NO'}"
              for name, value, target, ok in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=20000, help="members in all (default 20000)")
    parser.add_argument("--archives", type=int, default=4, help="zips to spread them over (default 4)")
    parser.add_argument("--size", type=int, default=8192, help="mean member size in bytes (default 8192)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added to each ranged reply")
    parser.add_argument("--sample", type=int, default=500, help="members per reader run (default 500)")
    parser.add_argument("--threads", type=int, default=16, help="concurrent readers (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if 4 * args.sample > args.members:
        parser.error("--members must be at least 4 x --sample (each reader run has its own members)")
    with tempfile.TemporaryDirectory(prefix="bench_remote-") as tmp:
        results = run(args, Path(tmp))
    if args.json:
        print(json.dumps({"settings": vars(args), "results": results}, indent=2))
    else:
        print(f"{args.members} stored members of ~{args.size} B in {args.archives} zips, "
              f"{args.latency * 1000:.0f} ms added to each ranged reply, loopback HTTP\n")
        print(table(args, results))
    print("\n$ " + shlex.join([sys.executable, *sys.argv]), file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
