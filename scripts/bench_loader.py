#!/usr/bin/env python3
"""A training loader's view: decode every image through bioscanfs, ratarmount and mount-zip vs extracted files.

Builds (or reuses) a set of JPEGs of about 256 px and 8-12 KB, the size of BIOSCAN-5M's
original_256 images, at the real member paths, written twice by CPython's zipfile with
identical members in the same order: once stored, once deflated (as ``zip -r``, 7-Zip and
``shutil.make_archive`` write JPEGs), plus an extracted copy. Each worker then loads its
share of one shuffled list of every image the way torchvision's ``pil_loader`` does,
``PIL.Image.open(f).convert("RGB")``, and makes it an array (``np.asarray``), with 0
workers (the main process) and 2 and 4 forked worker processes, as a DataLoader's
``num_workers``; torch itself is not needed.

Every row runs on every tree in turn (extracted files; bioscanfs, native engine, reading
the zip around each member as it does an archive that fits in memory, and exactly, as it
does a larger one; ratarmount; mount-zip when it is on PATH; each mount on the stored and on the deflated
zip): a cold pass (caches dropped, mounts fresh) and a warm pass over the same list.
``--rounds N`` repeats the whole table, odd rounds in reverse tree order, and reports
each figure's median. Ratios are files/s over the extracted copy's in the same row and
round.

mount-zip is not packaged in Debian 12. To include it, build it outside this repository
and put it on PATH (never commit it)::

    apt-get install libzip-dev libicu-dev libboost-dev libfuse3-dev
    git clone https://github.com/google/mount-zip /work/ext/mount-zip
    make -C /work/ext/mount-zip && cp /work/ext/mount-zip/mount-zip /usr/local/bin/

It is mounted with ``-o notrim`` so its tree keeps the members' full paths. ratarmount and
Pillow come with the ``bench`` extra (``.venv/bin/pip install -e .[test,bench]``). Run as
root, so that cold passes can drop the page cache.

``--store-latency-ms MS`` puts the whole set (zips and extracted copy) behind a stand-in
for a network file system, whose every read that misses the page cache waits MS first
(scripts/bench_store.c, compiled with gcc and libfuse3-dev on each run): what a cluster's
NFS, Lustre or GPFS costs, where a mount's reads in flight bound a loader.

    python scripts/bench_loader.py [--set DIR] [--images N] [--files N] [--workers 0,2,4] [--rounds N]
        [--no-ratarmount] [--no-mount-zip] [--no-exact] [--store-latency-ms MS] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from _benchutil import (
    BenchError,
    MountTarget,
    Target,
    bioscanfs_target,
    can_drop_caches,
    filesystem_type,
    find_ratarmount,
    fusermount,
    guest_halt_poll_ns,
    interleaved,
    load_average,
    log,
    parse_counts,
    ratarmount_target,
    run_main,
    store_command,
    time_forked,
)
from _fakeids import ProcessIds
from _zipkit import make_jpeg, split_ids, write_image_zip
from PIL import Image

from bioscanfs.layout import image_path

IMGTYPE = "original_256"
ZIP_NAME = f"BIOSCAN_5M_{IMGTYPE}.zip"
DEFAULT_IMAGES = 20_000
#: Image sides (pixels), noise (standard deviation) and quality ranges that give JPEGs
#: of 10 KB on average, 8-12 KB for nine in ten.
SIDES = ((256, 256), (256, 224), (224, 256))
NOISE = (6, 8)
QUALITY = (80, 86)
MARKER = "loader-set.json"
#: The zips' folders: the same members stored in one, deflated in the other.
METHODS = ("stored", "deflated")
EXTRACTED = "extracted"
#: Files of the list whose bytes are compared with the extracted copy on every first mount.
BYTE_CHECK_FILES = 200


# ---------------------------------------------------------------- the set

def build_set(folder: Path, images: int, seed: int = 0) -> None:
    """Write the stored zip, the deflated zip (same members, order and stamps) and the marker."""
    by_split = split_ids(ProcessIds(seed).take(images), images, seed)
    rng = np.random.default_rng([seed, 2])
    members = []
    for split, pids in by_split.items():
        for pid in pids:
            width, height = SIDES[int(rng.integers(len(SIDES)))]
            members.append((image_path(pid, split, IMGTYPE), make_jpeg(rng, width, height, pid, NOISE, QUALITY)))
    for method in METHODS:
        (folder / method).mkdir(parents=True, exist_ok=True)
        log(f"writing {method}/{ZIP_NAME}: {len(members):,} members")
        # Equal generators: write_image_zip then draws the same order and stamps for both.
        write_image_zip(folder / method / ZIP_NAME, members, np.random.default_rng([seed, 3]),
                        0.0 if method == "stored" else 1.0)
    (folder / MARKER).write_text(json.dumps({"images": images, "seed": seed}))


def open_set(folder: Path, images: int) -> Dict[str, int]:
    """Reuse or build the set in ``folder`` and its extracted copy; returns member -> size."""
    marker = folder / MARKER
    if not marker.exists():
        if folder.exists() and any(folder.iterdir()):
            raise BenchError(f"{folder}: not empty and not a loader set (no {MARKER}); give --set a new folder")
        build_set(folder, images)
    if json.loads(marker.read_text())["images"] != images:
        raise BenchError(f"{folder} holds a set of another size; give another --set folder")
    with zipfile.ZipFile(folder / "stored" / ZIP_NAME) as zf:
        sizes = {info.filename: info.file_size for info in zf.infolist()}
        if not (folder / EXTRACTED).exists():
            log("extracting the stored zip")
            partial = folder / (EXTRACTED + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            zf.extractall(partial)
            partial.rename(folder / EXTRACTED)
    return sizes


# ---------------------------------------------------------------- the loader

def load_images(paths: Sequence[str]) -> int:
    """Decode each image to an RGB array as torchvision's pil_loader (and ToTensor) do;
    returns the pixels decoded, which every tree must match. PIL is imported with this
    module, so no pass pays for the import."""
    pixels = 0
    for path in paths:
        with open(path, "rb") as fh:
            pixels += np.asarray(Image.open(fh).convert("RGB")).size // 3
    return pixels


def read_files(paths: Sequence[str]) -> int:
    """Read each file whole without decoding it (``--read raw``): what the filesystem
    alone costs, e.g. deflated members against the same members stored; returns bytes."""
    total = 0
    for path in paths:
        with open(path, "rb") as fh:
            total += len(fh.read())
    return total


#: ``--read``: what each worker does with a file; every tree must give the same count.
LOADERS: Dict[str, Callable[[Sequence[str]], int]] = {"pil": load_images, "raw": read_files}


def run_loader(root: Path, sample: Sequence[str], workers: int, loader: Callable[[Sequence[str]], int]
               ) -> Tuple[int, float]:
    """(count, seconds) of ``loader`` over ``sample`` under ``root`` with ``workers`` processes
    (0: in this process, as DataLoader(num_workers=0)); each worker takes every n-th file."""
    paths = [os.path.join(root, rel) for rel in sample]
    if workers == 0:
        started = time.perf_counter()
        count = loader(paths)
        return count, time.perf_counter() - started
    counts, seconds = time_forked(loader, [paths[i::workers] for i in range(workers)])
    return sum(counts), seconds


# ---------------------------------------------------------------- the trees

#: bioscanfs's two ways of reading an archive (``--cache-archives``), by the tree's name: the
#: bench's zip fits in memory, so ``auto`` reads it around; a package larger than a quarter
#: of the memory is read exactly, as the second tree does.
BIOSCANFS_READS = {"bioscanfs": "auto", "bioscanfs exact": "no"}


def make_targets(folder: Path, work: Path, ratarmount: Optional[str], mount_zip: Optional[str],
                 exact: bool = True) -> List[MountTarget]:
    """The mounts, one per tool and zip; bioscanfs with its native engine, both ways (or
    only as it reads this zip, without ``exact``)."""
    ways = BIOSCANFS_READS if exact else {"bioscanfs": BIOSCANFS_READS["bioscanfs"]}
    mounts = [bioscanfs_target(f"{tool} {method}", [folder / method], work / f"mnt-{tool.replace(' ', '-')}-{method}",
                               work / f"index-bioscanfs-{method}", ["--engine", "native", "--cache-archives", reads])
              for tool, reads in ways.items() for method in METHODS]
    if ratarmount:
        mounts += [ratarmount_target(f"ratarmount {method}", ratarmount, [folder / method / ZIP_NAME],
                                     work / f"mnt-ratarmount-{method}", work / f"index-ratarmount-{method}")
                   for method in METHODS]
    if mount_zip:
        for method in METHODS:
            root = work / f"mnt-mount-zip-{method}"
            mounts.append(MountTarget(f"mount-zip {method}", root,
                                      [mount_zip, "-o", "notrim", str(folder / method / ZIP_NAME), str(root)],
                                      fusermount(root)))
    for target in mounts:
        target.root.mkdir()
    return mounts


def first_mounts(mounts: List[MountTarget], extracted: Path, sample: Sequence[str]) -> Dict[str, float]:
    """Mount each tree once (indexes built), check bytes against the extracted copy, unmount;
    returns the seconds of each first mount."""
    seconds = {}
    for target in mounts:
        log(f"first mount of {target.name}")
        seconds[target.name] = target.mount()
        for rel in sample[:BYTE_CHECK_FILES]:
            if (target.root / rel).read_bytes() != (extracted / rel).read_bytes():
                raise BenchError(f"{target.name}: {rel} differs from the extracted copy")
        target.unmount()
    return seconds


def latency_store(folder: Path, work: Path, latency_ms: float) -> MountTarget:
    """``folder`` seen through scripts/bench_store.c, each read that misses the page cache
    delayed by ``latency_ms`` (mounted by ``mount()``)."""
    root = work / "store"
    root.mkdir()
    return MountTarget("store", root, store_command(work, folder, root, latency_ms), fusermount(root))


# ---------------------------------------------------------------- running

@dataclass
class Result:
    """One pass: a row (workers), cold or warm, on one tree, in one round."""

    workers: int
    pass_: str
    target: str
    round_: int
    files_per_s: float
    ratio: float = 1.0


def run_round(round_: int, workers_list: Sequence[int], targets: Sequence[Target], sample: Sequence[str],
              drop: bool, expected: Dict[str, int], loader: Callable[[Sequence[str]], int]) -> List[Result]:
    """Every row on every tree in turn, cold then warm; ratios against the extracted copy's
    pass in the same row. Odd rounds take the trees in reverse order, so that a load that
    drifts during a round does not favour the trees measured last."""
    results: List[Result] = []
    order = list(targets)[::-1] if round_ % 2 else list(targets)
    for workers, target, pass_ in interleaved(workers_list, order, drop):
        count, seconds = run_loader(target.root, sample, workers, loader)
        if expected.setdefault("count", count) != count:
            raise BenchError(f"{target.name}: {count:,} pixels or bytes, extracted {expected['count']:,}")
        results.append(Result(workers, pass_, target.name, round_, len(sample) / seconds))
        log(f"  round {round_} {workers} workers {pass_:<4} {target.name:<20} "
            f"{results[-1].files_per_s:>8,.0f} files/s  (load {load_average()})")
    reference = {(r.workers, r.pass_): r.files_per_s for r in results if r.target == EXTRACTED}
    for r in results:
        r.ratio = r.files_per_s / reference[(r.workers, r.pass_)]
    return results


def medians(results: List[Result]) -> List[dict]:
    """Per (workers, pass, tree): the median files/s and the median ratio over the rounds."""
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        groups.setdefault((r.workers, r.pass_, r.target), []).append(r)
    return [{"workers": w, "pass": p, "target": t,
             "files_per_s": round(statistics.median(r.files_per_s for r in rs), 1),
             "ratio": round(statistics.median(r.ratio for r in rs), 3), "rounds": len(rs)}
            for (w, p, t), rs in groups.items()]


# ---------------------------------------------------------------- report

def table(rows: List[dict], names: List[str]) -> str:
    """A markdown table: one line per tree, files/s (ratio vs extracted) per workers and pass."""
    by_key = {(r["workers"], r["pass"], r["target"]): r for r in rows}
    columns = list(dict.fromkeys((r["workers"], r["pass"]) for r in rows))
    lines = ["| tree | " + " | ".join(f"{w} workers, {p}" for w, p in columns) + " |",
             "|---" + "|--:" * len(columns) + "|"]
    for name in names:
        cells = []
        for workers, pass_ in columns:
            r = by_key[(workers, pass_, name)]
            cells.append(f"{r['files_per_s']:,.0f}" + ("" if name == EXTRACTED else f" ({r['ratio']:.2f})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(summary: dict, names: List[str]) -> None:
    """The set, the conditions, the table and the command."""
    s = summary["set"]
    print(f"set: {s['folder']}: {s['images']:,} JPEGs, {s['mean_kb']:.1f} KB mean ({s['min_kb']:.1f}-"
          f"{s['max_kb']:.1f}), one {ZIP_NAME} stored and one deflated ({s['deflated_ratio']:.3f} of stored); "
          f"extracted copy on {s['extracted_filesystem']}")
    print(f"machine: {summary['cpus']} CPUs, load average {summary['load_before']} before, "
          f"{summary['load_after']} after; guest halt polling {summary['guest_halt_poll_ns']} ns")
    print(f"loader ({summary['read']}): " + ("open(path, 'rb').read()" if summary["read"] == "raw" else
          "open(path, 'rb'), PIL.Image.open(f).convert('RGB'), np.asarray") + "; each sampled image once "
          f"per pass ({summary['sample_files']:,} images), one shuffled list for every tree")
    print("cold = " + ("caches dropped" if summary["caches_dropped"] else "caches NOT dropped (needs root)")
          + ", mounts fresh; warm = the same pass again; files/s (ratio vs extracted, same row and round)"
          + f"; median of {summary['rounds']} round(s)")
    print("first mount: " + ", ".join(f"{n} {t:.1f} s" for n, t in summary["first_mount_seconds"].items()))
    print()
    print(table(summary["results"], names))
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"command: {summary['command']}")


# ---------------------------------------------------------------- main

def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, dest="set_dir",
                        help="folder of the set, built there when absent "
                             "[default: ~/.cache/bioscanfs-bench/loader-IMAGES]")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                        help=f"JPEGs in the set (default {DEFAULT_IMAGES:,})")
    parser.add_argument("--files", type=int, help="images per pass, a seeded random sample (default: all)")
    parser.add_argument("--workers", type=parse_counts, default=[0, 2, 4],
                        help="worker processes per row (default 0,2,4)")
    parser.add_argument("--read", choices=sorted(LOADERS), default="pil",
                        help="pil: decode to an RGB array (default); raw: read the bytes only")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole table, report medians (default 1)")
    parser.add_argument("--no-ratarmount", action="store_true", help="leave ratarmount out")
    parser.add_argument("--no-mount-zip", action="store_true", help="leave mount-zip out")
    parser.add_argument("--no-exact", action="store_true",
                        help="leave out bioscanfs reading exactly (--cache-archives no, as for archives larger "
                             "than a quarter of the memory)")
    parser.add_argument("--store-latency-ms", type=float,
                        help="read the set through a stand-in for a network file system whose reads that miss "
                             "the page cache wait this long (see the docstring)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample (default 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser.parse_args(argv)


def set_summary(folder: Path, sizes: Dict[str, int]) -> dict:
    """What the set holds: image count and sizes, and how much deflating saved."""
    kb = np.array(list(sizes.values())) / 1000
    stored, deflated = ((folder / method / ZIP_NAME).stat().st_size for method in METHODS)
    return {"folder": str(folder), "images": len(sizes), "mean_kb": float(kb.mean()), "min_kb": float(kb.min()),
            "max_kb": float(kb.max()), "deflated_ratio": deflated / stored,
            "extracted_filesystem": filesystem_type(folder / EXTRACTED)}


def measure(args: argparse.Namespace, folder: Path, sample: List[str], summary: dict) -> List[Target]:
    """Mount every tree once, then run the rounds; fills ``summary`` and returns the trees in column order."""
    ratarmount = None if args.no_ratarmount else find_ratarmount()
    mount_zip = None if args.no_mount_zip else shutil.which("mount-zip")
    if not ratarmount and not args.no_ratarmount:
        summary["notes"].append("ratarmount not installed (pip install -e .[bench]): left out")
    if not mount_zip and not args.no_mount_zip:
        summary["notes"].append("mount-zip not on PATH (see this script's docstring): left out")
    drop = can_drop_caches()
    summary["caches_dropped"] = drop
    # On the set's own disk: an index in a tmpfs would dodge drop_caches.
    with tempfile.TemporaryDirectory(prefix=".run-", dir=folder) as tmp:
        store = latency_store(folder, Path(tmp), args.store_latency_ms) if args.store_latency_ms else None
        mounts: List[MountTarget] = []
        try:
            if store:
                store.mount()
                folder = store.root
                summary["store_latency_ms"] = args.store_latency_ms
            targets: List[Target] = [Target(EXTRACTED, folder / EXTRACTED)]
            mounts = make_targets(folder, Path(tmp), ratarmount, mount_zip, exact=not args.no_exact)
            summary["first_mount_seconds"] = first_mounts(mounts, folder / EXTRACTED, sample)
            targets += mounts
            expected: Dict[str, int] = {}
            results = []
            for round_ in range(args.rounds):
                results += run_round(round_, args.workers, targets, sample, drop, expected, LOADERS[args.read])
        finally:
            for target in mounts + ([store] if store else []):
                target.close()
    summary["results"] = medians(results)
    summary["passes"] = [r.__dict__ for r in results]
    return targets


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    folder = (args.set_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
              / "bioscanfs-bench" / f"loader-{args.images}").absolute()
    sizes = open_set(folder, args.images)
    names = sorted(sizes)
    picks = np.random.default_rng(args.seed).permutation(len(names))[:args.files]
    sample = [names[i] for i in picks.tolist()]
    summary: dict = {
        "command": shlex.join([sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "set": set_summary(folder, sizes), "cpus": os.cpu_count(), "guest_halt_poll_ns": guest_halt_poll_ns(),
        "rounds": args.rounds, "read": args.read, "sample_files": len(sample), "load_before": load_average(),
        "notes": [],
    }
    targets = measure(args, folder, sample, summary)
    summary["load_after"] = load_average()
    if summary["set"]["extracted_filesystem"] == "tmpfs":
        summary["notes"].append("the extracted copy is on tmpfs: its cold passes read from RAM")
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_report(summary, [t.name for t in targets])
    return 0


if __name__ == "__main__":
    run_main(main, "bench_loader")
