"""Split forms of a package (issue 6): raw byte splits, Info-ZIP spanned sets, standalone
parts, missing pieces, duplicates across package forms, and the index of split archives.

Every form is made from a generated zip: raw splits by cutting its bytes in Python,
spanned sets by Info-ZIP (`zip -s`) over the members zipfile extracted. Expected bytes,
trees and conflicts come from zipfile (or from the extracted files); everything is read
through real FUSE mounts or the CLI.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Set, Tuple

import pytest
from conftest import (
    Member,
    MountFactory,
    assert_one_error_line,
    assert_serves_members,
    copy_archives,
    data_offset,
    expected_tree,
    index_files,
    is_mounted,
    mounted,
    run_cli,
    walk_mount,
    zip_contents,
    zip_members,
    zip_paths,
)

from bioscanfs.layout import EVAL_SPLITS
from bioscanfs.tree import ROW_COLUMNS

ORIGINAL_256 = "BIOSCAN_5M_original_256.zip"
METADATA = "BIOSCAN_5M_Insect_Dataset_metadata_MultiTypes.zip"
SPANNED = "BIOSCAN_5M_cropped_eval"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # APPNOTE 4.3.7: signature ... name and extra lengths


def _copy_folder(src: Path, dst: Path, leave_out: Tuple[str, ...] = ()) -> Path:
    """Copy every file of a folder (pieces too, not only .zip files), except ``leave_out``."""
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.name not in leave_out:
            shutil.copy2(path, dst / path.name)
    return dst


def _info(folder: Path, index_dir: Path) -> dict:
    done = run_cli("info", folder, "--json", "--index-dir", index_dir)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout)


def _archives(report: dict) -> List[dict]:
    return [archive for package in report["packages"].values() for archive in package["archives"]]


def _read_direct(path: Path, offset: int, length: int) -> bytes:
    """One O_DIRECT pread: the offset and size reach the filesystem as they are."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


# -- raw byte splits -------------------------------------------------------------------------
@dataclass(frozen=True)
class RawSplit:
    folder: Path                 #: the three pieces and the metadata zip
    reference: Path              #: the unsplit archive and the metadata zip
    pieces: List[Path]
    crossing: Dict[str, int]     #: member -> a piece boundary (archive offset) inside it


