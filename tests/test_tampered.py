"""A tampered index (issue 16): the index folder is untrusted input, to Python and to C.

Each case rewrites a real index with one kind of bad table and a valid CRC (anyone who
can write the folder can recompute it), then checks that the Python checks
(``tree.check``) and the C engine's own (``_nativefs.check``, no FUSE needed) both refuse
it, and that a mount of the tampered folder, on both engines, rebuilds the index with one
warning and serves exactly what zipfile reads. These tests also run under AddressSanitizer
(scripts/test): a table the C side failed to bound would be caught there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np
import pytest
from conftest import MountFactory, assert_serves_members, copy_archives, zip_members

from bioscanfs import Collection, nativefs, store
from bioscanfs.tree import BadTables, check

SET = ["BIOSCAN_5M_cropped_256_eval.zip", "BIOSCAN_5M_cropped_256_train.zip"]
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


def _read_tree(path: Path) -> Tuple[Any, Arrays, Any]:
    """(key, arrays as writable copies, extra) of a saved tree."""
    header = store.read_header(str(path))
    assert header is not None
    loaded = store.load(str(path), header["key"])
    assert loaded is not None
    extra = loaded.pop("__extra__")
    return header["key"], {name: np.array(array) for name, array in loaded.items()}, extra


@pytest.fixture(scope="module")
def good_index(tmp_path_factory: pytest.TempPathFactory, small_set: Path) -> Iterator[Tuple[Path, Any, Arrays, Any]]:
    index_dir = tmp_path_factory.mktemp("good-index")
    Collection(str(small_set), index_dir=str(index_dir)).close()
    path = _tree_file(index_dir)
    yield (path, *_read_tree(path))


def _tampered(good: Tuple[Path, Any, Arrays, Any], case: str, index_dir: Path) -> Arrays:
    """Write the good index with one bad table, under its own valid key and CRC."""
    path, key, arrays, extra = good
    arrays = {name: array.copy() for name, array in arrays.items()}
    CASES[case](arrays)
    index_dir.mkdir()
    store.save(str(index_dir / path.name), key, arrays, extra)
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
    arrays = _tampered(good_index, case, tmp_path / "index")
    sizes = _sizes(small_set)
    with pytest.raises(BadTables):
        check(arrays, sizes)
    if case.startswith("conflict"):
        return  # conflict lists are not handed to C
    fds = np.full(len(sizes), -1, np.int64)
    with pytest.raises(ValueError, match="native engine"):
        nativefs.check_tables(arrays, fds, fds, sizes)


@pytest.mark.parametrize("case", ["name-over-255", "dir-name-over-255", "archive-out-of-range",
                                  "offset-past-archive", "dot-dot-dir", "parent-after-child"])
def test_mount_of_a_tampered_index_rebuilds_it_and_serves_right(case: str, good_index, small_set: Path,
                                                                 tmp_path: Path, mount: MountFactory) -> None:
    index_dir = tmp_path / "index"
    _tampered(good_index, case, index_dir)
    live = mount(small_set, index_dir=index_dir)
    live.expect_log(r"index .* is damaged .*; rebuilding it")
    assert_serves_members(live, zip_members(small_set))
    assert "is damaged" in live.log_text()
    check(_read_tree(_tree_file(index_dir))[1], _sizes(small_set))  # the rebuilt index replaced it
