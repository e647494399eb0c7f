"""The command line without a mount (issue 9: info, ls, cat, verify, path, index, --help,
user errors); the Python API it is built on is tested in test_collection.py.

Commands run as ``python -m bioscanfs`` in a subprocess on the generated set, with the
index cache in a temporary folder; what they print is compared with zipfile's view of
the same archives.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
import subprocess
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from conftest import (
    Member,
    assert_one_error_line,
    copy_archives,
    data_offset,
    expected_tree,
    flip_byte,
    largest_image,
    listing,
    run_cli,
    zip_members,
    zip_paths,
)

from bioscanfs.cli import main as cli_group
from bioscanfs.layout import image_path

METHOD_NAMES = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
#: The sample paths of bioscan5m.md ("Paths inside the zips"), under images/cropped_256/.
DOCUMENTED_SAMPLES = [
    "pretrain/00/AACTA1040-20.jpg", "pretrain/ff/YGEN686-22.jpg", "train/0/AACTA1026-20.jpg",
    "val/AACTA161-20.jpg", "key_unseen/AACTA5263-20.jpg", "other_heldout/f/YDBB6502-21.jpg",
]


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XDG_CACHE_HOME of every command run here: the default index folder lives under it."""
    return tmp_path_factory.mktemp("xdg_cache")


#: ``run_cli`` with the module's cache folder (the default index folder lives under it).
Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def cli(cache_home: Path) -> Cli:
    return functools.partial(run_cli, env=dict(os.environ, XDG_CACHE_HOME=str(cache_home)))


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout


def _image_parts(path: str) -> Optional[Tuple[str, str]]:
    """(imgtype, split) of an image member path, None for other members."""
    parts = path.split("/")
    return (parts[2], parts[3]) if parts[:2] == ["bioscan5m", "images"] else None


def _package_of(archive: Path) -> str:
    """The package an archive holds, from its members' paths (zipfile)."""
    with zipfile.ZipFile(archive) as zf:
        kinds = {(_image_parts(i.filename) or ("metadata", ""))[0] for i in zf.infolist()}
    assert len(kinds) == 1, (archive, kinds)
    return kinds.pop()


def _expected_splits(members: Dict[str, Member]) -> Dict[str, Dict[str, Dict[str, int]]]:
    """package -> split -> members and bytes ('-' for the metadata)."""
    out: Dict[str, Dict[str, Dict[str, int]]] = defaultdict(dict)
    for path, member in members.items():
        package, split = _image_parts(path) or ("metadata", "-")
        entry = out[package].setdefault(split, {"members": 0, "bytes": 0})
        entry["members"] += 1
        entry["bytes"] += member.info.file_size
    return dict(out)


def _methods(archive: Path) -> Dict[str, int]:
    with zipfile.ZipFile(archive) as zf:
        return dict(Counter(METHOD_NAMES[i.compress_type] for i in zf.infolist() if not i.is_dir()))


# -- info -------------------------------------------------------------------------------------
def test_info_json_equals_zipfile(cli: Cli, fake_set: Path, fake_members: Dict[str, Member]) -> None:
    """Counts and bytes per split, archives per package, methods per archive, totals."""
    report = json.loads(_ok(cli("info", fake_set, "--json")))
    expected = _expected_splits(fake_members)
    assert {p: entry["splits"] for p, entry in report["packages"].items()} == expected
    listed = {a["archive"]: (package, a) for package, entry in report["packages"].items() for a in entry["archives"]}
    assert set(listed) == {str(p) for p in zip_paths(fake_set)}
    served = Counter(str(m.archive) for m in fake_members.values())
    for archive in zip_paths(fake_set):
        package, entry = listed[str(archive)]
        assert package == _package_of(archive), archive
        assert entry["methods"] == _methods(archive), archive
        assert entry["members_served"] == served[str(archive)], archive
        assert entry["kind"] == "zip" and entry["pieces"] == [archive.name]
    assert report["totals"] == {"members": len(fake_members), "archives": len(zip_paths(fake_set)),
                                "bytes": sum(m.info.file_size for m in fake_members.values())}
    assert (report["duplicates"], report["conflicts"], report["warnings"]) == (0, [], [])


