#!/usr/bin/env python3
"""Where the views' build spends its time after the CSV: the plan (``views._plan``) and
the tree's layout (``merge.ViewsBuilder``), on the scale set of scripts/bench_views.py.

The image tree is mapped from INDEX_DIR (built there first when missing, ``--views
none``); the CSV's needed columns are read once through the real path (``views.piped``,
``views.read_csv``) and kept as an Arrow file beside the index, so that later runs time
the plan alone. Prints the seconds of each step and a digest of the plan and the links
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


def csv_table(tree: Any, kept: List[Any], cached: Path) -> Any:
    """The CSV's columns as ``views.read_csv`` gives them, read back from ``cached``
    (written from the metadata zip the first time)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    if not cached.exists():
        member = tree.member(views.csv_member(tree))
        reader = Reader(kept)
        with views.piped(lambda sink: reader.copy_to(member, METADATA_CSV, sink)) as stream:
            table = views.read_csv(stream)
        with ipc.new_stream(str(cached), table.schema) as out:   # a stream: each block keeps its dictionaries
            for batch in table.to_batches():
                out.write_batch(batch)
    with ipc.open_stream(pa.memory_map(str(cached))) as got:
        return got.read_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set_dir")
    parser.add_argument("index_dir")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    specs, _ = find_archives([args.set_dir])
    tree, kept = open_tree(specs, args.index_dir, views=())
    tree.verify_all()
    table = csv_table(tree, kept, Path(args.index_dir) / "views-csv.arrow")
    profile = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profile:
        profile.enable()
    plan = views._plan(tree, table, views.RANKS, 0)
    planned = time.perf_counter()
    builder = ViewsBuilder(tree, plan, len(kept))
    built = time.perf_counter()
    if profile:
        profile.disable()
    digest = hashlib.sha256(plan.targets.astype(np.int64).tobytes() + plan.counts.astype(np.int64).tobytes()
                            + repr(plan.dirs).encode() + plan.classes + builder._links.tobytes()).hexdigest()
    print(f"plan {planned - started:.2f} s, ViewsBuilder {built - planned:.2f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB, digest {digest[:16]}")
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
