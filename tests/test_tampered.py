"""A tampered or damaged index (issues 16, 17): the index folder is untrusted input, to
Python and to C.

Each case rewrites a real index with one kind of bad table and a valid CRC (anyone who
can write the folder can recompute it), then checks that the Python checks
(``tree.check``) and the C engine's own (``_nativefs.check``, no FUSE needed) both refuse
it. A mount of the tampered folder, on both engines, rebuilds the index with one warning
when the fault is in a table checked up front; when it is in the bulk (files, names,
checked unit by unit on first use), what touches the bad unit gets EIO, the rest is
served right, never a wrong byte, and the next mount rebuilds the index. A flipped byte
(no CRC recomputed) in any column is found the same ways. These tests also run under
AddressSanitizer (scripts/test): a table the C side failed to bound would be caught there.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Set, Tuple

import numpy as np
import pytest
from conftest import (
    Mount,
    MountFactory,
    assert_serves_members,
    copy_archives,
    expected_tree,
    run_cli,
    zip_contents,
    zip_members,
)

from bioscanfs import Collection, nativefs, store
from bioscanfs.errors import DamagedIndex
from bioscanfs.tree import ARRAY_TYPES, LAZY_COLUMNS, BadTables, Tree, check

SET = ["BIOSCAN_5M_cropped_256_eval.zip", "BIOSCAN_5M_cropped_256_train.zip"]
#: The bulk columns of a tree without views (links: test_views.py, on a views index).
BULK = [name for name in LAZY_COLUMNS if name in ARRAY_TYPES]
Arrays = Dict[str, np.ndarray]


def _longer_name(a: Arrays) -> None:
    """The first file's name grows to 300 bytes (a stack buffer of 256 in C before)."""
    ends = a["name_ends"].astype(np.int64)
    a["names"] = np.concatenate((a["names"][:ends[0]], np.full(300 - ends[0], ord("x"), np.uint8),
                                 a["names"][ends[0]:]))
    a["name_ends"] = (ends + 300 - ends[0]).astype(a["name_ends"].dtype)


def _longer_dir_name(a: Arrays) -> None:
    """Directory 1's own name grows to 300 bytes."""
    ends = a["dir_ends"].astype(np.int64)
    a["dir_names"] = np.concatenate((a["dir_names"][:ends[0]], np.full(300, ord("d"), np.uint8),
                                     a["dir_names"][ends[0]:]))
    a["dir_ends"] = np.concatenate((ends[:1], ends[1:] + 300)).astype(np.uint64)


def _set(name: str, index: Any, value: Any, field: str = "") -> Callable[[Arrays], None]:
    def edit(a: Arrays) -> None:
        target = a[name][field] if field else a[name]
        target[index] = value
    return edit


def _slash_in_dir_name(a: Arrays) -> None:
    a["dir_names"][int(a["dir_ends"][0])] = ord("/")


def _dot_dot_dir(a: Arrays) -> None:
    """Directory 1 renamed '..' (names never lead out of the mount)."""
    ends = a["dir_ends"].astype(np.int64)
    a["dir_names"] = np.concatenate((a["dir_names"][:ends[0]], np.frombuffer(b"..", np.uint8),
                                     a["dir_names"][ends[1]:]))
    a["dir_ends"] = np.concatenate((ends[:1], ends[1:] - (ends[1] - ends[0]) + 2)).astype(np.uint64)


#: Each kind of bad table, as an edit of a good tree's arrays.
CASES: Dict[str, Callable[[Arrays], None]] = {
    "name-over-255": _longer_name,
    "dir-name-over-255": _longer_dir_name,
    "name-end-past-names": _set("name_ends", -1, (1 << 32) - 1),   # 32-bit ends
    "name-ends-backwards": _set("name_ends", 0, 1 << 20),
    "dir-end-past-names": _set("dir_ends", -1, 1 << 40),
    "slash-in-dir-name": _slash_in_dir_name,
    "dot-dot-dir": _dot_dot_dir,
    "archive-out-of-range": _set("files", 0, 7, "archive"),
    "offset-past-archive": _set("files", 0, 1 << 40, "header_offset"),
    "size-past-archive": _set("files", 0, 1 << 40, "compressed_size"),
    "size-over-2^63": _set("files", 0, 1 << 63, "size"),
    "parent-after-child": _set("dir_parent", 1, 5),
    "row-range-past-files": _set("dir_hi", -1, 1 << 30),
    "row-ranges-overlap": _set("dir_lo", -1, 0),
    "conflict-archive-out-of-range": lambda a: a.update(
        conflict_paths=np.frombuffer(b"x", np.uint8), conflict_path_ends=np.array([1], np.uint64),
        conflict_archives=np.array([9], np.uint16), conflict_archive_ends=np.array([1], np.uint64)),
}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory, fake_set: Path) -> Path:
    return copy_archives(fake_set, tmp_path_factory.mktemp("tampered") / "set", SET)


