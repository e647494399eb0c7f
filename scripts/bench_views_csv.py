#!/usr/bin/env python3
"""Which CSV reader the views are built with: CPython's csv module against pyarrow's
multithreaded reader, on the metadata CSV, side by side in one run.

Both read the same decompressed CSV from one file (in the page cache after the first
pass), keep only the columns the views need (processid, the six ranks, split, chunk)
and end with them as columns; rounds alternate between the two readers.

    python scripts/bench_views_csv.py METADATA_ZIP [--rounds N] [--rows N]
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import sys
import tempfile
import time
import zipfile
from typing import Callable, Dict, List

from bioscanfs.layout import METADATA_CSV
from bioscanfs.views import NEEDED_COLUMNS


def with_stdlib(path: str) -> int:
    """csv.reader over a text stream, the needed columns appended to lists."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows)
        picks = [header.index(name) for name in NEEDED_COLUMNS]
        columns: List[List[str]] = [[] for _ in picks]
        appends = [c.append for c in columns]
        for row in rows:
            for append, at in zip(appends, picks):
                append(row[at])
    return len(columns[0])


def with_pyarrow(path: str) -> int:
    """pyarrow.csv.read_csv, only the needed columns, every one as a string."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        include_columns=list(NEEDED_COLUMNS), column_types={n: pa.string() for n in NEEDED_COLUMNS}))
    return table.num_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metadata_zip")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=0, help="only the first N rows (0: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "metadata.csv")
        with zipfile.ZipFile(args.metadata_zip) as zf, zf.open(METADATA_CSV) as src, open(path, "wb") as out:
            if args.rows:
                text = io.TextIOWrapper(src, encoding="utf-8", newline="")
                for _, line in zip(range(args.rows + 1), text):
                    out.write(line.encode())
            else:
                shutil.copyfileobj(src, out, 1 << 20)
        size = os.path.getsize(path)
        readers: Dict[str, Callable[[str], int]] = {"csv module": with_stdlib, "pyarrow": with_pyarrow}
        times: Dict[str, List[float]] = {name: [] for name in readers}
        for round_no in range(args.rounds):
            for name, read in (readers.items() if round_no % 2 == 0 else reversed(list(readers.items()))):
                started = time.perf_counter()
                rows = read(path)
                times[name].append(time.perf_counter() - started)
                print(f"round {round_no + 1}: {name}: {rows:,} rows, {times[name][-1]:.2f} s", flush=True)
    best = {name: min(t) for name, t in times.items()}
    print(f"CSV {size:,} bytes, {os.cpu_count()} cores; best of {args.rounds}: " +
          ", ".join(f"{name} {t:.2f} s ({size / t / 1e6:.0f} MB/s)" for name, t in best.items()) +
          f"; csv module / pyarrow = {best['csv module'] / best['pyarrow']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