def test_info_table_equals_zipfile(cli: Cli, fake_set: Path, fake_members: Dict[str, Member]) -> None:
    """The text report: one block per package, a line per split and per archive, totals."""
    lines = _ok(cli("info", fake_set)).splitlines()
    for package, splits in _expected_splits(fake_members).items():
        assert package in lines
        for split, numbers in splits.items():
            pattern = rf"^  {re.escape(split)} +{numbers['members']:,} members +{numbers['bytes']:,} bytes$"
            assert any(re.match(pattern, line) for line in lines), (pattern, lines)
    served = Counter(m.archive.name for m in fake_members.values())
    for archive in zip_paths(fake_set):
        methods = ", ".join(f"{name} {n:,}" for name, n in sorted(_methods(archive).items()))
        assert f"  archive {archive.name}: {served[archive.name]:,} members served; {methods}" in lines
    total = sum(m.info.file_size for m in fake_members.values())
    assert f"total: {len(fake_members):,} members, {total:,} bytes, {len(zip_paths(fake_set))} archives" in lines


# -- ls ---------------------------------------------------------------------------------------
def _largest_chunk_folder(members: Dict[str, Member]) -> str:
    counts = Counter(path.rpartition("/")[0] for path in members if _image_parts(path)
                     and _image_parts(path)[1] == "pretrain")  # type: ignore[index]
    return max(sorted(counts), key=lambda folder: counts[folder])


def test_ls_root_splits_and_chunk_folder(cli: Cli, fake_set: Path, fake_members: Dict[str, Member]) -> None:
    tree = expected_tree(fake_members)
    chunk = _largest_chunk_folder(fake_members)
    # The commands map the index a default mount makes: with the metadata zip, views/ too.
    tree[""] = tree[""] | {"views"}
    tree["views"] = set()
    for folder in ("", "bioscan5m/images/cropped_256", "bioscan5m/images/cropped_256/pretrain", chunk):
        args = ("ls", fake_set, folder) if folder else ("ls", fake_set)
        assert _ok(cli(*args)).splitlines() == listing(tree, folder), folder


def test_ls_long_and_a_file(cli: Cli, fake_set: Path, fake_members: Dict[str, Member]) -> None:
    """`ls -l`: kind, exact size and the entry's time (UTC); a file path lists itself."""
    chunk = _largest_chunk_folder(fake_members)
    lines = _ok(cli("ls", "-l", fake_set, chunk)).splitlines()
    names = sorted(expected_tree(fake_members)[chunk])
    assert len(lines) == len(names)
    for line, name in zip(lines, names):
        member = fake_members[f"{chunk}/{name}"]
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(member.mtime))
        assert line.split() == ["-", str(member.info.file_size), *stamp.split(), name]
    path = f"{chunk}/{names[0]}"
    assert _ok(cli("ls", fake_set, path)).splitlines() == [names[0]]
    parent = chunk.rpartition("/")[0]
    long_dir = _ok(cli("ls", "-l", fake_set, parent)).splitlines()
    assert any(line.split()[0] == "d" and line.split()[-1] == chunk.rpartition("/")[2] for line in long_dir)