def _tree_file(index_dir: Path) -> Path:
    (path,) = index_dir.glob("*.tree")
    return path


def read_tree(path: Path) -> Tuple[Any, Arrays, Any]:
    """(key, arrays as writable copies, extra) of a saved tree."""
    header = store.read_header(str(path))
    assert header is not None
    loaded = store.load(str(path), header["key"])
    assert loaded is not None
    extra = loaded.pop("__extra__")
    loaded.pop("__blocks__")
    return header["key"], {name: np.array(array) for name, array in loaded.items()}, extra


@pytest.fixture(scope="module")
def good_index(tmp_path_factory: pytest.TempPathFactory, small_set: Path) -> Iterator[Tuple[Path, Any, Arrays, Any]]:
    index_dir = tmp_path_factory.mktemp("good-index")
    Collection(str(small_set), index_dir=str(index_dir)).close()
    path = _tree_file(index_dir)
    yield (path, *read_tree(path))


#: Small units and CRC blocks for the mount tests: the test set then has many of each, so
#: a bad one shows that the others are still served.
UNIT_ROWS, CRC_BLOCK = 4, 64


def tampered(good: Tuple[Path, Any, Arrays, Any], case: str, index_dir: Path) -> Arrays:
    """Write the good index with one bad table (no bad table for case ""), under its own
    valid key and CRCs, in units of UNIT_ROWS rows and CRC blocks of CRC_BLOCK bytes."""
    path, key, arrays, extra = good
    arrays = {name: array.copy() for name, array in arrays.items()}
    if case:
        CASES[case](arrays)
    index_dir.mkdir()
    store.save(str(index_dir / path.name), key, arrays, dict(extra, unit_rows=UNIT_ROWS), block=CRC_BLOCK)
    return arrays


def _sizes(small_set: Path) -> list:
    return [p.stat().st_size for p in sorted(small_set.glob("*.zip"))]


def test_the_good_index_passes_both_checks(good_index, small_set: Path) -> None:
    """The checks refuse only what is wrong: the untampered tables pass in Python and in C."""
    _, _, arrays, _ = good_index
    sizes = _sizes(small_set)
    check(arrays, sizes)
    fds = np.full(len(sizes), -1, np.int64)
    nativefs.check_tables(arrays, fds, fds, sizes)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_table_is_refused_by_python_and_by_c(case: str, good_index, small_set: Path, tmp_path: Path) -> None:
    arrays = tampered(good_index, case, tmp_path / "index")
    sizes = _sizes(small_set)
    with pytest.raises(BadTables):
        check(arrays, sizes)
    if case.startswith("conflict"):
        return  # conflict lists are not handed to C
    fds = np.full(len(sizes), -1, np.int64)
    with pytest.raises(ValueError, match="native engine"):
        nativefs.check_tables(arrays, fds, fds, sizes)


@pytest.mark.parametrize("case", ["dir-name-over-255", "dot-dot-dir", "parent-after-child", "row-range-past-files"])
def test_mount_of_a_tampered_index_rebuilds_it_and_serves_right(case: str, good_index, small_set: Path,
                                                                 tmp_path: Path, mount: MountFactory) -> None:
    index_dir = tmp_path / "index"
    tampered(good_index, case, index_dir)
    live = mount(small_set, index_dir=index_dir)
    live.expect_log(r"index .* is damaged .*; rebuilding it")
    assert_serves_members(live, zip_members(small_set))
    assert "is damaged" in live.log_text()
    check(read_tree(_tree_file(index_dir))[1], _sizes(small_set))  # the rebuilt index replaced it


def served_or_eio(live: Mount, listings: Dict[str, Set[str]], contents: Dict[str, bytes]) -> List[str]:
    """List each folder and read each file through the mount: each is what is expected
    (from zipfile), or fails with EIO (never other names or bytes). Returns what failed."""
    failed = []
    for folder, names in listings.items():
        try:
            assert set(os.listdir(live.path(folder))) == names, folder
        except OSError as err:
            assert err.errno == errno.EIO, folder
            failed.append(folder + "/")
    for path, data in contents.items():
        try:
            assert live.path(path).read_bytes() == data, path
        except OSError as err:
            assert err.errno == errno.EIO, path
            failed.append(path)
    return failed


