"""The persisted index: round trip, staleness, corrupt index files, scale, lookups, the index command.

Trees come from ``bioscanfs.index.load_tree`` (and ``Collection``) and are compared
with a fresh in-memory parse and with zipfile; scale and lookups are also checked
through a real mount.
"""
from __future__ import annotations

import errno
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pytest
from conftest import (
    Member,
    Mount,
    MountFactory,
    assert_serves_members,
    copy_archives,
    expected_tree,
    fresh_index,
    index_files,
    is_mounted,
    prebuild_index,
    replace_name_bytes,
    run_cli,
    touch,
    zip_contents,
    zip_members,
    zip_paths,
)

from bioscanfs import ArchiveError, Collection, NotFound, store
from bioscanfs.errors import DamagedIndex
from bioscanfs.index import Tree, load_tree
from bioscanfs.sources import open_sources

SMALL_ZIPS = ["BIOSCAN_5M_cropped_256_eval.zip", "BIOSCAN_5M_cropped_256_train.zip"]


def load(zips: Sequence[Path], index_dir: Optional[Path], views: Sequence[str] = ()) -> Tree:
    """The merged tree of ``zips`` (with the views of those ranks) through the public index
    entry point; files closed after."""
    sources = open_sources([([str(path)], False) for path in zips])
    try:
        tree, _ = load_tree(sources, str(index_dir) if index_dir else None, views=views)
    finally:
        for src in sources:
            src.close()
    return tree


def shown_arrays(tree: Tree) -> Dict[str, np.ndarray]:
    """A tree's arrays as a tree built whole holds them: the rows of each folder's range,
    folder after folder (an extended tree's rows that no folder shows are left out)."""
    lo, hi = tree.dir_lo.astype(np.int64), tree.dir_hi.astype(np.int64)
    rows = np.concatenate([np.arange(a, b) for a, b in zip(lo.tolist(), hi.tolist())] + [np.zeros(0, np.int64)])
    ends = tree.name_ends[rows].astype(np.int64)
    begins = np.where(rows > 0, tree.name_ends[np.maximum(rows - 1, 0)].astype(np.int64), 0)
    names = np.concatenate([tree.names[b:e] for b, e in zip(begins.tolist(), ends.tolist())] + [np.zeros(0, np.uint8)])
    dir_hi = np.cumsum(hi - lo).astype(np.uint64)
    return dict(tree.arrays, files=tree.files[rows], names=names, name_ends=np.cumsum(ends - begins).astype(np.uint32),
                dir_lo=dir_hi - (hi - lo).astype(np.uint64), dir_hi=dir_hi)


def assert_same_tree(got: Tree, want: Tree) -> None:
    """Every array (as ``shown_arrays``) and every piece of metadata of two trees is equal."""
    got_arrays, want_arrays = shown_arrays(got), shown_arrays(want)
    for name, a in got_arrays.items():
        b = want_arrays[name]
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert got.n_files == want.n_files
    assert got.archives == want.archives
    assert (got.conflicts, got.warnings, got.total_bytes) == (want.conflicts, want.warnings, want.total_bytes)


def assert_tree_matches_zipfile(tree: Tree, members: Dict[str, Member]) -> None:
    """Paths, sizes, CRCs, methods, times and archives as zipfile reads them (``members``:
    zip_members of the folder, which a module may have read once for several tests)."""
    rows = {path.decode(): row for path, row in tree.file_rows()}
    assert set(rows) == set(members)
    for path, row in rows.items():
        entry, member = tree.files[row], members[path]
        assert tree.archives[int(entry["archive"])] == str(member.archive), path
        assert int(entry["size"]) == member.info.file_size, path
        assert int(entry["compressed_size"]) == member.info.compress_size, path
        assert int(entry["crc32"]) == member.info.CRC, path
        assert int(entry["method"]) == member.info.compress_type, path
        assert int(entry["mtime"]) == member.mtime, path


@pytest.fixture
def small_set(fake_set: Path, tmp_path: Path) -> Path:
    """A private copy of two small generated zips, free to be edited."""
    return copy_archives(fake_set, tmp_path / "set", SMALL_ZIPS)


