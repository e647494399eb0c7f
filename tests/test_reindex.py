"""Re-indexing only what changed (issue 17): when one archive of a set changes, the next
build parses only that one and takes the others' rows from the tree built before, and
the tree is the one a fresh parse gives, as zipfile reads the archives.

Through ``load_tree`` (the index's entry point), not a mount: what is checked is the
tree both engines serve from; test_index.py and test_index_dir.py mount it.
"""
from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path
from types import ModuleType
from typing import List

import pytest
from conftest import index_files, load_script, touch, zip_members, zip_paths
from test_index import CORRUPTIONS, assert_same_tree, assert_tree_matches_zipfile, load

from bioscanfs.layout import METADATA_ZIP
from bioscanfs.views import RANKS

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


REKEYED = "with the same directories: it is used again, nothing is parsed"


def _copied_back(archive: Path) -> None:
    """The archive replaced by a byte-identical copy: a new inode and mtime, the same bytes."""
    copy = archive.with_suffix(".copy")
    shutil.copyfile(archive, copy)
    os.replace(copy, archive)


def test_touched_and_copied_archives_are_not_parsed(two_packages: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Archives whose identity changed but whose bytes did not (touched, copied anew): the
    earlier tree is saved again under the new key, no archive is parsed, and the tree is
    the one a fresh parse gives; a remount maps it."""
    zips, index_dir = zip_paths(two_packages), tmp_path / "index"
    load(zips, index_dir)
    before = set(index_files(index_dir))
    touch(zips[0])
    _copied_back(zips[5])
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        tree = load(zips, index_dir)
    messages = [r.getMessage() for r in caplog.records]
    assert any(REKEYED in m for m in messages) and _unchanged_lines(caplog) == [], messages
    assert set(index_files(index_dir)) - before, "the tree was not saved under the new key"
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(two_packages))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        assert_same_tree(load(zips, index_dir), tree)
    assert caplog.records == [], "the second load did not map the saved tree"


def test_a_directory_changed_in_place_is_parsed(two_packages: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Same size, a new mtime, one byte of one central-directory record changed (a member's
    DOS time): the digest differs, so that archive is parsed again and the tree shows it."""
    zips, index_dir = zip_paths(two_packages), tmp_path / "index"
    load(zips, index_dir)
    archive = zips[2]
    with zipfile.ZipFile(archive) as zf:
        record = zf.start_dir   # the first central-directory record
    data = bytearray(archive.read_bytes())
    assert data[record:record + 4] == b"PK\x01\x02"
    data[record + 12] ^= 0x01   # the low bit of its DOS time: two seconds later or earlier
    archive.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        tree = load(zips, index_dir)
    assert _unchanged_lines(caplog) == [f"7 of 8 {UNCHANGED}: only the others are parsed"]
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(two_packages))


@pytest.mark.parametrize("corruption", ["flip-row-data", "flip-header-json"])
def test_a_damaged_tree_is_not_saved_again(two_packages: Path, tmp_path: Path, corruption: str) -> None:
    """An earlier tree with damage in its bulk or its header is not taken for the touched
    archives: the tree is built again, whole."""
    zips, index_dir = zip_paths(two_packages), tmp_path / "index"
    load(zips, index_dir)
    (earlier,) = index_files(index_dir)
    CORRUPTIONS[corruption](index_dir / earlier, index_dir / earlier)
    touch(zips[0])
    tree = load(zips, index_dir)
    tree.verify_all()
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(two_packages))


@pytest.mark.no_c
def test_touched_archives_keep_the_views_without_a_parse(tmp_path: Path, bench_scale: ModuleType,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """With views: the metadata zip and an image zip touched; the views' tree is saved again
    (no archive parsed, no CSV read) and equals a fresh build's."""
    folder = tmp_path / "set"
    bench_scale.write_scale_set(folder, total=20_000, seed=0, packages=1)
    load_script("bench_views").write_csv(folder / METADATA_ZIP, bench_scale.scale_ids(20_000, 0))
    zips, index_dir = zip_paths(folder), tmp_path / "index"
    built = load(zips, index_dir, views=RANKS)
    assert built.find_dir(0, b"views") > 0
    touch(folder / METADATA_ZIP)
    touch(zips[0])
    with caplog.at_level(logging.INFO, logger="bioscanfs"):
        tree = load(zips, index_dir, views=RANKS)
    messages = [r.getMessage() for r in caplog.records]
    assert any(REKEYED in m for m in messages) and _unchanged_lines(caplog) == [], messages
    assert_same_tree(tree, load(zips, None, views=RANKS))
