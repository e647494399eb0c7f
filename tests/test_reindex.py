"""Re-indexing only what changed (issue 17): when one archive of a set changes, the next
build parses only that one and takes the others' rows from the tree built before, and
the tree is the one a fresh parse gives, as zipfile reads the archives.

Through ``load_tree`` (the index's entry point), not a mount: what is checked is the
tree both engines serve from; test_index.py and test_index_dir.py mount it.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import ModuleType
from typing import List

import pytest
from conftest import zip_members, zip_paths
from test_index import assert_same_tree, assert_tree_matches_zipfile, load

UNCHANGED = "archives are unchanged since the last index"


@pytest.fixture
def two_packages(tmp_path: Path, bench_scale: ModuleType) -> Path:
    """Two imgtypes in per-split zips (8 archives, no duplicate, no explicit folder)."""
    folder = tmp_path / "set"
    bench_scale.write_scale_set(folder, total=20_000, seed=0, packages=2)
    return folder


def _other_content(bench_scale: ModuleType, tmp_path: Path, name: str) -> Path:
    """The archive ``name`` written again with other processids (seed 1)."""
    other = tmp_path / "other"
    if not other.exists():
        bench_scale.write_scale_set(other, total=20_000, seed=1, packages=2)
    return other / name


def _unchanged_lines(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if UNCHANGED in r.getMessage()]


def test_one_changed_archive_is_the_only_one_parsed(two_packages: Path, tmp_path: Path, bench_scale: ModuleType,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """7 of 8 archives are taken from the earlier tree; the tree equals a fresh parse and zipfile."""
    zips, index_dir = zip_paths(two_packages), tmp_path / "index"
    load(zips, index_dir)
    changed = zips[1]
    shutil.copyfile(_other_content(bench_scale, tmp_path, changed.name), changed)
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        tree = load(zips, index_dir)
    assert _unchanged_lines(caplog) == [f"7 of 8 {UNCHANGED}: only the others are parsed"]
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(two_packages))
    assert_same_tree(load(zips, index_dir), tree)   # and it is mapped back as it was built


def test_an_earlier_tree_that_hid_files_is_not_reused(two_packages: Path, tmp_path: Path, bench_scale: ModuleType,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Two archives with the same members: the earlier tree serves the first and lost the
    second's rows. Once the first changes, those rows must come back: everything is parsed."""
    zips = zip_paths(two_packages)
    shutil.copyfile(zips[0], two_packages / "BIOSCAN_5M_cropped_256_zcopy.zip")
    zips, index_dir = zip_paths(two_packages), tmp_path / "index"
    load(zips, index_dir)
    shutil.copyfile(_other_content(bench_scale, tmp_path, zips[0].name), zips[0])
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        tree = load(zips, index_dir)
    assert _unchanged_lines(caplog) == []
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(two_packages))
