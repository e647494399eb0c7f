"""The real consumer works unchanged: bioscan-dataset's BIOSCAN5M with the mount as root.

It needs the `bioscan-dataset` package with torch and torchvision, which the test extra
does not install (several GB); the test is skipped when they are absent. The loader
checks the md5 of the real CSV and of a few real images; for the synthetic set those
expected values are set to the synthetic files' md5s, computed with zipfile.
"""
from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

bioscan5m = pytest.importorskip("bioscan_dataset.bioscan5m", reason="bioscan-dataset (torch, torchvision) absent")
PIL_Image = pytest.importorskip("PIL.Image")

from conftest import zip_contents, zip_members  # noqa: E402

from bioscanfs.layout import METADATA_CSV, METADATA_ZIP  # noqa: E402

IMGTYPE = "cropped_256"


def _rows_by_split(fake_set: Path) -> Dict[str, List[dict]]:
    with zipfile.ZipFile(fake_set / METADATA_ZIP) as zf:
        text = zf.read(METADATA_CSV).decode()
    rows: Dict[str, List[dict]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        rows.setdefault(row["split"], []).append(row)
    return rows


@pytest.mark.parametrize("split", ["train", "val", "pretrain"])
def test_bioscan5m_loader_reads_through_the_mount(split: str, fake_set: Path, fake_mount, monkeypatch) -> None:
    contents = zip_contents(zip_members(fake_set))
    csv_md5 = hashlib.md5(contents[METADATA_CSV]).hexdigest()
    rows = _rows_by_split(fake_set)
    image_dir = f"bioscan5m/images/{IMGTYPE}/"
    images = {path[len(image_dir):]: data for path, data in contents.items() if path.startswith(image_dir)}
    # The loader's own integrity check, pointed at two synthetic images of the split.
    checked = sorted(p for p in images if p.startswith(split + "/"))[:2]
    monkeypatch.setattr(bioscan5m.BIOSCAN5M, "meta", dict(bioscan5m.BIOSCAN5M.meta, csv_md5=csv_md5))
    monkeypatch.setattr(bioscan5m.BIOSCAN5M, "image_files", dict(
        bioscan5m.BIOSCAN5M.image_files,
        **{split: [(p, {IMGTYPE: hashlib.md5(images[p]).hexdigest()}) for p in checked]}))

    dataset = bioscan5m.BIOSCAN5M(str(fake_mount.point), split=split, image_package=IMGTYPE,
                                  modality=("image", "dna"), target_type="species", output_format="dict")

    assert len(dataset) == len(rows[split])
    for index in range(min(len(dataset), 5)):
        sample = dataset[index]
        row = dataset.metadata.iloc[index]
        expected = PIL_Image.open(io.BytesIO(images[row["image_path"]]))
        assert np.array_equal(np.asarray(sample["image"]), np.asarray(expected.convert("RGB")))
        assert sample["dna"] == row["dna_barcode"]