# -- round trip and staleness -------------------------------------------------------------------
def test_index_round_trip_equals_fresh_parse(fake_set: Path, tmp_path: Path) -> None:
    """Built, persisted, then mapped back unchanged: equal to an in-memory parse and to zipfile."""
    zips, index_dir = zip_paths(fake_set), tmp_path / "index"
    fresh = load(zips, None)
    built = load(zips, index_dir)
    persisted = index_files(index_dir)
    assert len(persisted) == 1
    assert not list(index_dir.glob("*.members")), "the tree is the whole index: no per-archive tables"
    reloaded = load(zips, index_dir)
    assert index_files(index_dir) == persisted, "the second load rebuilt instead of mapping"
    assert_same_tree(built, fresh)
    assert_same_tree(reloaded, fresh)
    assert_tree_matches_zipfile(reloaded, zip_members(fake_set))


def _replace_same_size(archive: Path) -> None:
    """A new file with the same size and mtime but a renamed member moved over the archive."""
    st = archive.stat()
    copy = archive.with_suffix(".new")
    shutil.copy2(archive, copy)
    with zipfile.ZipFile(copy) as zf:
        old = zf.infolist()[0].filename.encode()
    replace_name_bytes(copy, old, old[:-5] + b"Q.jpg")
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(copy, archive)
    assert (archive.stat().st_size, archive.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_long_names_that_share_a_prefix_are_sorted_and_found(tmp_path: Path) -> None:
    """Names longer than the bytes numpy sorts on, tied there, are put in order in full
    (every one of them, the last of the run too): each is found, and the listing is sorted."""
    names = [f"extra/long-member-name-long-member-name-{i:05d}.txt" for i in (3, 0, 4, 1, 2)]
    with zipfile.ZipFile(tmp_path / "long.zip", "w") as zf:
        for name in names:
            zf.writestr(name, name)
    with Collection(str(tmp_path / "long.zip"), index_dir=None) as c:
        assert c.listdir("extra") == sorted(name.split("/")[1] for name in names)
        for name in names:
            assert c.read(name) == name.encode()


@pytest.mark.parametrize("change", [touch, _replace_same_size], ids=["touched", "replaced-same-size"])
def test_stale_index_is_rebuilt(small_set: Path, tmp_path: Path, change: Callable[[Path], None]) -> None:
    """A changed archive gets a new index that describes its new content."""
    zips, index_dir = zip_paths(small_set), tmp_path / "index"
    load(zips, index_dir)
    before = index_files(index_dir)
    change(zips[0])
    tree = load(zips, index_dir)
    assert set(index_files(index_dir)) - set(before), "no new index was written"
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(small_set))