def _assert_found_and_rebuilt(live: Mount, tree_file: Path, small_set: Path, mount: MountFactory) -> None:
    """Some of the mount failed with EIO and the rest read right; it said so in its log
    and removed the index; the next mount builds it again and serves all of it right."""
    members = zip_members(small_set)
    failed = served_or_eio(live, expected_tree(members), zip_contents(members))
    assert failed and len([path for path in failed if not path.endswith("/")]) < len(members), failed
    assert f"index {tree_file} is damaged" in live.log_text()
    assert not tree_file.exists()
    again = mount(small_set, index_dir=tree_file.parent)
    assert_serves_members(again, members)
    check(read_tree(_tree_file(tree_file.parent))[1], _sizes(small_set))


@pytest.mark.parametrize("case", ["name-over-255", "archive-out-of-range", "offset-past-archive", "size-over-2^63"])
def test_bad_rows_are_found_when_first_read_and_never_served(case: str, good_index, small_set: Path,
                                                              tmp_path: Path, mount: MountFactory) -> None:
    """A bad file row (valid CRCs): the mount starts without reading the rows; the unit
    holding it fails when a request first touches it (EIO), the others serve."""
    index_dir = tmp_path / "index"
    tampered(good_index, case, index_dir)
    live = mount(small_set, index_dir=index_dir)
    live.expect_log(r"is damaged")
    _assert_found_and_rebuilt(live, _tree_file(index_dir), small_set, mount)


def flip(path: Path, column: str) -> None:
    """Flip one bit in the middle of a column of a saved index (its CRCs left as they were)."""
    spec, shape, offset = store.read_header(str(path))["arrays"][column]
    at = offset + int(np.prod(shape)) * store._dtype_from_json(spec).itemsize // 2
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("column", BULK)
def test_a_flipped_bit_in_the_bulk_is_found_by_python_and_by_c(column: str, good_index, small_set: Path,
                                                                tmp_path: Path) -> None:
    """The per-block CRCs: Tree's check on first use and the C engine's both refuse the
    flipped block (the rest of the file passes store.load, which leaves them lazy)."""
    index_dir = tmp_path / "index"
    tampered(good_index, "", index_dir)
    path = _tree_file(index_dir)
    flip(path, column)
    loaded = store.load(str(path), store.read_header(str(path))["key"], lazy=LAZY_COLUMNS)
    assert loaded is not None
    sizes = _sizes(small_set)
    fds = np.full(len(sizes), -1, np.int64)
    with pytest.raises(ValueError, match="native engine: a block of .* does not match its CRC-32"):
        nativefs.check_tables(loaded, fds, fds, sizes, UNIT_ROWS)
    with pytest.raises(DamagedIndex, match="does not match its CRC-32"):
        Tree(loaded, [], sizes, persisted=True).verify_all()
    assert not path.exists()   # removed: the next mount builds it again


@pytest.mark.parametrize("column", [*BULK, "dir_names", "dir_lo"])
def test_a_flipped_bit_anywhere_is_found_and_never_served(column: str, good_index, small_set: Path, tmp_path: Path,
                                                           mount: MountFactory) -> None:
    """In a column checked up front: the index reads as absent and the mount rebuilds it;
    in the bulk: what touches the block gets EIO, the rest serves, the next mount rebuilds."""
    index_dir = tmp_path / "index"
    tampered(good_index, "", index_dir)
    path = _tree_file(index_dir)
    before = path.stat().st_ino
    flip(path, column)
    live = mount(small_set, index_dir=index_dir)
    if column in BULK:
        live.expect_log(r"is damaged")
        _assert_found_and_rebuilt(live, path, small_set, mount)
    else:
        assert_serves_members(live, zip_members(small_set))
        assert path.stat().st_ino != before   # rebuilt before serving


@pytest.mark.no_c
@pytest.mark.parametrize("command", ["verify", "info"])
def test_commands_that_read_every_row_rebuild_a_damaged_index_first(command: str, good_index, small_set: Path,
                                                                     tmp_path: Path) -> None:
    """verify and info check the whole index before reading its rows: a flipped bit in the
    bulk has the index built again, and the command reports on the archives (verify: no
    member listed BAD for the index's fault)."""
    index_dir = tmp_path / "index"
    tampered(good_index, "", index_dir)
    path = _tree_file(index_dir)
    before = path.stat().st_ino
    flip(path, "files")
    done = run_cli(command, small_set, "--index-dir", index_dir)
    assert done.returncode == 0, done.stderr
    assert "is damaged" in done.stderr and "BAD" not in done.stdout
    if command == "verify":
        assert f"{len(zip_members(small_set))} members checked, 0 bad" in done.stdout
    assert _tree_file(index_dir).stat().st_ino != before   # built again