@pytest.fixture(scope="module")
def raw_split(fake_set: Path, tmp_path_factory: pytest.TempPathFactory) -> RawSplit:
    """BIOSCAN_5M_original_256.zip cut into .001/.002/.003 of equal size (last shorter)."""
    base = tmp_path_factory.mktemp("raw_split")
    reference = copy_archives(fake_set, base / "reference", [ORIGINAL_256, METADATA])
    folder = base / "split"
    folder.mkdir()
    shutil.copy2(reference / METADATA, folder / METADATA)
    archive = reference / ORIGINAL_256
    data = archive.read_bytes()
    piece = -(-len(data) // 3)
    pieces = []
    for k in range(3):
        path = folder / f"{ORIGINAL_256}.{k + 1:03d}"
        path.write_bytes(data[k * piece:(k + 1) * piece])
        pieces.append(path)
    assert pieces[0].stat().st_size == pieces[1].stat().st_size >= pieces[2].stat().st_size > 0
    crossing = {}
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            end = data_offset(archive, info) + info.compress_size
            for boundary in (piece, 2 * piece):
                if info.header_offset < boundary < end:
                    crossing[info.filename] = boundary
    assert crossing, "no member crosses a piece boundary"
    return RawSplit(folder, reference, pieces, crossing)


def test_raw_split_serves_every_member(mount: MountFactory, raw_split: RawSplit, tmp_path: Path) -> None:
    """The pieces read as one archive: the tree and every member equal zipfile's view of the
    unsplit archive, members cut by a piece boundary included (also read across the cut)."""
    members = zip_members(raw_split.reference)
    expected = zip_contents(members)
    live = mount(raw_split.folder)
    assert walk_mount(live.point) == expected_tree(members)
    for path, data in expected.items():
        assert live.path(path).read_bytes() == data, path
    archive = raw_split.reference / ORIGINAL_256
    for path, boundary in raw_split.crossing.items():
        info = members[path].info
        cut = boundary - data_offset(archive, info)
        if info.compress_type == zipfile.ZIP_STORED and 0 < cut < info.file_size:
            for offset, length in ((cut - 1, 2), (max(cut - 4096, 0), 8192), (0, info.file_size)):
                assert _read_direct(live.path(path), offset, length) == expected[path][offset:offset + length]
    report = _info(raw_split.folder, tmp_path / "info-index")
    [split] = [a for a in _archives(report) if a["kind"] != "zip"]
    assert split["kind"] == "raw split" and split["pieces"] == [p.name for p in raw_split.pieces]
    assert split["members_served"] == sum(1 for m in members.values() if m.archive.name == ORIGINAL_256)


# -- Info-ZIP spanned sets -------------------------------------------------------------------
@dataclass(frozen=True)
class Spanned:
    folder: Path                 #: the spanned set (.z01 ... .zip) and the metadata zip
    source: Path                 #: the extracted files the set was made from
    pieces: List[Path]           #: in disk order
    crossing: List[str]          #: members whose local header and data span a disk boundary


def _spanned_extents(pieces: List[Path]) -> Dict[str, Tuple[int, int]]:
    """Member -> (start, end) in the concatenated pieces, from zipfile's central directory.

    zipfile reads the directory of the concatenation but adds one shift to every local
    header offset; the shift is the disk start for which every member's corrected offset
    holds a local header signature.
    """
    blob = b"".join(p.read_bytes() for p in pieces)
    bases = [0]
    for p in pieces[:-1]:
        bases.append(bases[-1] + p.stat().st_size)
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
    shifts = [s for s in bases
              if all(i.volume < len(bases) and 0 <= i.header_offset - s + bases[i.volume] < len(blob)
                     and blob[i.header_offset - s + bases[i.volume]:][:4] == b"PK\x03\x04" for i in infos)]
    assert len(shifts) == 1, shifts
    extents = {}
    for info in infos:
        start = info.header_offset - shifts[0] + bases[info.volume]
        _, name_len, extra_len = _LOCAL_HEADER.unpack_from(blob, start)
        extents[info.filename] = (start, start + _LOCAL_HEADER.size + name_len + extra_len + info.compress_size)
    return extents


@pytest.fixture(scope="module")
def spanned(make_fake: ModuleType, fake_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Spanned:
    """The eval splits of a generated cropped package, extracted by zipfile and zipped again
    by Info-ZIP as a 64 KiB spanned set named like a package."""
    if shutil.which("zip") is None:
        pytest.skip("Info-ZIP `zip` is not installed; it writes the spanned sets")
    base = tmp_path_factory.mktemp("spanned")
    make_fake.make_set(base / "gen", images=3000, imgtypes=("cropped",), deflate_fraction=0.4, seed=4)
    source = base / "source"
    for archive in zip_paths(base / "gen"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(source, [i for i in zf.infolist()
                                   if i.filename.startswith("bioscan5m/images/")
                                   and i.filename.split("/")[3] in EVAL_SPLITS])
    folder = base / "set"
    folder.mkdir()
    subprocess.run(["zip", "-q", "-r", "-s", "64k", str(folder / f"{SPANNED}.zip"), "bioscan5m"],
                   cwd=source, check=True, capture_output=True)
    pieces = sorted(folder.glob(f"{SPANNED}.z[0-9]*")) + [folder / f"{SPANNED}.zip"]
    assert len(pieces) >= 4, pieces
    shutil.copy2(fake_set / METADATA, folder / METADATA)
    extents = _spanned_extents(pieces)
    assert set(extents) == {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    bases, total = set(), 0
    for p in pieces[:-1]:
        total += p.stat().st_size
        bases.add(total)
    crossing = sorted(name for name, (start, end) in extents.items() if any(start < b < end for b in bases))
    assert crossing, "no member crosses a disk boundary"
    return Spanned(folder, source, pieces, crossing)


def _source_files(source: Path) -> Dict[str, bytes]:
    return {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}


def test_spanned_set_serves_every_member(mount: MountFactory, spanned: Spanned, fake_set: Path,
                                         tmp_path: Path) -> None:
    """An Info-ZIP spanned set mounts as one archive: the tree and every member equal the
    files it was made from, members spanning disks included."""
    expected = _source_files(spanned.source)
    expected.update(zip_contents(zip_members(copy_archives(fake_set, tmp_path / "meta", [METADATA]))))
    live = mount(spanned.folder)
    assert walk_mount(live.point) == expected_tree(expected)
    for path, data in expected.items():
        assert live.path(path).read_bytes() == data, path
    for path in spanned.crossing:
        data = expected[path]
        for offset in range(0, len(data), 8191):
            assert _read_direct(live.path(path), offset, 8191) == data[offset:offset + 8191], (path, offset)
    report = _info(spanned.folder, tmp_path / "info-index")
    [span] = [a for a in _archives(report) if a["kind"] != "zip"]
    assert span["kind"] == "spanned" and span["pieces"] == [p.name for p in spanned.pieces]
    assert span["members_served"] == len(_source_files(spanned.source))


# -- missing pieces --------------------------------------------------------------------------
#: case -> (which fixture, piece left out, what the message must name)
MISSING = {
    "raw-middle": ("raw", f"{ORIGINAL_256}.002", f"{ORIGINAL_256}.002"),
    "raw-last": ("raw", f"{ORIGINAL_256}.003", ORIGINAL_256),
    "spanned-first": ("spanned", f"{SPANNED}.z01", f"{SPANNED}.z01"),
    "spanned-last": ("spanned", f"{SPANNED}.zip", f"{SPANNED}.zip"),
}


def _incomplete(request: pytest.FixtureRequest, case: str, tmp_path: Path) -> Tuple[Path, str]:
    kind, leave_out, named = MISSING[case]
    src = request.getfixturevalue("raw_split" if kind == "raw" else "spanned").folder
    assert (src / leave_out).exists()
    return _copy_folder(src, tmp_path / "incomplete", (leave_out,)), named


# One engine: the mount is refused while indexing, before any engine serves.
@pytest.mark.parametrize("case", sorted(MISSING))
def test_missing_piece_refuses_the_mount(request: pytest.FixtureRequest, case: str, tmp_path: Path,
                                         mountpoint: Path) -> None:
    """A split or spanned archive with a piece missing: `mount` exits non-zero with one
    line naming the piece (or the archive, when nothing tells which piece is gone)."""
    folder, named = _incomplete(request, case, tmp_path)
    done = run_cli("mount", folder, mountpoint, "--index-dir", tmp_path / "index")
    assert_one_error_line(done, named)
    assert not is_mounted(mountpoint)


@pytest.mark.parametrize("case", [
    "raw-middle",
    "raw-last",
    "spanned-first",
    "spanned-last",
])
def test_allow_incomplete_mounts_the_rest(request: pytest.FixtureRequest, mount: MountFactory, case: str,
                                          fake_set: Path, tmp_path: Path) -> None:
    """With --allow-incomplete the incomplete archive is left out with a warning naming the
    missing piece, and the other archives of the folder are served."""
    folder, named = _incomplete(request, case, tmp_path)
    rest = zip_members(copy_archives(fake_set, tmp_path / "rest", [METADATA]))
    live = mount(folder, args=["--allow-incomplete"])
    live.expect_log(re.escape(named))
    warnings = [line for line in live.log_text().splitlines() if named in line]
    assert any(re.search(r"warning", line, re.IGNORECASE) for line in warnings), live.log_text()
    assert walk_mount(live.point) == expected_tree(rest)
    for path, data in zip_contents(rest).items():
        assert live.path(path).read_bytes() == data, path


# -- standalone parts ------------------------------------------------------------------------
@pytest.mark.parametrize("digits", [
    2,
    3,
])
def test_standalone_parts_gap_mounts_with_a_warning(mount: MountFactory, fake_set: Path, tmp_path: Path,
                                                    digits: int) -> None:
    """.01.zip and .03.zip without .02.zip: both parts are served, and the mount warns
    about the absent part by its file name."""
    stem = "BIOSCAN_5M_original_full"
    folder = tmp_path / "parts"
    folder.mkdir()
    for n in (1, 3):
        shutil.copy2(fake_set / f"{stem}.{n:02d}.zip", folder / f"{stem}.{n:0{digits}d}.zip")
    members = zip_members(folder)
    live = mount(folder)
    live.expect_log("standalone part")
    absent = f"{stem}.{2:0{digits}d}.zip"
    assert any("warning" in line and absent in line for line in live.log_text().splitlines()), live.log_text()
    assert_serves_members(live, members)


# -- duplicates across package forms ----------------------------------------------------------
def _write_copy(dst: Path, members: Dict[str, Member], contents: Dict[str, bytes]) -> None:
    """A zip of ``contents`` at the members' paths and times, every member stored."""
    with zipfile.ZipFile(dst, "w") as zf:
        for path in sorted(contents):
            zf.writestr(zipfile.ZipInfo(path, members[path].info.date_time), contents[path])


def test_all_in_one_and_per_split_zips_are_one_tree(mount: MountFactory, fake_set: Path, tmp_path: Path) -> None:
    """The per-split cropped_256 zips next to an all-in-one zip of the same members (stored,
    where some per-split members are deflated): each path once, right bytes, no conflict."""
    per_split = [p.name for p in zip_paths(fake_set) if p.name.startswith("BIOSCAN_5M_cropped_256_")]
    assert len(per_split) >= 3
    folder = copy_archives(fake_set, tmp_path / "both", per_split)
    split_members = zip_members(folder)
    contents = zip_contents(split_members)
    assert any(m.deflated for m in split_members.values())
    _write_copy(folder / "BIOSCAN_5M_cropped_256.zip", split_members, contents)
    served = zip_members(folder)
    assert set(served) == set(split_members)
    live = mount(folder)  # teardown fails the test on any warning: no conflict may be reported
    assert walk_mount(live.point) == expected_tree(served)
    for path, data in contents.items():
        assert live.path(path).read_bytes() == data, path
    report = _info(folder, tmp_path / "info-index")
    assert report["conflicts"] == []
    assert report["duplicates"] == len(split_members)
    assert report["totals"]["members"] == len(split_members)
    by_archive = Counter(str(m.archive) for m in served.values())
    assert {a["archive"]: a["members_served"] for a in _archives(report)} == {
        str(p): by_archive.get(str(p), 0) for p in zip_paths(folder)}


@dataclass(frozen=True)
class ConflictSet:
    folder: Path
    conflicts: Set[str]      #: paths whose size or CRC differs between the two archives
    same: int                #: paths in both archives with the same size and CRC


#: altered copy's name -> how it sorts against BIOSCAN_5M_cropped_256_train.zip
ALTERED = {"altered-sorts-first": "BIOSCAN_5M_cropped_256.zip",
           "altered-sorts-last": "repacked_cropped_256_train.zip"}


def _conflict_set(fake_set: Path, dst: Path, altered_name: str) -> ConflictSet:
    """The train zip plus a copy of it in which one member grew a byte, one changed a byte
    (same size, other CRC), and the rest are the same bytes (stored, other method)."""
    folder = copy_archives(fake_set, dst, ["BIOSCAN_5M_cropped_256_train.zip"])
    members = zip_members(folder)
    contents = zip_contents(members)
    paths = sorted(contents)
    assert len(paths) >= 4
    changed = dict(contents)
    changed[paths[0]] += b"\0"
    changed[paths[1]] = changed[paths[1]][:-1] + bytes([changed[paths[1]][-1] ^ 1])
    _write_copy(folder / altered_name, members, changed)
    infos = [{i.filename: (i.file_size, i.CRC) for i in zipfile.ZipFile(p).infolist()} for p in zip_paths(folder)]
    conflicts = {p for p in paths if infos[0][p] != infos[1][p]}
    return ConflictSet(folder, conflicts, len(paths) - len(conflicts))


@pytest.mark.parametrize("altered", sorted(ALTERED))
def test_conflicting_content_first_archive_wins(mount: MountFactory, fake_set: Path, tmp_path: Path,
                                                altered: str) -> None:
    """The same path with other bytes in two archives: the archive whose path sorts first
    is served, the mount warns with the count (again on a remount from the index), and
    `info` lists every conflict with the archives in precedence order."""
    case = _conflict_set(fake_set, tmp_path / "conflict", ALTERED[altered])
    assert len(case.conflicts) == 2
    served = zip_members(case.folder)  # the first archive in path order wins
    expected = zip_contents(served)
    index_dir = tmp_path / "index"
    for _ in range(2):
        live = mount(case.folder, index_dir=index_dir)
        live.expect_log("paths differ between archives")
        assert f"warning: {len(case.conflicts)} paths differ between archives" in live.log_text()
        for path, data in expected.items():
            assert live.path(path).read_bytes() == data, path
    first, second = zip_paths(case.folder)
    done = run_cli("info", case.folder, "--index-dir", index_dir)
    assert done.returncode == 0, done.stderr
    for path in case.conflicts:
        assert f"  {path}: {first.name} > {second.name}" in done.stdout.splitlines(), done.stdout
    assert f"first archive wins): {len(case.conflicts)}" in done.stdout
    report = _info(case.folder, index_dir)
    assert sorted((c["path"], c["archives"]) for c in report["conflicts"]) == sorted(
        (path, [str(first), str(second)]) for path in case.conflicts)


def test_info_counts_same_content_duplicates_apart_from_conflicts(fake_set: Path, tmp_path: Path) -> None:
    case = _conflict_set(fake_set, tmp_path / "conflict", ALTERED["altered-sorts-first"])
    done = run_cli("info", case.folder, "--index-dir", tmp_path / "index")
    assert done.returncode == 0, done.stderr
    assert f"duplicates (same path, same content): {case.same:,}" in done.stdout.splitlines(), done.stdout


# -- the persistent index of split archives ----------------------------------------------------
def test_index_covers_split_and_spanned_archives(raw_split: RawSplit, spanned: Spanned, fake_set: Path,
                                                tmp_path: Path, engine: str) -> None:
    """A folder with a raw split, a spanned set and a plain zip: the first mount writes one
    index per archive and the merged tree; the second mount reads them and rewrites none."""
    folder = tmp_path / "forms"
    folder.mkdir()
    for piece in raw_split.pieces + spanned.pieces:
        shutil.copy2(piece, folder / piece.name)
    shutil.copy2(fake_set / METADATA, folder / METADATA)
    expected = zip_contents(zip_members(raw_split.reference))
    expected.update(_source_files(spanned.source))
    index_dir = tmp_path / "index"
    with mounted([folder], tmp_path / "first", index_dir=index_dir, engine=engine) as live:
        assert walk_mount(live.point) == expected_tree(expected)
    before = index_files(index_dir)
    assert sorted(Path(name).suffix for name in before) == [".tree"]
    assert sorted(name for name in os.listdir(index_dir) if not name.endswith(".col")) == sorted(before)
    assert len(list(index_dir.glob("*.col"))) == len(ROW_COLUMNS)
    with mounted([folder], tmp_path / "second", index_dir=index_dir, engine=engine) as live:
        assert walk_mount(live.point) == expected_tree(expected)
        for path, data in expected.items():
            assert live.path(path).read_bytes() == data, path
    assert index_files(index_dir) == before
    assert sorted(name for name in os.listdir(index_dir) if not name.endswith(".col")) == sorted(before)
    assert len(list(index_dir.glob("*.col"))) == len(ROW_COLUMNS)
