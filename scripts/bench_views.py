#!/usr/bin/env python3
"""The taxonomic views at full scale: the cropped_256 scale set (scripts/bench_scale.py)
plus a metadata zip whose deflated CSV has a row for each of its images, 23 columns, and
labels of realistic counts (about 20 orders to 320,000 BINs; species only outside
pretrain and other_heldout, as in BIOSCAN-5M's splits).

Measures, in one run, views against no views on the same set:

- ``bioscanfs index --views none`` (the image tree), then ``--views all`` in the same
  index folder (the views alone, built from the mapped image tree): time and peak RSS;
- the index bytes the views add, per image and per rank;
- warm remount (``bioscanfs mount`` until it returns), interleaved, best and median;
- walking views/species/cropped_256/train against bioscan5m/images/cropped_256/train
  (os.walk and a stat per file; page cache, dentries and inodes dropped first, when root);
- the daemon's RSS after listing a chunk folder (a stat per file), after a warm remount
  and after a cold mount (the index built by ``bioscanfs mount`` into an empty folder).

    python scripts/bench_views.py DIR [--total N] [--rounds N]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from _benchutil import can_drop_caches, drop_caches, fusermount, rss, run_measured, server_pid, tree_bytes
from bench_scale import FULL_TOTAL, scale_ids, write_scale_set

from bioscanfs.layout import CSV_COLUMNS, METADATA_CSV, METADATA_ZIP, SPLIT_CHUNK_CHARS
from bioscanfs.mounts import is_mounted

#: Distinct labels per rank, and the share of rows labelled at that rank (outside the
#: splits that never have one: see ``_labelled``).
CARDINALITY = {"order": 20, "family": 800, "subfamily": 1_800, "genus": 7_600, "species": 8_400,
               "dna_bin": 320_000}
LABELLED = {"order": 1.0, "family": 0.97, "subfamily": 0.6, "genus": 0.5, "species": 1.0, "dna_bin": 0.95}
_BARCODES = 64


def _labelled(rank: str, splits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    share = rng.random(len(splits)) < LABELLED[rank]
    if rank == "species":   # the closed and open world splits are labelled to species, pretrain is not
        share &= (splits != "pretrain") & (splits != "other_heldout")
    return share


def write_csv(path: Path, by_split: Dict[str, List[str]], seed: int = 0) -> int:
    """The CSV of every image (pyarrow's writer), deflated into the metadata zip; rows."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng([seed, 7])
    pids = [pid for split in by_split for pid in by_split[split]]
    splits = np.array([split for split in by_split for _ in by_split[split]])
    columns = {name: pa.nulls(len(pids), pa.string()).fill_null("") for name in CSV_COLUMNS}
    columns["processid"] = pa.array(pids)
    columns["split"] = pa.array(splits)
    columns["chunk"] = pa.array([hashlib.md5(p.encode()).hexdigest()[:max(SPLIT_CHUNK_CHARS[s], 2)]
                                 for p, s in zip(pids, splits.tolist())])
    for rank, count in CARDINALITY.items():
        ids = np.minimum((count * rng.random(len(pids)) ** 2).astype(np.int64), count - 1)   # a few common ones
        names = pa.array([f"{rank.capitalize()}{i} {'sp.' if rank == 'species' else 'x'}{i % 97}" for i in
                          range(count)])
        labels = names.take(pa.array(ids))
        columns[rank] = pa.array(np.where(_labelled(rank, splits, rng), labels.to_numpy(zero_copy_only=False), ""))
    acgt = np.frombuffer(b"ACGT", np.uint8)
    barcodes = pa.array([acgt[rng.integers(0, 4, 658)].tobytes().decode() for _ in range(_BARCODES)],
                        pa.large_string())
    columns["dna_barcode"] = barcodes.take(pa.array(rng.integers(0, _BARCODES, len(pids))))
    columns.update(phylum=pa.array(["Arthropoda"] * len(pids)), **{"class": pa.array(["Insecta"] * len(pids))})
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        plain = Path(tmp) / "metadata.csv"
        pacsv.write_csv(pa.table({name: columns[name] for name in CSV_COLUMNS}), plain,
                        pacsv.WriteOptions(quoting_style="needed"))
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.write(plain, METADATA_CSV)
    return len(pids)


def run(command: List[str]) -> Tuple[float, int, str]:
    """(seconds, peak RSS in bytes, output) of one child process (``run_measured``: its own
    peak, not this process's)."""
    with tempfile.TemporaryFile() as out:
        elapsed, peak, status = run_measured(command, stdout=out.fileno())
        out.seek(0)
        text = out.read().decode(errors="replace")
    if status:
        raise SystemExit(f"{' '.join(command)} failed:\n{text}")
    return elapsed, peak, text


def bioscanfs(*args: object) -> List[str]:
    return [sys.executable, "-m", "bioscanfs", *map(str, args)]


def unmount(point: Path) -> None:
    for command in fusermount(point):
        if subprocess.run(command, capture_output=True).returncode == 0 or not is_mounted(str(point)):
            break


def daemon_rss_after_listing(point: Path) -> int:
    """The serving daemon's RSS after a stat of every file of one chunk folder, in bytes."""
    with os.scandir(point / "bioscan5m/images/cropped_256/pretrain/00") as entries:
        for entry in entries:
            entry.stat()
    return rss(server_pid(point, "bioscanfs"))


def walk(root: Path) -> int:
    """Files below ``root``, each stat'ed (as an image loader's scan would)."""
    files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            os.stat(os.path.join(folder, name))
            files += 1
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--total", type=int, default=FULL_TOTAL)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = args.dir / f"set-{args.total}"
    if not (folder / METADATA_ZIP).exists():
        started = time.perf_counter()
        if not any(folder.glob("BIOSCAN_5M_cropped_256_*.zip")):
            write_scale_set(folder, total=args.total)
        rows = write_csv(folder / METADATA_ZIP, scale_ids(args.total))
        print(f"wrote the set and a CSV of {rows:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
    index = args.dir / f"index-{args.total}"
    for old in index.glob("*") if index.exists() else []:
        old.unlink()
    seconds, peak, _ = run(bioscanfs("index", folder, "--index-dir", index, "--views", "none"))
    images_file = max(index.glob("*.tree"), key=lambda p: p.stat().st_mtime)
    images_bytes = tree_bytes(images_file)
    print(f"image tree (--views none): {seconds:.1f} s, peak RSS {peak / 1e6:.0f} MB, "
          f"{images_bytes:,} bytes", flush=True)
    seconds, peak, _ = run(bioscanfs("index", folder, "--index-dir", index, "--views", "all"))
    views_bytes = tree_bytes(max(index.glob("*.tree"), key=lambda p: p.stat().st_mtime))
    added = views_bytes - images_bytes
    print(f"views of 6 ranks from the mapped image tree: {seconds:.1f} s, peak RSS {peak / 1e6:.0f} MB; "
          f"index {views_bytes:,} bytes, +{added:,}: {added / args.total:.1f} bytes per image, "
          f"{added / args.total / 6:.1f} per image and rank", flush=True)
    point = args.dir / "mnt"
    point.mkdir(exist_ok=True)
    remounts: Dict[str, List[float]] = {"none": [], "all": []}
    for _ in range(args.rounds):
        for views in remounts:
            seconds, _, _ = run(bioscanfs("mount", folder, point, "--index-dir", index, "--views", views))
            remounts[views].append(seconds)
            unmount(point)
    print("warm remount (until mount returns), " + "; ".join(
        f"--views {v}: best {min(t):.2f} s, median {statistics.median(t):.2f} s" for v, t in remounts.items()))
    run(bioscanfs("mount", folder, point, "--index-dir", index, "--views", "all"))
    try:
        warm_rss = daemon_rss_after_listing(point)
        walks = {}
        for name in ("bioscan5m/images/cropped_256/train", "views/species/cropped_256/train"):
            if can_drop_caches():
                drop_caches()
            started = time.perf_counter()
            files = walk(point / name)
            walks[name] = (files, time.perf_counter() - started)
            print(f"walk + stat {name}: {files:,} files in {walks[name][1]:.2f} s, "
                  f"{files / walks[name][1]:,.0f} files/s ({'cold' if can_drop_caches() else 'warm'})", flush=True)
        rates = [files / seconds for files, seconds in walks.values()]
        print(f"views / images walk rate: {rates[1] / rates[0]:.2f}")
    finally:
        unmount(point)
    cold_index = args.dir / f"index-{args.total}-cold"
    for old in cold_index.glob("*") if cold_index.exists() else []:
        old.unlink()
    seconds, _, _ = run(bioscanfs("mount", folder, point, "--index-dir", cold_index, "--views", "all"))
    try:
        print(f"daemon RSS after listing a chunk: {daemon_rss_after_listing(point) / 1e6:.0f} MB after a cold "
              f"mount with views ({seconds:.1f} s), {warm_rss / 1e6:.0f} MB after a warm remount", flush=True)
    finally:
        unmount(point)
    print(f"peak RSS of this script: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
