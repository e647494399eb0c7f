#!/usr/bin/env python3
"""Where the views' build spends its CPU besides reading the CSV: the plan of each batch
(``views._read``: the work that overlaps the CSV's inflate and parse), the plan after
the last batch (``views._plan``) and the tree's layout (``merge.ViewsBuilder``), on the
scale set of scripts/bench_views.py.

The image tree is mapped from INDEX_DIR (built there first when missing, ``--views
none``); the CSV's batches are read once through the real path (``views.piped``,
``views.read_batches``) and kept as an Arrow file beside the index, so that later runs
time the plan alone. Prints the seconds of each step and a digest of the plan and the links
(equal digests: the same views), and with ``--profile`` the cProfile of both steps.

    python scripts/bench_views_plan.py SET_DIR INDEX_DIR [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import resource
import sys
import time
from pathlib import Path
from typing import Any, List

import numpy as np

from bioscanfs import views
from bioscanfs.collection import open_tree
from bioscanfs.discover import find_archives
from bioscanfs.layout import METADATA_CSV
from bioscanfs.merge import ViewsBuilder
from bioscanfs.reader import Reader


def csv_batches(tree: Any, kept: List[Any], cached: Path) -> List[Any]:
    """The CSV's batches as ``views.read_batches`` gives them, read back from ``cached``
    (written from the metadata zip the first time)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    if not cached.exists():
        member = tree.member(views.csv_member(tree))
        reader = Reader(kept)
        with views.piped(lambda sink: reader.copy_to(member, METADATA_CSV, sink)) as stream:
            batches = views.read_batches(stream)
            first = next(batches)
            with ipc.new_stream(str(cached), first.schema) as out:
                out.write_batch(first)
                for batch in batches:
                    out.write_batch(batch)
    with ipc.open_stream(pa.memory_map(str(cached))) as got:
        return list(got)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set_dir")
    parser.add_argument("index_dir")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    specs, _ = find_archives([args.set_dir])
    tree, kept = open_tree(specs, args.index_dir, views=())
    tree.verify_all()
    batches = csv_batches(tree, kept, Path(args.index_dir) / "views-batches.arrow")
    profile = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profile:
        profile.enable()
    images = views._Images(tree)
    planned_batches, found = views._read(iter(batches), images, views.RANKS)
    read = time.perf_counter()
    plan = views._plan(images, planned_batches, found, views.RANKS, 0)
    planned = time.perf_counter()
    builder = ViewsBuilder(tree, plan, len(kept))
    built = time.perf_counter()
    if profile:
        profile.disable()
    digest = hashlib.sha256(plan.targets.astype(np.int64).tobytes() + plan.counts.astype(np.int64).tobytes()
                            + repr(plan.dirs).encode() + plan.classes + builder._links.tobytes()).hexdigest()
    print(f"batches {read - started:.2f} s, plan after them {planned - read:.2f} s, "
          f"ViewsBuilder {built - planned:.2f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB, digest {digest[:16]}")
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