# -- cat --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["stored", "deflated", "metadata-csv"])
def test_cat_writes_the_member_bytes(cli: Cli, fake_set: Path, fake_members: Dict[str, Member], which: str) -> None:
    if which == "metadata-csv":
        path = next(p for p in fake_members if p.endswith(".csv"))
    else:
        path = largest_image(fake_members, deflated=which == "deflated")
    member = fake_members[path]
    assert member.deflated == (which != "stored")
    done = cli("cat", fake_set, path, binary=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == member.read()


# -- verify -----------------------------------------------------------------------------------
def test_verify_a_good_set(cli: Cli, fake_set: Path, fake_members: Dict[str, Member]) -> None:
    out = _ok(cli("verify", fake_set))
    assert "BAD" not in out
    assert out.splitlines()[-1] == f"{len(fake_members)} members checked, 0 bad"
    out = _ok(cli("verify", fake_set, "--sample", 5, "-j", 2))
    assert out.splitlines()[-1] == "5 members checked, 0 bad"


@dataclass(frozen=True)
class Corrupt:
    folder: Path
    bad: Dict[str, Path]     #: corrupt member -> its archive
    total: int               #: members in the folder


@pytest.fixture(scope="module")
def corrupt_set(fake_set: Path, bench_scale: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Corrupt:
    """A copy of one generated zip with a data byte flipped in a stored and in a deflated
    image, next to a written stored zip whose 40 MiB member (over the 32 MiB read whole:
    served by ranges) has a flipped byte too."""
    folder = copy_archives(fake_set, tmp_path_factory.mktemp("corrupt"), ["BIOSCAN_5M_original_256.zip"])
    images = zip_members(folder)
    payload = np.random.default_rng(9).integers(0, 256, (40 << 20) + 7, dtype=np.uint8).tobytes()
    bench_scale.write_stored_zip(folder / "big_stored.zip", [b"big/stored.bin", b"big/small.txt"],
                                 [payload, b"small\n"], 0x4A00, 0x58AE)
    members = zip_members(folder)
    bad = {path: members[path].archive for path in
           (largest_image(images, deflated=False), largest_image(images, deflated=True), "big/stored.bin")}
    for path, archive in bad.items():
        info = members[path].info
        flip_byte(archive, data_offset(archive, info) + info.compress_size // 2)
        with zipfile.ZipFile(archive) as zf, pytest.raises((zipfile.BadZipFile, zlib.error)):
            zf.read(path)
    return Corrupt(folder, bad, len(members))


def test_verify_reports_each_corrupt_member(cli: Cli, corrupt_set: Corrupt) -> None:
    """Exit 1 and one 'BAD archive: member: why' line per corrupt member, whole set or sampled."""
    for extra in ((), ("--sample", corrupt_set.total), ("-j", 1)):
        done = cli("verify", corrupt_set.folder, *extra)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        reported = [line for line in done.stdout.splitlines() if line.startswith("BAD ")]
        assert len(reported) == len(corrupt_set.bad), done.stdout
        for path, archive in corrupt_set.bad.items():
            assert any(line.startswith(f"BAD {archive}: {path}: ") for line in reported), (path, reported)
        assert done.stdout.splitlines()[-1] == f"{corrupt_set.total} members checked, {len(corrupt_set.bad)} bad"


def test_verify_sample_checks_that_many(cli: Cli, corrupt_set: Corrupt) -> None:
    """--sample N checks N members; what it reports is exactly the corrupt ones it drew."""
    for _ in range(3):
        done = cli("verify", corrupt_set.folder, "--sample", 7)
        reported = {line[len("BAD "):] for line in done.stdout.splitlines() if line.startswith("BAD ")}
        assert all(any(line.startswith(f"{archive}: {path}: ") for path, archive in corrupt_set.bad.items())
                   for line in reported), done.stdout
        assert done.returncode == (1 if reported else 0), done.stdout + done.stderr
        assert done.stdout.splitlines()[-1] == f"7 members checked, {len(reported)} bad"
    assert_one_error_line(cli("verify", corrupt_set.folder, "--sample", 0), "--sample")


@pytest.mark.parametrize("which", ["stored", "deflated", "stored-large"])
def test_cat_of_a_corrupt_member_fails(cli: Cli, corrupt_set: Corrupt, which: str) -> None:
    """Exit non-zero with one line naming archive and member, whatever was written before."""
    images = sorted(p for p in corrupt_set.bad if _image_parts(p))
    path = {"stored-large": "big/stored.bin"}.get(which) or next(
        p for p in images if zip_members(corrupt_set.folder)[p].deflated == (which == "deflated"))
    assert_one_error_line(cli("cat", corrupt_set.folder, path), f"{corrupt_set.bad[path]}: {path}: ")


# -- path -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample", DOCUMENTED_SAMPLES)
def test_path_gives_the_documented_sample_paths(cli: Cli, sample: str) -> None:
    split, *_, name = sample.split("/")
    processid = name[:-len(".jpg")]
    out = _ok(cli("path", processid, "--split", split, "--imgtype", "cropped_256")).splitlines()
    assert out == [f"bioscan5m/images/cropped_256/{sample}"]
    assert out == [image_path(processid, split, "cropped_256")]


def test_path_every_imgtype_matches_the_zips(cli: Cli, fake_members: Dict[str, Member]) -> None:
    """Every image of the generated zips, given as processid,split rows on stdin per
    imgtype: `path` prints exactly its member path."""
    by_imgtype: Dict[str, List[str]] = defaultdict(list)
    for path in sorted(fake_members):
        if _image_parts(path):
            by_imgtype[_image_parts(path)[0]].append(path)  # type: ignore[index]
    assert len(by_imgtype) == 4
    for imgtype, paths in sorted(by_imgtype.items()):
        rows = "".join(f"{p.rpartition('/')[2][:-len('.jpg')]},{p.split('/')[3]}\n" for p in paths)
        out = _ok(cli("path", "--csv", "--imgtype", imgtype, stdin="processid,split\n" + rows))
        assert out.splitlines() == paths, imgtype


def test_path_zips_exit_codes(cli: Cli, fake_set: Path, fake_members: Dict[str, Member]) -> None:
    """--zips: 0 when every member exists; 1 and a 'missing:' line per absent member."""
    present = sorted(p for p in fake_members if (_image_parts(p) or ("", ""))[0] == "cropped_256")[:3]
    ids = [(p.rpartition("/")[2][:-len(".jpg")], p.split("/")[3]) for p in present]
    for (processid, split), path in zip(ids, present):
        done = cli("path", processid, "--split", split, "--imgtype", "cropped_256", "--zips", fake_set)
        assert (done.returncode, done.stdout.splitlines(), done.stderr) == (0, [path], ""), done.stderr
    absent = next(s for s in DOCUMENTED_SAMPLES if f"bioscan5m/images/cropped_256/{s}" not in fake_members)
    absent_split, *_, absent_name = absent.split("/")
    absent_path = f"bioscan5m/images/cropped_256/{absent}"
    done = cli("path", absent_name[:-4], "--split", absent_split, "--zips", fake_set)
    assert (done.returncode, done.stdout, done.stderr.splitlines()) == (1, "", [f"missing: {absent_path}"])
    processid, split = ids[0]
    wrong_split = "val" if split != "val" else "test"
    done = cli("path", processid, absent_name[:-4], "--split", wrong_split, "--zips", fake_set)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 2 and all(line.startswith("missing: ") for line in done.stderr.splitlines())


def test_path_csv_from_stdin(cli: Cli, fake_set: Path, fake_members: Dict[str, Member]) -> None:
    """The metadata CSV on stdin (processid and split columns): one path per row, each a
    member of the zips; and plain processids one per line with --split."""
    csv_path = next(p for p in fake_members if p.endswith(".csv"))
    text = fake_members[csv_path].read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    original = {p for p in fake_members if (_image_parts(p) or ("", ""))[0] == "original_256"}
    assert len(rows) == len(original)
    out = _ok(cli("path", "--csv", "--imgtype", "original_256", "--zips", fake_set, stdin=text)).splitlines()
    assert out == [image_path(row["processid"], row["split"], "original_256") for row in rows]
    assert set(out) == original
    val = sorted(p for p in original if p.split("/")[3] == "val")
    plain = "".join(p.rpartition("/")[2][:-len(".jpg")] + "\n" for p in val)
    assert _ok(cli("path", "--csv", "--split", "val", "--imgtype", "original_256", stdin=plain)).splitlines() == val


# -- index ------------------------------------------------------------------------------------
def test_index_command_counts(cli: Cli, fake_set: Path, fake_members: Dict[str, Member], tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    out = _ok(cli("index", fake_set, "--index-dir", index_dir, "--views", "none"))   # views: test_views.py
    match = re.search(r"indexed (\d+) files in (\d+) folders from (\d+) archives", out)
    assert match, out
    assert [int(n) for n in match.groups()] == [len(fake_members), len(expected_tree(fake_members)),
                                                len(zip_paths(fake_set))]
    assert sum(1 for p in index_dir.iterdir() if p.suffix == ".tree") == 1


# -- help and user errors ---------------------------------------------------------------------
@pytest.mark.parametrize("command", [None, *sorted(cli_group.commands)])
def test_every_command_has_help(cli: Cli, command: Optional[str]) -> None:
    done = cli(*([command] if command else []), "--help")
    out = _ok(done)
    assert out.startswith("Usage: ") and (command is None or f" {command} " in out.splitlines()[0])


@pytest.fixture(scope="module")
def no_zips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("no_zips")
    (folder / "readme.txt").write_text("no archives here\n")
    return folder


@pytest.fixture(scope="module")
def garbage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("garbage")
    (folder / "BIOSCAN_5M_cropped_256_eval.zip").write_bytes(b"not a zip\n" * 50)
    return folder


ERRORS = {  # id -> (arguments, with {set} {missing} {empty} {garbage} filled in; what the line names)
    "info-missing-folder": (["info", "{missing}"], "{missing}"),
    "ls-missing-folder": (["ls", "{missing}"], "{missing}"),
    "cat-missing-folder": (["cat", "{missing}", "x.jpg"], "{missing}"),
    "verify-missing-folder": (["verify", "{missing}"], "{missing}"),
    "index-missing-folder": (["index", "{missing}"], "{missing}"),
    "path-missing-zips": (["path", "AACTA1040-20", "--split", "pretrain", "--zips", "{missing}"], "{missing}"),
    "info-no-zips": (["info", "{empty}"], "no zip archives"),
    "ls-no-zips": (["ls", "{empty}"], "no zip archives"),
    "cat-no-zips": (["cat", "{empty}", "x.jpg"], "no zip archives"),
    "verify-no-zips": (["verify", "{empty}"], "no zip archives"),
    "index-no-zips": (["index", "{empty}"], "no zip archives"),
    "info-not-a-zip": (["info", "{garbage}"], "BIOSCAN_5M_cropped_256_eval.zip"),
    "verify-not-a-zip": (["verify", "{garbage}"], "BIOSCAN_5M_cropped_256_eval.zip"),
    "ls-bad-path": (["ls", "{set}", "bioscan5m/no/such"], "bioscan5m/no/such"),
    "ls-path-under-a-file": (["ls", "{set}", "{file}/below"], "{file}/below"),
    "cat-bad-path": (["cat", "{set}", "bioscan5m/no/such.jpg"], "bioscan5m/no/such.jpg"),
    "cat-a-folder": (["cat", "{set}", "bioscan5m/images"], "is a directory"),
    "path-no-split": (["path", "AACTA1040-20"], "no split"),
    "path-bad-split": (["path", "AACTA1040-20", "--split", "nosuch"], "nosuch"),
    "path-bad-imgtype": (["path", "AACTA1040-20", "--split", "val", "--imgtype", "tiny"], "tiny"),
    "path-nothing": (["path"], "--csv"),
    "unknown-command": (["frobnicate"], "frobnicate"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_user_errors_are_one_line(cli: Cli, case: str, fake_set: Path, fake_members: Dict[str, Member],
                                  no_zips: Path, garbage: Path, tmp_path: Path) -> None:
    """Non-zero exit, one 'Error:' line naming the problem, no traceback."""
    values = {"set": str(fake_set), "missing": str(tmp_path / "missing"), "empty": str(no_zips),
              "garbage": str(garbage), "file": largest_image(fake_members, deflated=False)}
    args, mentions = ERRORS[case]
    assert_one_error_line(cli(*[a.format(**values) for a in args]), mentions.format(**values))
