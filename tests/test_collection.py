"""The Python API the commands are built on (``bioscanfs.Collection``): listings, stats,
paths, reads and file objects, errors, and one Collection shared by many threads.

Every expected value comes from zipfile's view of the shared generated set.
"""
from __future__ import annotations

import io
import json
import random
import shutil
import stat
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest
from conftest import MOUNT_TIMEOUT, Member, expected_tree, largest_image, listing, zip_contents

from bioscanfs import BioscanError, Collection, NotFound


@pytest.fixture(scope="module")
def collection(fake_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collection]:
    """One Collection of the shared set for the read-only tests."""
    with Collection(str(fake_set), index_dir=str(tmp_path_factory.mktemp("api_index"))) as c:
        yield c


def test_collection_listdir_stat_paths(collection: Collection, fake_members: Dict[str, Member]) -> None:
    """Listings (directories first, each sorted), file and directory stats, and paths()."""
    tree = expected_tree(fake_members)
    for folder in tree:
        assert collection.listdir(folder) == listing(tree, folder), folder
        st = collection.stat(folder)
        subdirs = sum(1 for name in tree[folder] if (f"{folder}/{name}" if folder else name) in tree)
        assert (st.mode, st.size, st.nlink) == (stat.S_IFDIR | 0o555, 0, 2 + subdirs), folder
    for path, member in fake_members.items():
        assert collection.stat(path) == (stat.S_IFREG | 0o444, member.info.file_size, member.mtime, 1), path
        assert collection.stat("/" + path) == collection.stat(path)
    every = list(collection.paths())
    assert len(every) == len(set(every)) and set(every) == set(fake_members)
    for folder in ("bioscan5m/images/cropped", "bioscan5m/images/cropped_256/pretrain", "bioscan5m/metadata"):
        assert set(collection.paths(folder)) == {p for p in fake_members if p.startswith(folder + "/")}, folder


def test_collection_directory_mtime_is_its_newest_file(collection: Collection,
                                                       fake_members: Dict[str, Member]) -> None:
    newest: Dict[str, int] = defaultdict(int)
    for path, member in fake_members.items():
        parts = path.split("/")
        for depth in range(len(parts)):
            folder = "/".join(parts[:depth])
            newest[folder] = max(newest[folder], member.mtime)
    wrong = {folder: (collection.stat(folder).mtime, mtime) for folder, mtime in newest.items()
             if collection.stat(folder).mtime != mtime}
    assert not wrong, wrong


def test_collection_read_and_open(collection: Collection, fake_members: Dict[str, Member]) -> None:
    """read() whole and in windows, open() with seek/tell, for every member."""
    expected = zip_contents(fake_members)
    for path, data in expected.items():
        assert collection.read(path) == data, path
        size = len(data)
        for offset, length in ((0, 1), (size // 2, 4097), (size - 1, 10), (size, 1), (size + 5, 1)):
            assert collection.read(path, length, offset) == data[offset:offset + length], (path, offset)
        with collection.open(path) as f:
            assert f.seek(size // 3) == size // 3
            assert f.read(100) == data[size // 3:size // 3 + 100]
            assert f.seek(-7, io.SEEK_END) == size - 7 and f.read() == data[-7:]
            assert f.seek(0) == 0 and f.read() == data and f.tell() == size


def test_collection_errors(collection: Collection, fake_members: Dict[str, Member]) -> None:
    file_path = largest_image(fake_members, deflated=True)
    for call in (lambda: collection.read("bioscan5m/no/such.jpg"), lambda: collection.stat("nosuch"),
                 lambda: collection.listdir(file_path), lambda: collection.read("bioscan5m/images"),
                 lambda: collection.open("bioscan5m"), lambda: collection.listdir(file_path + "/x")):
        with pytest.raises(NotFound):
            call()


@pytest.mark.parametrize("cache_size", [256 << 20, 1024], ids=["cache", "no-cache"])
def test_collection_from_many_threads(fake_set: Path, fake_members: Dict[str, Member], tmp_path: Path,
                                      cache_size: int) -> None:
    """One Collection, eight threads reading every member three times in random order,
    whole and through open(); with a cache too small to keep any decoded member too."""
    expected = zip_contents(fake_members)
    jobs = [(path, how) for path in expected for how in ("read", "open", "window")]
    random.Random(5).shuffle(jobs)

    def read(job: Tuple[str, str]) -> Tuple[str, str, bool]:
        path, how = job
        data = expected[path]
        if how == "read":
            got = c.read(path)
        elif how == "open":
            with c.open(path) as f:
                got = f.read()
        else:
            got = c.read(path, len(data) // 2 + 1, len(data) // 3)
            data = data[len(data) // 3:len(data) // 3 + len(data) // 2 + 1]
        return path, how, got == data

    with Collection(str(fake_set), index_dir=str(tmp_path / "index"), cache_size=cache_size) as c, \
            ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(read, jobs))
    wrong = [(path, how) for path, how, ok in results if not ok]
    assert not wrong, wrong[:10]
    assert len(results) == 3 * len(fake_members)


_APART = """
import json, sys
import bioscanfs
events = []
try:
    c = bioscanfs.Collection(sys.argv[1], index_dir=sys.argv[2], build_apart=True, views=(),
                             on_archive=lambda *event: events.append(event))
except bioscanfs.BioscanError as err:
    print(json.dumps({"error": type(err).__name__ + ": " + str(err)}))
else:
    print(json.dumps({"files": len(c.tree.files), "done": [e[2] for e in events], "persisted": c.tree.persisted,
                      "merge imported": "bioscanfs.merge" in sys.modules}))
"""


def _built_apart(folder: Path, index_dir: Path) -> Dict[str, object]:
    """Collection(build_apart=True) in a fresh interpreter: what it saw."""
    done = subprocess.run([sys.executable, "-c", _APART, str(folder), str(index_dir)], capture_output=True,
                          text=True, timeout=MOUNT_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_tree_built_apart_is_built_in_a_child_and_mapped_here(fake_set: Path, tmp_path: Path) -> None:
    """A missing index is built in a child process (this one never imports the builder),
    the child's progress is told here archive by archive, and the tree mapped here is
    the one an in-process build gives; the next Collection maps it too."""
    seen = _built_apart(fake_set, tmp_path / "index")
    archives = len(list(fake_set.glob("*.zip")))
    assert seen["done"] == list(range(1, archives + 1)) and seen["persisted"], seen
    assert not seen["merge imported"], "the tree was built in this process"
    with Collection(str(fake_set), index_dir=str(tmp_path / "other"), views=()) as here:
        assert seen["files"] == len(here.tree.files)
    assert _built_apart(fake_set, tmp_path / "index")["done"] == []   # mapped, not built again


def test_an_error_of_a_build_apart_is_its_one_line(fake_set: Path, tmp_path: Path) -> None:
    """A bad archive stops the child's build; its one line is raised here."""
    folder = tmp_path / "set"
    shutil.copytree(fake_set, folder)
    (folder / "BIOSCAN_5M_cropped_256_train.zip").write_bytes(b"not a zip" * 100)
    with pytest.raises(BioscanError) as here:
        Collection(str(folder), index_dir=str(tmp_path / "here"), views=())
    assert _built_apart(folder, tmp_path / "index") == {"error": f"SourceError: {here.value}"}
