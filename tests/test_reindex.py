"""Re-indexing only what changed (issue 17): when one archive of a set changes, the next
build parses only that one and takes the others' rows from the tree built before, and
the tree is the one a fresh parse gives, as zipfile reads the archives.

Through ``load_tree`` (the index's entry point), not a mount: what is checked is the
tree both engines serve from; test_index.py and test_index_dir.py mount it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Iterator, List

import pytest
from conftest import MountFactory, assert_serves_members, index_files, load_script, touch, zip_members, zip_paths
from test_index import CORRUPTIONS, assert_same_tree, assert_tree_matches_zipfile, flip_in, load

from bioscanfs import Collection, store
from bioscanfs.errors import DamagedIndex
from bioscanfs.layout import METADATA_ZIP
from bioscanfs.report import describe, verify_members
from bioscanfs.tree import FILE_DTYPE, ROW_COLUMNS
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
def test_a_damaged_tree_taken_again_is_found(two_packages: Path, tmp_path: Path, corruption: str) -> None:
    """An earlier tree with damage in its header is not taken for the touched archives: the
    tree is built again, whole. Damage in its bulk is taken with it, under the same CRCs,
    and found on first use, as in the tree it came from: the files go, and the next load
    builds the tree again."""
    zips, index_dir = zip_paths(two_packages), tmp_path / "index"
    load(zips, index_dir)
    (earlier,) = index_files(index_dir)
    CORRUPTIONS[corruption](index_dir / earlier, index_dir / earlier)
    touch(zips[0])
    tree = load(zips, index_dir)
    if corruption == "flip-row-data":
        with pytest.raises(DamagedIndex):
            tree.verify_all()
        assert not Path(tree.where).exists() and not list(index_dir.glob("*.col"))
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
    # The image tree the views were built from is gone, and its column files with it.
    assert len(index_files(index_dir)) == 1 and len(list(index_dir.glob("*.col"))) == len(ROW_COLUMNS)
    touch(folder / METADATA_ZIP)
    touch(zips[0])
    with caplog.at_level(logging.INFO, logger="bioscanfs"):
        tree = load(zips, index_dir, views=RANKS)
    messages = [r.getMessage() for r in caplog.records]
    assert any(REKEYED in m for m in messages) and _unchanged_lines(caplog) == [], messages
    assert_same_tree(tree, load(zips, None, views=RANKS))


# -- folders carried as they are: only those a changed archive touches are merged again ------
CARRIED = "folders are taken as they are, the others merged again"
CANNOT = "the index built before cannot be used"
EXTENDED = "and appended to the index"


@contextlib.contextmanager
def _held(index_dir: Path, held: bool = True) -> Iterator[None]:
    """The index's column files locked as another build extending them holds them."""
    with contextlib.ExitStack() as stack:
        for path in index_dir.glob("*.col") if held else ():
            f = stack.enter_context(open(path, "rb"))
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def _log(caplog: pytest.LogCaptureFixture, text: str) -> List[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _grow(archive: Path, path: str, data: bytes) -> None:
    """One more stored member appended to an archive with zipfile (its directory rewritten)."""
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(zipfile.ZipInfo(path, (2024, 6, 1, 12, 0, 0)), data)


def test_a_grown_archive_carries_the_other_folders(two_packages: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """One pretrain half grown by a member in a chunk folder it shares with the other half,
    and by one in a new folder: every folder it does not touch is copied as it was, and
    the tree (its folders of each archive too) equals a fresh parse and zipfile's view."""
    zips, index_dir = zip_paths(two_packages), tmp_path / "index"
    load(zips, index_dir)
    half = next(p for p in zips if p.name.endswith("_pretrain.01.zip"))
    with zipfile.ZipFile(half) as zf:
        chunk = zf.namelist()[0].rpartition("/")[0]
    _grow(half, f"{chunk}/AAAAA0001-24.jpg", b"grown\n" * 100)
    _grow(half, f"{chunk.rpartition('/')[0]}/new-folder/AAAAA0002-24.jpg", b"new\n")
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        tree = load(zips, index_dir)
    carried = _log(caplog, CARRIED)
    assert len(carried) == 1 and not carried[0].startswith("0 of"), carried
    assert _log(caplog, CANNOT) == []
    fresh = load(zips, None)
    assert_same_tree(tree, fresh)
    assert tree.extra["archive_folders"] == fresh.extra["archive_folders"]
    assert_tree_matches_zipfile(tree, zip_members(two_packages))
    assert_same_tree(load(zips, index_dir), tree)


def _two_archives(folder: Path) -> List[Path]:
    """a.zip with files in d/ and e/ (d/x is a file), b.zip with files in f/."""
    folder.mkdir()
    for name, members in (("a.zip", ["d/1.jpg", "d/x", "e/2.jpg"]), ("b.zip", ["f/3.jpg"])):
        with zipfile.ZipFile(folder / name, "w") as zf:
            for member in members:
                zf.writestr(member, member.encode())
    return zip_paths(folder)


def test_a_new_folder_of_a_changed_archive_hides_a_carried_file(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """b.zip gains d/x/4.jpg: its folder d/x hides a.zip's file d/x, in a folder b.zip had
    no file in before. The folder is merged again, not carried: the file is hidden, with
    the warning a fresh parse gives."""
    zips, index_dir = _two_archives(tmp_path / "set"), tmp_path / "index"
    load(zips, index_dir)
    _grow(zips[1], "d/x/4.jpg", b"4")
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        tree = load(zips, index_dir)
    assert len(_log(caplog, CARRIED)) == 1
    fresh = load(zips, None)
    assert any("the file is hidden" in w for w in fresh.warnings)
    assert_same_tree(tree, fresh)
    assert tree.extra["archive_folders"] == fresh.extra["archive_folders"]


@pytest.mark.parametrize("held", [True, False])
def test_a_carried_folder_with_damage_is_not_copied(held: bool, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A flipped byte in the first file row of the earlier tree, and an archive that held no
    file gains one in a new folder: no row is merged again, every folder is carried. The
    tree is not extended: another build holds its column files (``held``), or the damage
    is in the last CRC block of its column, which an extension checks as it appends to
    it. So the folders are copied, the copy checks the CRCs, finds the damage and builds
    afresh."""
    zips, index_dir = _two_archives(tmp_path / "set"), tmp_path / "index"
    with zipfile.ZipFile(tmp_path / "set" / "c.zip", "w"):
        pass
    zips = zip_paths(tmp_path / "set")
    load(zips, index_dir)
    (earlier,) = index_files(index_dir)
    CORRUPTIONS["flip-row-data"](index_dir / earlier, index_dir / earlier)
    _grow(zips[2], "g/5.jpg", b"5")
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"), _held(index_dir, held):
        tree = load(zips, index_dir)
    assert not _log(caplog, CARRIED)[0].endswith(EXTENDED)
    assert _log(caplog, CANNOT) and "a block of files does not match its CRC-32" in _log(caplog, CANNOT)[0]
    assert not [p for p in index_dir.iterdir() if p.name.startswith(".tmp-")], "a temporary file was left"
    tree.verify_all()
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(tmp_path / "set"))


def test_damage_that_an_extension_carries_is_found_on_first_use(tmp_path: Path, bench_scale: ModuleType,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A flipped byte in the middle file row of a 200,000-file tree (a pretrain chunk
    folder's, in a full CRC block and a unit of rows that the re-index does not read),
    which a grown archive (train) extends: the extended tree names the same bytes under
    the same CRC, so the damage is found when first read, as in the tree it came from.
    The files go, and the next load builds the tree afresh."""
    bench_scale.write_scale_set(tmp_path / "set", total=200_000, seed=0, packages=1)
    zips, index_dir = zip_paths(tmp_path / "set"), tmp_path / "index"
    rows = load(zips, index_dir).n_files
    (earlier,) = index_files(index_dir)
    flip_in(index_dir / earlier, "files", rows // 2 * FILE_DTYPE.itemsize + 16)
    _grow(next(p for p in zips if "_train" in p.name), "bioscan5m/images/cropped_256/train/x/5.jpg", b"5")
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        tree = load(zips, index_dir)
    assert _log(caplog, CARRIED)[0].endswith(EXTENDED) and not _log(caplog, CANNOT)
    with pytest.raises(DamagedIndex, match="does not match its CRC-32"):
        tree.verify_all()
    assert not Path(tree.where).exists() and not list(index_dir.glob("*.col"))
    tree = load(zips, index_dir)
    tree.verify_all()
    assert_same_tree(tree, load(zips, None))


def test_folders_saved_wrong_do_not_carry_stale_rows(two_packages: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The earlier tree's header says the changed archive held files in no folder (written
    so under a valid header CRC: accidental damage is found by that CRC), and the archive
    now holds one file in a new folder. It shrank, so the tree is copied, not extended:
    its old rows in the folders carried are found as they are copied, and the tree is
    built afresh: no stale row is served."""
    zips, index_dir = zip_paths(two_packages), tmp_path / "index"
    load(zips, index_dir)
    (earlier,) = index_files(index_dir)
    path = str(index_dir / earlier)
    header = store.read_header(path)
    changed = next(i for i, p in enumerate(zips) if p.name.endswith("_pretrain.02.zip"))
    extra = dict(header["extra"], archive_folders=[[] if i == changed else runs for i, runs in
                                                   enumerate(header["extra"]["archive_folders"])])
    store.rekey(path, path, header["key"], extra)
    zips[changed].unlink()   # its files now: one, in a new folder (its old folders are not touched)
    with zipfile.ZipFile(zips[changed], "w") as zf:
        zf.writestr("bioscan5m/images/cropped_256/pretrain/new/AAAAA0003-24.jpg", b"3")
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        tree = load(zips, index_dir)
    assert len(_log(caplog, CANNOT)) == 1 and "changed" in _log(caplog, CANNOT)[0]
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(two_packages))


def test_an_extended_tree_is_served_right_and_the_one_before_too(tmp_path: Path, bench_scale: ModuleType,
                                                                  mount: MountFactory) -> None:
    """A pretrain half grown by a member in a chunk folder it shares and by one in a new
    folder: the next mount extends the tree (the same column files, appended to; rows
    left that no folder shows) and serves every member as zipfile reads it. A mount of
    the tree before, live all along, still serves what it served: the bytes it maps did
    not change under it."""
    folder = tmp_path / "set"
    bench_scale.write_scale_set(folder, total=3_000, seed=0, packages=2)
    zips, index_dir = zip_paths(folder), tmp_path / "index"
    before = zip_members(folder)
    old = mount(folder, index_dir=index_dir)
    columns = {p.name: p.stat().st_size for p in index_dir.glob("*.col")}
    half = next(p for p in zips if p.name.endswith("_pretrain.01.zip"))
    with zipfile.ZipFile(half) as zf:
        chunk = zf.namelist()[0].rpartition("/")[0]
    _grow(half, f"{chunk}/AAAAA0001-24.jpg", b"grown\n" * 100)
    _grow(half, f"{chunk.rpartition('/')[0]}/new-folder/AAAAA0002-24.jpg", b"new\n")
    live = mount(folder, index_dir=index_dir)
    grown = {p.name: p.stat().st_size for p in index_dir.glob("*.col")}
    assert grown.keys() == columns.keys() and all(grown[name] > columns[name] for name in columns)
    tree = load(zips, index_dir)
    assert tree.n_files == len(before) + 2 < len(tree.files)
    assert_serves_members(live, zip_members(folder))
    assert_serves_members(old, before)


def test_extensions_follow_each_other_until_half_the_rows_shown_are_unused(tmp_path: Path, bench_scale: ModuleType,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Four imgtypes: a grown pretrain half merges that imgtype's chunk folders again (both
    halves, about a fifth of the rows), appended to the tree. Its other half grown next
    extends the tree extended (its folders' rows no longer in folder order); a third
    growth, in another imgtype, would leave more unused rows than half the rows shown, so
    the tree is written whole again. Each tree equals a fresh parse."""
    folder = tmp_path / "set"
    bench_scale.write_scale_set(folder, total=20_000, seed=0, packages=4)
    zips, index_dir = zip_paths(folder), tmp_path / "index"
    load(zips, index_dir)
    halves = [p for p in zips if "_pretrain.0" in p.name]
    extended = []
    for i, half in enumerate([halves[0], halves[1], halves[2]]):
        with zipfile.ZipFile(half) as zf:
            chunk = zf.namelist()[-1].rpartition("/")[0]
        _grow(half, f"{chunk}/AAAAA000{i}-24.jpg", b"grown\n" * (i + 1))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
            tree = load(zips, index_dir)
        assert len(_log(caplog, CARRIED)) == 1 and not _log(caplog, CANNOT)
        extended.append(_log(caplog, CARRIED)[0].endswith(EXTENDED))
        fresh = load(zips, None)
        assert_same_tree(tree, fresh)
        assert tree.extra["archive_folders"] == fresh.extra["archive_folders"]
        assert_same_tree(load(zips, index_dir), fresh)
    assert extended == [True, True, False]
    assert tree.n_files == len(tree.files)
    assert_tree_matches_zipfile(tree, zip_members(folder))


@pytest.mark.no_c
def test_views_are_built_from_a_tree_written_whole(tmp_path: Path, bench_scale: ModuleType) -> None:
    """A mount without views extended the image tree (a train zip grown); the next, with
    views, builds the image tree whole again (the views are built from whole columns),
    and its views tree equals a fresh build's."""
    folder = tmp_path / "set"
    bench_scale.write_scale_set(folder, total=20_000, seed=0, packages=4)
    load_script("bench_views").write_csv(folder / METADATA_ZIP, bench_scale.scale_ids(20_000, 0))
    zips, index_dir = zip_paths(folder), tmp_path / "index"
    load(zips, index_dir)
    train = next(p for p in zips if p.name.endswith("_train.zip"))
    _grow(train, "bioscan5m/images/cropped_256/train/AAAAA0009-24.jpg", b"9")
    images = load(zips, index_dir)
    assert images.n_files < len(images.files)
    tree = load(zips, index_dir, views=RANKS)
    assert tree.find_dir(0, b"views") > 0
    assert_same_tree(tree, load(zips, None, views=RANKS))


def test_rows_taken_from_an_extended_tree_keep_their_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """b.zip grown in d/: the extended tree has d's rows after e's. Three archives changed
    next (more than are parsed ahead: every row of the unchanged a.zip, in d and in e, is
    taken from the extended tree): each row keeps its folder, and the tree equals a fresh
    parse."""
    folder = tmp_path / "set"
    folder.mkdir()
    for name, members in (("a.zip", ["d/1.jpg", "e/2.jpg"]), ("b.zip", ["d/3.jpg"]), ("c.zip", ["f/4.jpg"]),
                          ("g.zip", ["h/5.jpg"])):
        with zipfile.ZipFile(folder / name, "w") as zf:
            for member in members:
                zf.writestr(member, member.encode())
    zips, index_dir = zip_paths(folder), tmp_path / "index"
    load(zips, index_dir)
    _grow(zips[1], "d/6.jpg", b"6")
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        extended = load(zips, index_dir)
    assert _log(caplog, CARRIED)[0].endswith(EXTENDED)
    d, e = extended.find_dir(0, b"d"), extended.find_dir(0, b"e")
    assert extended.dir_lo[d] > extended.dir_lo[e]
    for zip_path, member in ((zips[1], "d/7.jpg"), (zips[2], "f/8.jpg"), (zips[3], "h/9.jpg")):
        _grow(zip_path, member, member.encode())
    tree = load(zips, index_dir)
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(folder))


def test_reports_of_an_extended_tree_count_the_files_shown(two_packages: Path, tmp_path: Path) -> None:
    """``info`` and ``verify`` read whole columns: on an extended tree they count and check
    the files shown, not the rows left unshown, each archive's as a fresh parse does."""
    zips, index_dir = zip_paths(two_packages), tmp_path / "index"
    load(zips, index_dir)
    half = next(p for p in zips if p.name.endswith("_pretrain.01.zip"))
    _grow(half, "bioscan5m/images/cropped_256/pretrain/new-folder/AAAAA0002-24.jpg", b"new\n")
    with Collection(str(two_packages), index_dir=str(index_dir)) as extended, \
            Collection(str(two_packages), index_dir=None) as fresh:
        assert extended.tree.n_files < len(extended.tree.files)
        assert describe(extended) == describe(fresh)
        assert verify_members(extended, None, 2, lambda done: None) == ([], len(zip_members(two_packages)))
        assert extended.encrypted_members() == 0