def test_truncated_archive_is_not_served_from_its_index(small_set: Path, tmp_path: Path) -> None:
    """A truncated archive is re-read, and its missing end record is an ArchiveError."""
    zips, index_dir = zip_paths(small_set), tmp_path / "index"
    load(zips, index_dir)
    os.truncate(zips[0], zips[0].stat().st_size // 2)
    with pytest.raises(ArchiveError) as err:
        load(zips, index_dir)
    assert str(zips[0]) in str(err.value)


# -- corrupt index files --------------------------------------------------------------------------
def array_place(path: Path, array: str) -> Tuple[Path, int]:
    """The file and offset where a named array's bytes start: in the index file, or in
    the column file that its header names (the store's JSON header says)."""
    header = store.read_header(str(path))
    assert header is not None, path
    entry = header["arrays"][array]
    return (path.parent / entry[3] if len(entry) == 4 else path), int(entry[2])


def flip_in(path: Path, array: str, at: int, mask: int = 0x40) -> None:
    """Flip a bit ``at`` bytes into a named array of an index file."""
    file, offset = array_place(path, array)
    _flip(file, offset + at, mask)


def _flip(path: Path, at: int, mask: int = 0x40) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


Corruption = Callable[[Path, Path], None]  # (index file, a valid index file of other archives)
CORRUPTIONS: Dict[str, Corruption] = {
    "flip-magic": lambda p, other: _flip(p, 0),
    "flip-header-offset": lambda p, other: _flip(p, 9, 0x01),
    "flip-header-length": lambda p, other: _flip(p, 17, 0x01),
    "flip-header-json": lambda p, other: _flip(p, p.stat().st_size - 40),
    "truncate-half": lambda p, other: os.truncate(p, p.stat().st_size // 2),
    "truncate-to-10": lambda p, other: os.truncate(p, 10),
    "empty": lambda p, other: os.truncate(p, 0),
    "garbage": lambda p, other: p.write_bytes(np.random.default_rng(1).bytes(p.stat().st_size)),
    "foreign": lambda p, other: shutil.copyfile(other, p),
    # A flipped bit in the row data: the size of the first member.
    "flip-row-data": lambda p, other: flip_in(p, "files", 16),
    # A flipped bit in the first directory name ('bioscan5m' -> 'bioscan5m' with one letter changed).
    "flip-dir-names": lambda p, other: flip_in(p, "dir_names", 0, 0x01),
}
#: Damage in the bulk is found when its unit is first read (tree.py), not at load: the
#: file is then removed, and the next load builds it again.
_FOUND_ON_FIRST_USE = {"flip-row-data"}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_index_file_is_rebuilt(small_set: Path, fake_set: Path, tmp_path: Path, corruption: str) -> None:
    """A damaged index file is never trusted."""
    zips, index_dir = zip_paths(small_set), tmp_path / "index"
    load(zips, index_dir)
    other_dir = tmp_path / "other-index"
    load(zip_paths(fake_set)[:1], other_dir)
    other = next(p for p in other_dir.iterdir() if p.suffix == ".tree")
    targets = [p for p in index_dir.iterdir() if p.suffix == ".tree"]
    for target in targets:
        CORRUPTIONS[corruption](target, other)
    tree = load(zips, index_dir)
    if corruption in _FOUND_ON_FIRST_USE:
        with pytest.raises(DamagedIndex):
            tree.verify_all()
        assert not any(target.exists() for target in targets)
        tree = load(zips, index_dir)
    tree.verify_all()
    assert_same_tree(tree, load(zips, None))
    assert_tree_matches_zipfile(tree, zip_members(small_set))
    # And the rebuilt index is itself good on the next load.
    assert_same_tree(load(zips, index_dir), load(zips, None))


# -- scale: ZIP64 end records and > 65,535 members ---------------------------------------------
@pytest.fixture(scope="module")
def scale_set(tmp_path_factory: pytest.TempPathFactory, bench_scale: ModuleType) -> Path:
    """~300,000 stored members in the four cropped_256 per-split zips (pretrain halves > 65,535),
    indexed once for the module: both engines' mounts and the row-by-row check map it."""
    out = tmp_path_factory.mktemp("scale")
    bench_scale.write_scale_set(out, total=300_000, seed=0)
    prebuild_index([out], tmp_path_factory.mktemp("scale_index"))
    return out


@pytest.fixture(scope="module")
def scale_members(scale_set: Path) -> Dict[str, Member]:
    return zip_members(scale_set)


@dataclass(frozen=True)
class ScaleReference:
    """zipfile's side of the scale set's mount test, read once for both engines (parsing a
    150,000-member directory takes seconds): the tree and the bytes of 300 sampled members."""

    tree: Dict[str, Set[str]]
    sample: Dict[str, bytes]


@pytest.fixture(scope="module")
def scale_reference(scale_set: Path, scale_members: Dict[str, Member]) -> ScaleReference:
    biggest = max(zip_paths(scale_set), key=lambda p: p.stat().st_size)
    assert sum(member.archive == biggest for member in scale_members.values()) > 0xFFFF
    assert b"PK\x06\x06" in biggest.read_bytes()[-200:], "the fixture has no ZIP64 end record"
    sample = np.random.default_rng(3).choice(sorted(scale_members), 300, replace=False).tolist()
    return ScaleReference(expected_tree(scale_members), zip_contents({p: scale_members[p] for p in sample}))


@pytest.mark.slow
def test_zip64_scale_set_through_mount(mount: MountFactory, scale_set: Path, scale_members: Dict[str, Member],
                                       scale_reference: ScaleReference) -> None:
    """Counts, listings and sampled bytes of a > 65,535-member ZIP64 set, vs zipfile."""
    live = mount(scale_set)
    tree = scale_reference.tree
    assert os.statvfs(live.point).f_files == len(scale_members) + len(tree)
    images = "bioscan5m/images/cropped_256"
    folders = [f"{images}/{split}" for split in ("val", "test", "val_unseen", "test_unseen", "key_unseen")]
    folders += [images, f"{images}/pretrain", f"{images}/train", f"{images}/other_heldout",
                f"{images}/pretrain/00", f"{images}/pretrain/7f", f"{images}/pretrain/ff", f"{images}/train/a"]
    for folder in folders:
        assert set(os.listdir(live.path(folder))) == tree[folder], folder
    for path, data in scale_reference.sample.items():
        assert live.path(path).read_bytes() == data, path


@pytest.mark.slow
def test_zip64_scale_set_index_matches_zipfile(scale_set: Path, scale_members: Dict[str, Member],
                                               tmp_path: Path) -> None:
    """The persisted tree of the scale set (built by the fixture) equals zipfile's member
    table, row by row."""
    index_dir = fresh_index([scale_set], tmp_path / "index")
    saved = index_files(index_dir)
    tree = load(zip_paths(scale_set), index_dir)
    assert saved and index_files(index_dir) == saved   # the persisted tree was mapped, not built again
    assert_tree_matches_zipfile(tree, scale_members)


# -- lookups of missing paths ---------------------------------------------------------------
def _missing_paths(members: Dict[str, Member]) -> List[str]:
    """Paths near real ones: a prefix, a suffix, other case, between and after names, long names."""
    files = sorted(p for p in members if p.endswith(".jpg"))
    existing, folder = files[0], files[0].rpartition("/")[0]
    names = sorted(os.path.basename(p) for p in files if p.rpartition("/")[0] == folder)
    between = names[0][:-4] + "0.jpg"
    assert between not in names
    return ["nope", "bioscan5m/nope", "bioscan5m/images/nope/x.jpg", f"{folder}/nope.jpg",
            existing[:-1], existing + "x", f"{folder}/{names[0][:-4]}.JPG", f"{folder}/{between}",
            f"{folder}/zzzzzzzz.jpg", f"{folder}/{'A' * 200}.jpg", folder + "0"]


def test_missing_paths_are_enoent_through_the_mount(fake_mount: Mount, fake_members: Dict[str, Member]) -> None:
    """os.stat and open of absent paths give ENOENT (a file used as a folder: ENOTDIR)."""
    for path in _missing_paths(fake_members):
        for attempt in (os.stat, open):
            with pytest.raises(OSError) as err:
                attempt(fake_mount.path(path))
            assert err.value.errno == errno.ENOENT, (path, attempt)
    with pytest.raises(OSError) as err:
        os.stat(fake_mount.path(next(iter(fake_members)) + "/child"))
    assert err.value.errno == errno.ENOTDIR


def test_missing_paths_are_notfound_from_the_api(fake_set: Path, fake_members: Dict[str, Member],
                                                 tmp_path: Path) -> None:
    """The Python API raises NotFound (errno ENOENT) for the same paths, and for a file as a folder."""
    with Collection(str(fake_set), index_dir=str(tmp_path / "index")) as collection:
        for path in _missing_paths(fake_members) + [next(iter(fake_members)) + "/child"]:
            for attempt in (collection.stat, collection.read, collection.listdir):
                with pytest.raises(NotFound) as err:
                    attempt(path)
                assert err.value.errno == errno.ENOENT, (path, attempt)


# -- an index folder that cannot be written --------------------------------------------------
@pytest.fixture
def blocked_index_dir(tmp_path: Path) -> Path:
    """An index folder whose parent is a regular file: no user, not even root, can create it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way\n")
    return blocker / "index"


def test_unwritable_index_dir_falls_back_to_memory_in_the_api(small_set: Path, blocked_index_dir: Path) -> None:
    """The API keeps the index in memory: same tree as a fresh parse, and bytes still read."""
    zips = zip_paths(small_set)
    assert_same_tree(load(zips, blocked_index_dir), load(zips, None))
    members = zip_members(small_set)
    with Collection(str(small_set), index_dir=str(blocked_index_dir)) as collection:
        for path, member in members.items():
            assert collection.read(path) == member.read(), path
    assert blocked_index_dir.parent.is_file()


def test_unwritable_index_dir_foreground_mount(mount: MountFactory, small_set: Path,
                                               blocked_index_dir: Path) -> None:
    """A foreground mount warns once and serves the tree from memory."""
    live = mount(small_set, index_dir=blocked_index_dir)
    live.expect_log("cannot write the index")
    assert "cannot write the index" in live.log_text()
    members = zip_members(small_set)
    assert_serves_members(live, members)


def test_unwritable_index_dir_daemon_mount(small_set: Path, blocked_index_dir: Path, mountpoint: Path,
                                           engine: str) -> None:
    """Daemon mode: either a working mount, or one clear error line; never a traceback."""
    done = run_cli("mount", small_set, mountpoint, "--index-dir", blocked_index_dir, "--engine", engine)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    if done.returncode == 0:
        members = zip_members(small_set)
        path = next(iter(members))
        assert (mountpoint / path).read_bytes() == members[path].read()
        assert run_cli("umount", mountpoint).returncode == 0
    else:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not is_mounted(mountpoint)


def test_unwritable_index_dir_index_command(small_set: Path, blocked_index_dir: Path) -> None:
    """`bioscanfs index` says it cannot write the index folder, without a traceback."""
    done = run_cli("index", small_set, "--index-dir", blocked_index_dir)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert "cannot write the index" in output and str(blocked_index_dir) in output, output


# -- the index command -------------------------------------------------------------------------
def test_index_command_then_mount_uses_it(mount: MountFactory, fake_set: Path, tmp_path: Path,
                                          fake_members: Dict[str, Member]) -> None:
    """`bioscanfs index` builds what the next mount maps: no index file is rewritten or added."""
    index_dir = tmp_path / "index"
    done = run_cli("index", fake_set, "--index-dir", index_dir, "--views", "none")   # as the mount fixture
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    built = index_files(index_dir)
    assert sum(name.endswith(".tree") for name in built) == 1
    live = mount(fake_set, index_dir=index_dir)
    path = sorted(fake_members)[0]
    assert live.path(path).read_bytes() == fake_members[path].read()
    assert index_files(index_dir) == built


# -- the same member in several archives ---------------------------------------------------------
def _all_in_one(per_split: Path, out: Path, changed: Optional[str] = None) -> None:
    """The all-in-one package rebuilt from the per-split zips (optionally one member altered)."""
    with zipfile.ZipFile(out, "w") as dst:
        for archive in zip_paths(per_split):
            with zipfile.ZipFile(archive) as src:
                for info in src.infolist():
                    data = src.read(info)
                    dst.writestr(info, data + b"altered" if info.filename == changed else data)


def test_duplicates_across_packages_are_one_file(fake_set: Path, tmp_path: Path) -> None:
    """All-in-one next to per-split zips: one file per path, no conflict when bytes agree."""
    folder = copy_archives(fake_set, tmp_path / "set", SMALL_ZIPS)
    _all_in_one(folder, tmp_path / "BIOSCAN_5M_cropped_256.zip")
    shutil.move(str(tmp_path / "BIOSCAN_5M_cropped_256.zip"), folder)
    tree = load(zip_paths(folder), None)
    assert tree.conflicts == []
    assert_tree_matches_zipfile(tree, zip_members(folder))


def test_conflicting_duplicate_first_archive_wins(fake_set: Path, tmp_path: Path) -> None:
    """Different bytes under one path: the first archive by name serves it, and it is recorded."""
    folder = copy_archives(fake_set, tmp_path / "set", SMALL_ZIPS)
    changed = sorted(zip_members(folder))[0]
    first = folder / "BIOSCAN_5M_cropped_256.zip"  # '.' sorts before '_': listed before the per-split zips
    _all_in_one(folder, tmp_path / first.name, changed)
    shutil.move(str(tmp_path / first.name), folder)
    members = zip_members(folder)
    assert members[changed].archive == first
    with Collection(str(folder), index_dir=None) as collection:
        assert [(c.path, c.archives[0]) for c in collection.tree.conflicts] == [(changed, str(first))]
        assert collection.read(changed) == members[changed].read()
