#!/usr/bin/env python3
"""Write a small synthetic BIOSCAN-5M package set: image zips of real JPEGs plus the metadata zip.

Written with CPython's zipfile, a writer independent of bioscanfs, and in every form a
real download may take: per-split zips, an all-in-one zip, standalone ``.0N.zip`` parts,
stored and deflated members, ZIP64 local headers on some members, shuffled member order,
varied timestamps and no directory entries. Deterministic for a given seed.

    python scripts/make_fake_bioscan.py OUTDIR [--images N] [--deflate-fraction F]
        [--seed S] [--csv-bytes B] [--imgtypes a,b,...]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from _fakeids import ProcessIds
from _zipkit import MIN_IMAGES, date_time, make_jpeg, packages, split_ids, write_image_zip

from bioscanfs.layout import (
    CSV_COLUMNS,
    IMGTYPES,
    METADATA_CSV,
    METADATA_JSONLD,
    METADATA_ZIP,
    SPLIT_SIZES,
    chunk_of,
    image_path,
)

#: Image side lengths (pixels, inclusive range) per imgtype: larger for the larger packages.
_SIDES = {
    "original_full": (64, 96),
    "cropped": (48, 80),
    "original_256": (32, 64),
    "cropped_256": (24, 48),
}

#: order, family, subfamily, genus, species; "" where BIOSCAN leaves a rank unknown.
_TAXA = (
    ("Diptera", "Cecidomyiidae", "", "", ""),
    ("Diptera", "Chironomidae", "Orthocladiinae", "Smittia", ""),
    ("Diptera", "Sciaridae", "", "Bradysia", "Bradysia ocellaris"),
    ("Diptera", "Phoridae", "Metopininae", "Megaselia", "Megaselia scalaris"),
    ("Diptera", "Drosophilidae", "Drosophilinae", "Drosophila", "Drosophila melanogaster"),
    ("Diptera", "Psychodidae", "Psychodinae", "", ""),
    ("Diptera", "Muscidae", "", "", ""),
    ("Diptera", "", "", "", ""),
    ("Hymenoptera", "Platygastridae", "", "", ""),
    ("Hymenoptera", "Formicidae", "Myrmicinae", "Pheidole", ""),
    ("Hymenoptera", "Braconidae", "Microgastrinae", "Apanteles", "Apanteles anamartinezae"),
    ("Coleoptera", "Staphylinidae", "Aleocharinae", "", ""),
    ("Coleoptera", "Curculionidae", "Scolytinae", "Hypothenemus", "Hypothenemus hampei"),
    ("Coleoptera", "Chrysomelidae", "Galerucinae", "", ""),
    ("Hemiptera", "Cicadellidae", "Typhlocybinae", "Empoasca", "Empoasca fabae"),
    ("Hemiptera", "Aphididae", "Aphidinae", "Aphis", "Aphis gossypii"),
    ("Lepidoptera", "Gelechiidae", "", "", ""),
    ("Lepidoptera", "Noctuidae", "Noctuinae", "Agrotis", "Agrotis ipsilon"),
    ("Psocodea", "Ectopsocidae", "", "Ectopsocus", ""),
    ("Thysanoptera", "Thripidae", "Thripinae", "Frankliniella", "Frankliniella occidentalis"),
    ("Trichoptera", "Hydroptilidae", "", "", ""),
    ("Hymenoptera", "", "", "", ""),
)

#: country, province/state, latitude, longitude (a collecting region's rough centre).
_PLACES = (
    ("Canada", "Ontario", 43.5, -80.2),
    ("Canada", "British Columbia", 49.3, -123.1),
    ("Costa Rica", "Guanacaste", 10.8, -85.6),
    ("Costa Rica", "Alajuela", 10.9, -84.9),
    ("South Africa", "Western Cape", -33.9, 18.9),
    ("Pakistan", "Punjab", 31.5, 73.1),
    ("Thailand", "Chiang Mai", 18.8, 98.9),
    ("Malaysia", "Sabah", 5.3, 116.9),
    ("Australia", "Queensland", -19.3, 146.8),
    ("Kenya", "Nairobi", -1.3, 36.8),
    ("Finland", "", 61.9, 24.9),
)

_BARCODE_LEN = 658  # the COI-5P barcode region
_ACGT = np.frombuffer(b"ACGT", np.uint8)
_CSV_BATCH = 20_000


def _csv_lines(rng: np.random.Generator, pids: list[str], splits: list[str],
               barcodes: np.ndarray, bins: list[list[str]], first_index: int) -> str:
    """CSV rows for ``pids``: plausible taxonomy, BIN, barcode, place and measurement values.

    Barcodes are a per-taxon sequence with ~1% point mutations, so the CSV deflates like
    a real one (long repeats) and not like random text.
    """
    m = len(pids)
    taxa = rng.integers(0, len(_TAXA), m)
    seqs = barcodes[taxa]
    mutated = rng.random(seqs.shape) < 0.01
    seqs[mutated] = _ACGT[rng.integers(0, 4, int(mutated.sum()))]
    seq_text = seqs.tobytes().decode("ascii")
    seq_lens = rng.integers(560, _BARCODE_LEN + 1, m).tolist()
    bin_picks = rng.integers(0, len(bins[0]), m).tolist()
    places = rng.integers(0, len(_PLACES), m).tolist()
    jitter = rng.normal(0, 0.5, (m, 2)).tolist()
    sample_nums = rng.integers(10_000, 99_999, m).tolist()
    wells = rng.integers(0, 96, m).tolist()
    measure = rng.integers(300, 60_000, m).tolist()
    area = rng.uniform(0.005, 0.5, m).tolist()
    scale = rng.uniform(0.4, 1.0, m).tolist()
    inferred = rng.integers(0, 4, m).tolist()
    in_1m = (rng.random(m) < 0.2).tolist()
    lines = []
    for i, (taxon_index, pid, split) in enumerate(zip(taxa.tolist(), pids, splits)):
        order, family, subfamily, genus, species = _TAXA[taxon_index]
        taxon = species or genus or subfamily or family or order
        country, province, lat, lon = _PLACES[places[i]]
        barcode = seq_text[i * _BARCODE_LEN:i * _BARCODE_LEN + seq_lens[i]]
        well = f"{'ABCDEFGH'[wells[i] // 12]}{wells[i] % 12 + 1:02d}"
        index_1m = str(first_index + i) if in_1m[i] else ""
        lines.append(
            f"{pid},BIOUG{sample_nums[i]}-{well},{taxon},Arthropoda,Insecta,{order},{family},"
            f"{subfamily},{genus},{species},{bins[taxon_index][bin_picks[i]]},{barcode},"
            f"{country},{province},{lat + jitter[i][0]:.4f},{lon + jitter[i][1]:.4f},"
            f"{measure[i]},{area[i]:.4f},{scale[i]:.4f},{inferred[i]},{split},{index_1m},"
            f"{chunk_of(pid, split)}\n")
    return "".join(lines)


def _write_csv(fh: io.BufferedIOBase, rng: np.random.Generator, ids: ProcessIds,
               image_rows: list[tuple[str, str]], csv_bytes: int) -> tuple[int, int]:
    """Stream the CSV into ``fh`` in batches; returns (rows, bytes).

    Rows for the imaged processids come first, then rows for processids without images
    until the CSV holds at least ``csv_bytes``: memory stays at one batch at any size.
    """
    barcodes = _ACGT[rng.integers(0, 4, (len(_TAXA), _BARCODE_LEN))]
    bins = [[f"BOLD:A{''.join(chr(65 + k) for k in rng.integers(0, 26, 2))}{rng.integers(1000, 9999)}"
             for _ in range(3)] for _ in _TAXA]
    sizes = np.array(list(SPLIT_SIZES.values()), float)
    split_names = list(SPLIT_SIZES)
    header = (",".join(CSV_COLUMNS) + "\n").encode()
    fh.write(header)
    written, rows = len(header), 0

    def emit(pids: list[str], splits: list[str]) -> None:
        nonlocal written, rows
        data = _csv_lines(rng, pids, splits, barcodes, bins, rows).encode()
        fh.write(data)
        written += len(data)
        rows += len(pids)

    for lo in range(0, len(image_rows), _CSV_BATCH):
        batch = image_rows[lo:lo + _CSV_BATCH]
        emit([pid for pid, _ in batch], [split for _, split in batch])
    while written < csv_bytes:
        # Rows are 650-900 bytes: the last batches shrink so the CSV ends just past csv_bytes.
        count = min(_CSV_BATCH, (csv_bytes - written) // 650 + 1)
        picks = rng.choice(len(split_names), count, p=sizes / sizes.sum())
        emit(ids.take(count), [split_names[k] for k in picks.tolist()])
    return rows, written


def _jsonld(rows: int) -> bytes:
    """A small schema.org JSON-LD description of the (synthetic) metadata table."""
    doc = {
        "@context": {"@vocab": "https://schema.org/"},
        "@type": "Dataset",
        "name": "BIOSCAN-5M (synthetic test data)",
        "description": "Synthetic stand-in for the BIOSCAN-5M insect dataset metadata.",
        "distribution": {"@type": "DataDownload", "contentUrl": METADATA_CSV,
                         "encodingFormat": "text/csv"},
        "variableMeasured": [{"@type": "PropertyValue", "name": c} for c in CSV_COLUMNS],
        "size": rows,
    }
    return json.dumps(doc, indent=2).encode()


def _write_metadata_zip(path: Path, rng: np.random.Generator, ids: ProcessIds,
                        image_rows: list[tuple[str, str]], csv_bytes: int) -> tuple[int, int]:
    """Write the metadata zip (deflated CSV, streamed, and JSON-LD); returns (csv rows, bytes)."""
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo(METADATA_CSV, date_time(rng))
        info.compress_type = zipfile.ZIP_DEFLATED
        # Level 1 deflates ~6x faster than the default 6 on barcode text (GB-sized CSVs).
        # zipfile takes a level per entry only through this attribute (kept as an alias of
        # compress_level since 3.13); ZipFile(compresslevel=) would not reach zf.open(info).
        info._compresslevel = 1
        info.external_attr = 0o100644 << 16
        with zf.open(info, "w", force_zip64=True) as fh:
            rows, size = _write_csv(fh, rng, ids, image_rows, csv_bytes)
        info = zipfile.ZipInfo(METADATA_JSONLD, date_time(rng))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o100644 << 16
        zf.writestr(info, _jsonld(rows))
    return rows, size


def make_set(outdir: Union[str, Path], images: int = 400, deflate_fraction: float = 0.3,
             seed: int = 0, csv_bytes: int = 0,
             imgtypes: Iterable[str] = IMGTYPES) -> dict:
    """Write the package zips for ``imgtypes`` and the metadata zip into ``outdir``.

    Every imgtype holds the same ``images`` processids, spread over all eight splits.
    Returns a summary: ``zips`` (paths, in writing order), ``members`` (per zip file
    name), ``deflated`` (per zip file name), ``total_members``, ``splits``
    (processid -> split), ``csv_rows`` and ``csv_bytes`` (the decompressed CSV size).
    """
    imgtypes = tuple(imgtypes)
    unknown = sorted(set(imgtypes) - set(IMGTYPES))
    if unknown:
        raise ValueError(f"unknown imgtypes {unknown}; expected some of {', '.join(IMGTYPES)}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ids = ProcessIds(seed)
    pids = ids.take(images)
    pids_by_split = split_ids(pids, images, seed)
    split_of = {pid: split for split, group in pids_by_split.items() for pid in group}

    summary: dict = {"zips": [], "members": {}, "deflated": {}, "splits": split_of}
    for imgtype in IMGTYPES:
        if imgtype not in imgtypes:
            continue
        # One generator per imgtype: its bytes do not depend on which other imgtypes are made.
        rng = np.random.default_rng([seed, 2, IMGTYPES.index(imgtype)])
        low, high = _SIDES[imgtype]
        jpegs = {pid: make_jpeg(rng, int(rng.integers(low, high + 1)),
                                int(rng.integers(low, high + 1)), f"{imgtype}/{pid}")
                 for pid in pids}
        for filename, group in packages(imgtype, pids_by_split, rng).items():
            path = outdir / filename
            members = [(image_path(pid, split, imgtype), jpegs[pid]) for split, pid in group]
            summary["deflated"][filename] = write_image_zip(path, members, rng, deflate_fraction)
            summary["members"][filename] = len(members)
            summary["zips"].append(path)

    path = outdir / METADATA_ZIP
    rng = np.random.default_rng([seed, 3])
    image_rows = [(pid, split_of[pid]) for pid in pids]
    summary["csv_rows"], summary["csv_bytes"] = _write_metadata_zip(path, rng, ids, image_rows,
                                                                    csv_bytes)
    summary["members"][METADATA_ZIP] = 2
    summary["deflated"][METADATA_ZIP] = 2
    summary["zips"].append(path)
    summary["total_members"] = sum(summary["members"].values())
    return summary


def main(argv: Union[list[str], None] = None) -> int:
    """Command line: write the set and print one line per zip."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--images", type=int, default=400,
                        help=f"processids with images, per imgtype (at least {MIN_IMAGES})")
    parser.add_argument("--deflate-fraction", type=float, default=0.3,
                        help="probability that an image member is deflated, not stored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv-bytes", type=int, default=0,
                        help="pad the metadata CSV with image-less rows to at least this size")
    parser.add_argument("--imgtypes", default=",".join(IMGTYPES),
                        help="comma-separated imgtypes to write (default: all)")
    args = parser.parse_args(argv)
    imgtypes = [t for t in args.imgtypes.split(",") if t]
    try:
        summary = make_set(args.outdir, images=args.images, deflate_fraction=args.deflate_fraction,
                           seed=args.seed, csv_bytes=args.csv_bytes, imgtypes=imgtypes)
    except ValueError as err:
        parser.error(str(err))
    for path in summary["zips"]:
        name = path.name
        print(f"{name}: {summary['members'][name]} members ({summary['deflated'][name]} deflated),"
              f" {path.stat().st_size:,} bytes")
    print(f"metadata CSV: {summary['csv_rows']:,} rows, {summary['csv_bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
