"""BIOSCAN-5M naming: package file names, imgtypes, splits and the md5 chunk rule.

Owns the dataset's conventions; knows nothing of zip bytes or FUSE.
"""
from __future__ import annotations

import hashlib
import re
from typing import NamedTuple, Optional

IMGTYPES = ("original_full", "cropped", "original_256", "cropped_256")

#: Split name -> number of md5 hex chars in its chunk folder (0: no chunk folder).
SPLIT_CHUNK_CHARS = {
    "pretrain": 2,
    "train": 1,
    "other_heldout": 1,
    "val": 0,
    "test": 0,
    "val_unseen": 0,
    "test_unseen": 0,
    "key_unseen": 0,
}
SPLITS = tuple(SPLIT_CHUNK_CHARS)

#: Images per split in the real dataset (bioscan5m.md, "Sizes").
SPLIT_SIZES = {
    "pretrain": 4_677_756,
    "train": 289_203,
    "val": 14_757,
    "test": 39_373,
    "key_unseen": 36_465,
    "val_unseen": 8_819,
    "test_unseen": 7_887,
    "other_heldout": 76_590,
}

#: The per-split package "eval" holds these six splits.
EVAL_SPLITS = ("val", "test", "val_unseen", "test_unseen", "key_unseen", "other_heldout")

IMAGES_ROOT = "bioscan5m/images"
METADATA_CSV = "bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv"
METADATA_JSONLD = "bioscan5m/metadata/jsonld/BIOSCAN_5M_Insect_Dataset_metadata.jsonld"
METADATA_ZIP = "BIOSCAN_5M_Insect_Dataset_metadata_MultiTypes.zip"

CSV_COLUMNS = (
    "processid", "sampleid", "taxon", "phylum", "class", "order", "family",
    "subfamily", "genus", "species", "dna_bin", "dna_barcode", "country",
    "province_state", "coord-lat", "coord-lon", "image_measurement_value",
    "area_fraction", "scale_factor", "inferred_ranks", "split",
    "index_bioscan_1M_insect", "chunk",
)


def chunk_of(processid: str, split: str) -> str:
    """The chunk folder of a processid in a split ('' when the split has none)."""
    try:
        width = SPLIT_CHUNK_CHARS[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}") from None
    return hashlib.md5(processid.encode()).hexdigest()[:width]


def image_path(processid: str, split: str, imgtype: str) -> str:
    """The member path of one image, exactly as the dataset's zips and loader spell it."""
    if imgtype not in IMGTYPES:
        raise ValueError(f"unknown imgtype {imgtype!r}; expected one of {', '.join(IMGTYPES)}")
    chunk = chunk_of(processid, split)
    folder = f"{IMAGES_ROOT}/{imgtype}/{split}"
    return f"{folder}/{chunk}/{processid}.jpg" if chunk else f"{folder}/{processid}.jpg"


class PackageName(NamedTuple):
    """What a package file's name says about its content."""

    package: str          #: imgtype, or "metadata"
    split: Optional[str]  #: "pretrain", "train", "eval", or None for all-in-one
    part: Optional[int]   #: standalone part number (".01.zip"), or None


_PACKAGE_RE = re.compile(
    r"^BIOSCAN_5M_(?P<package>original_full|original|cropped_256|original_256|cropped)"
    r"(?:_(?P<split>pretrain|train|eval))?"
    r"(?:\.(?P<part>\d{2,3}))?\.zip$"
)


def parse_package_name(filename: str) -> Optional[PackageName]:
    """Recognise a BIOSCAN-5M package file name; None for anything else.

    ``BIOSCAN_5M_original.zip`` is the earlier release's name of original_full.

    >>> parse_package_name("BIOSCAN_5M_cropped_256_pretrain.01.zip")
    PackageName(package='cropped_256', split='pretrain', part=1)
    >>> parse_package_name("BIOSCAN_5M_original_full.03.zip")
    PackageName(package='original_full', split=None, part=3)
    """
    if filename == METADATA_ZIP:
        return PackageName("metadata", None, None)
    match = _PACKAGE_RE.match(filename)
    if not match:
        return None
    package = match["package"]
    if package == "original":
        package = "original_full"
    part = int(match["part"]) if match["part"] else None
    return PackageName(package, match["split"], part)
