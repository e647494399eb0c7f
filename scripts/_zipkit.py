"""What the data writers in scripts/ share: split sizes, package names, payloads and zip writing.

Owns how a synthetic package set is cut up (members per split, which zip holds which
split, as the real BIOSCAN-5M packages are) and written (CPython's zipfile, stored or
deflated per member, DOS timestamps); knows nothing of mounting or timing (_benchutil.py).
The bulk stored-only writer for millions of members is bench_scale.write_stored_zip.
"""
from __future__ import annotations

import datetime as dt
import io
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from bioscanfs.layout import EVAL_SPLITS, SPLIT_SIZES, SPLITS

MIN_PER_SPLIT = 2
MIN_IMAGES = MIN_PER_SPLIT * len(SPLITS)
#: Share of image members written with a ZIP64 extra in their local header only (as
#: zipfile's force_zip64 does), so readers must take the local extra length from the
#: local header, not from the central directory.
ZIP64_LOCAL_FRACTION = 0.2
#: Member sizes of random payloads are uniform in this range (bytes): a mean of 8 KiB,
#: like cropped_256 JPEGs.
PAYLOAD_SIZES = (4 << 10, 12 << 10)


def split_counts(images: int) -> Dict[str, int]:
    """Images per split: the real split sizes scaled to ``images``, at least 2 per split,
    summing to ``images`` exactly (pretrain takes the rounding)."""
    if images < MIN_IMAGES:
        raise ValueError(f"images must be at least {MIN_IMAGES} ({MIN_PER_SPLIT} per split)")
    full = sum(SPLIT_SIZES.values())
    counts = {s: max(MIN_PER_SPLIT, round(n * images / full)) for s, n in SPLIT_SIZES.items()}
    counts["pretrain"] += images - sum(counts.values())
    return counts


def split_ids(pids: List[str], images: int, seed: int) -> Dict[str, List[str]]:
    """Deal ``pids`` into the splits in a seeded random order, ``split_counts(images)`` each."""
    order = np.random.default_rng([seed, 1]).permutation(images).tolist()
    by_split: Dict[str, List[str]] = {}
    start = 0
    for split, count in split_counts(images).items():
        by_split[split] = [pids[i] for i in order[start:start + count]]
        start += count
    return by_split


def packages(imgtype: str, pids_by_split: Dict[str, List[str]],
             rng: np.random.Generator) -> Dict[str, List[Tuple[str, str]]]:
    """Zip file name -> its (split, processid) members, packaged as the real ``imgtype`` is."""
    everything = [(split, pid) for split, pids in pids_by_split.items() for pid in pids]
    prefix = f"BIOSCAN_5M_{imgtype}"
    if imgtype == "original_256":
        return {f"{prefix}.zip": everything}
    if imgtype in ("original_full", "cropped"):
        parts = 5 if imgtype == "original_full" else 2
        order = rng.permutation(len(everything))
        return {f"{prefix}.{k + 1:02d}.zip": [everything[i] for i in chunk.tolist()]
                for k, chunk in enumerate(np.array_split(order, parts))}
    pretrain = [("pretrain", pid) for pid in pids_by_split["pretrain"]]
    half = len(pretrain) // 2
    return {
        f"{prefix}_pretrain.01.zip": pretrain[:half],
        f"{prefix}_pretrain.02.zip": pretrain[half:],
        f"{prefix}_train.zip": [("train", pid) for pid in pids_by_split["train"]],
        f"{prefix}_eval.zip": [(s, pid) for s in EVAL_SPLITS for pid in pids_by_split[s]],
    }


def dos_stamp(year: int, month: int, day: int, hour: int, minute: int) -> Tuple[int, int]:
    """(time, date) fields of a DOS timestamp (APPNOTE 4.4.6), for writers that pack headers."""
    return (hour << 11) | (minute << 5), ((year - 1980) << 9) | (month << 5) | day


def date_time(rng: np.random.Generator) -> Tuple[int, int, int, int, int, int]:
    """A timestamp in 2023-2024 (even seconds: DOS time keeps two-second steps)."""
    stamp = dt.datetime(2023, 1, 1) + dt.timedelta(seconds=2 * int(rng.integers(0, 365 * 86400)))
    return stamp.timetuple()[:6]


def make_jpeg(rng: np.random.Generator, width: int, height: int, comment: str,
              noise: Tuple[float, float] = (5, 60), quality: Tuple[int, int] = (70, 96)) -> bytes:
    """A small real JPEG: a random colour gradient with noise, tagged with ``comment``.

    The comment makes every image distinct even if two noise draws compressed alike.
    The noise's standard deviation is drawn from ``noise`` and the quality from ``quality``
    (upper bound excluded); both set the size: 160 x 120 with the defaults gives 2-20 KB,
    10 KB on average.
    """
    from PIL import Image

    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    corner, right, bottom = rng.uniform(0, 255, (3, 3))
    base = corner + (right - corner) * x + (bottom - corner) * y
    pixels = np.clip(base + rng.normal(0, rng.uniform(*noise), (height, width, 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(
        out, "JPEG", quality=int(rng.integers(*quality)), comment=comment)
    return out.getvalue()


def random_payloads(rng: np.random.Generator, count: int) -> List[bytes]:
    """``count`` random byte strings of PAYLOAD_SIZES: stand-ins for stored JPEGs, cheap to make
    (deflating them would only copy them, so they suit stored members only)."""
    sizes = rng.integers(PAYLOAD_SIZES[0], PAYLOAD_SIZES[1] + 1, count)
    blob = rng.bytes(int(sizes.sum()))
    ends = np.cumsum(sizes).tolist()
    return [blob[end - size:end] for end, size in zip(ends, sizes.tolist())]


def write_image_zip(path: Path, members: List[Tuple[str, bytes]], rng: np.random.Generator,
                    deflate_fraction: float) -> int:
    """Write ``members`` (path, bytes) with zipfile in shuffled order; returns how many were deflated.

    The generator draws the same numbers whatever ``deflate_fraction`` is, so two calls
    with equal generators write the same members in the same order with the same stamps,
    stored in one zip and deflated in the other.
    """
    deflated = 0
    with zipfile.ZipFile(path, "w") as zf:
        for i in rng.permutation(len(members)).tolist():
            name, data = members[i]
            info = zipfile.ZipInfo(name, date_time(rng))
            info.external_attr = 0o100644 << 16
            if rng.random() < deflate_fraction:
                info.compress_type = zipfile.ZIP_DEFLATED
                deflated += 1
            with zf.open(info, "w", force_zip64=bool(rng.random() < ZIP64_LOCAL_FRACTION)) as fh:
                fh.write(data)
    return deflated
