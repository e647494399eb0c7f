"""What the ``info``, ``verify`` and ``path`` commands compute, apart from printing.

Owns summaries of a Collection; knows nothing of click or FUSE.
"""
from __future__ import annotations

import csv
import io
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .collection import Collection
from .errors import BioscanError
from .reader import METHOD_NAMES


def _package_of(folder: bytes) -> Tuple[str, Optional[str]]:
    """(package, split) of a folder of the tree, by the dataset's layout."""
    parts = folder.decode("utf-8", "surrogateescape").split("/")
    if parts[:2] == ["bioscan5m", "images"] and len(parts) >= 4:
        return parts[2], parts[3]
    if parts[:2] == ["bioscan5m", "metadata"]:
        return "metadata", None
    return "other", None


def describe(collection: Collection) -> Dict[str, Any]:
    """Packages with their splits, archives and methods, plus duplicates and conflicts."""
    tree = collection.tree
    tree.verify_all()   # the whole files column is read
    files = tree.files
    lo, hi = tree.dir_lo.astype(np.int64), tree.dir_hi.astype(np.int64)
    # The archives' members only: the views' classes.txt files (rows of the in-memory zip
    # numbered after the archives) are not in any archive; nor are the rows no folder shows.
    real = (files["archive"] < len(collection.sources)) & tree.shown()
    cumulative = np.concatenate(([0], np.cumsum(np.where(real, files["size"], 0), dtype=np.int64)))
    counted = np.concatenate(([0], np.cumsum(real, dtype=np.int64)))
    packages: Dict[str, Dict[str, Any]] = {}
    for dir_id, folder in tree.file_dirs():
        count = int(counted[hi[dir_id]] - counted[lo[dir_id]])
        if not count:
            continue
        package, split = _package_of(folder)
        entry = packages.setdefault(package, {"splits": {}, "archives": []})
        split_entry = entry["splits"].setdefault(split or "-", {"members": 0, "bytes": 0})
        split_entry["members"] += count
        split_entry["bytes"] += int(cumulative[hi[dir_id]] - cumulative[lo[dir_id]])
    shown = tree.shown()
    archive = files["archive"][shown]
    per_archive = np.bincount(archive, minlength=len(collection.sources))
    pairs, pair_counts = np.unique(archive.astype(np.int64) * 65536 + files["method"][shown], return_counts=True)
    for archive_id, spec in enumerate(collection.specs):
        methods = {METHOD_NAMES.get(int(p % 65536), f"method {int(p % 65536)}"): int(n)
                   for p, n in zip(pairs, pair_counts) if p // 65536 == archive_id}
        package = spec.package.package if spec.package else "unrecognised name"
        packages.setdefault(package, {"splits": {}, "archives": []})["archives"].append({
            "archive": spec.name, "pieces": [os.path.basename(p) for p in spec.paths],
            "kind": "spanned" if spec.spanned else "raw split" if len(spec.paths) > 1 else "zip",
            "members_served": int(per_archive[archive_id]), "methods": methods,
        })
    return {
        "packages": packages,
        "totals": {"members": int(counted[-1]), "bytes": tree.total_bytes, "archives": len(collection.sources)},
        "duplicates": tree.duplicates,
        "conflicts": [{"path": c.path, "archives": c.archives} for c in tree.conflicts],
        "warnings": collection.warnings,
    }


def render(report: Dict[str, Any]) -> str:
    """The report as text tables, one per package."""
    out = io.StringIO()
    for package, entry in sorted(report["packages"].items()):
        out.write(f"{package}\n")
        for split, numbers in sorted(entry["splits"].items()):
            out.write(f"  {split:<14} {numbers['members']:>10,} members {numbers['bytes']:>16,} bytes\n")
        for archive in entry["archives"]:
            methods = ", ".join(f"{name} {n:,}" for name, n in sorted(archive["methods"].items()))
            pieces = f" ({archive['kind']}, {len(archive['pieces'])} pieces)" if len(archive["pieces"]) > 1 else ""
            out.write(f"  archive {os.path.basename(archive['pieces'][0])}{pieces}"
                      f": {archive['members_served']:,} members served; {methods or 'no members'}\n")
    totals = report["totals"]
    out.write(f"total: {totals['members']:,} members, {totals['bytes']:,} bytes, {totals['archives']} archives\n")
    out.write(f"duplicates (same path, same content): {report['duplicates']:,}\n")
    out.write(f"conflicts (same path, different content; first archive wins): {len(report['conflicts']):,}\n")
    for conflict in report["conflicts"]:
        out.write(f"  {conflict['path']}: {' > '.join(os.path.basename(a) for a in conflict['archives'])}\n")
    for line in report["warnings"]:
        out.write(f"warning: {line}\n")
    return out.getvalue()


def verify_members(collection: Collection, sample: Optional[int], jobs: int,
                   on_done: Callable[[int], None]) -> Tuple[List[str], int]:
    """CRC-check members in parallel (pread and inflate release the GIL).

    Returns the bad members as 'archive: member: why' lines, and how many were checked.
    """
    tree = collection.tree
    # Members of the archives: not the views' classes.txt rows, which no archive holds.
    rows = np.flatnonzero((tree.files["archive"] < len(collection.sources)) & tree.shown()).tolist()
    if sample is not None and sample < len(rows):
        rows = sorted(random.sample(rows, sample))
    bad: List[str] = []

    def check(row: int) -> Optional[str]:
        label = tree.path_of(row).decode("utf-8", "surrogateescape")
        try:
            collection.reader.check(tree.member(row), label)
        except BioscanError as err:
            return str(err)
        except OSError as err:
            return f"{collection.archive_of(row)}: {label}: {err}"
        return None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for start in range(0, len(rows), 4096):
            for problem in pool.map(check, rows[start:start + 4096]):
                if problem:
                    bad.append(problem)
                on_done(1)
    return bad, len(rows)


def read_processids(data: bytes, default_split: Optional[str]) -> List[Tuple[str, Optional[str]]]:
    """(processid, split) pairs from a CSV with a 'processid' column (and an optional
    'split' one), or from one processid per line.

    Raises ValueError naming the line when the input is not UTF-8 text, is not CSV, or
    has a row without a processid. Splits are not checked here (layout does that).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        where = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"line {where}: not UTF-8 text") from None
    rows = csv.reader(io.StringIO(text))
    try:
        header = [name.strip() for name in next(rows, [])]
        if "processid" not in header:
            return [(line.strip(), default_split) for line in text.splitlines() if line.strip()]
        pairs = []
        for row in rows:
            record = dict(zip(header, (value.strip() for value in row)))
            if not record.get("processid"):
                if any(value.strip() for value in row):
                    raise ValueError(f"line {rows.line_num}: no processid")
                continue  # a blank line
            pairs.append((record["processid"], record.get("split") or default_split))
    except csv.Error as err:
        raise ValueError(f"line {rows.line_num}: {err}") from None
    return pairs
