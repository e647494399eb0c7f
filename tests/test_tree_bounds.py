"""Hostile central directories (issue 21 rows 1, 2, 6, 15 and minor cases): the index costs
what the archive honestly is, never a length a header declares.

Every archive is written byte by byte with tests/craft.py; memory is the peak RSS
(VmHWM) of the foreground mount process, which builds the index and then serves.
"""
from __future__ import annotations

import errno
import json
import os
import zipfile
import zlib
from pathlib import Path

import pytest
from conftest import MountFactory, assert_one_error_line, rss, run_cli
from craft import LOCAL, Entry, local_record, raw_deflate, write_directory, write_zip

#: What a hostile case may cost the process that indexes and serves it.
PEAK_LIMIT = 300 << 20


def _index_bytes(index_dir: Path) -> int:
    return sum(p.stat().st_size for p in index_dir.iterdir() if p.suffix in (".tree", ".members"))


def test_one_huge_name_among_many_short_ones_costs_its_own_length(mount: MountFactory, tmp_path: Path) -> None:
    """Row 1: 70,000 one-byte names and one of 65,000 bytes (components of 200): the long
    one is skipped (over PATH_MAX) with one warning; names cost O(total bytes)."""
    folder = tmp_path / "zips"
    folder.mkdir()
    long_name = b"/".join([b"d" * 200] * 324) + b"/x"
    short = [b"%x" % i for i in range(70_000)]
    write_zip(folder / "names.zip", [Entry(name, b"") for name in short] + [Entry(long_name, b"long")])
    live = mount(folder)
    live.expect_log(r"path is longer than 4095 bytes: skipped")
    assert set(os.listdir(live.point)) == {name.decode() for name in short}
    assert rss(live.pid, "VmHWM") < PEAK_LIMIT
    lines = live.log_text().splitlines()
    assert any("path is longer" in line for line in lines)
    assert max(map(len, lines)) < 1000   # the 65,000-byte name is not written out whole


def test_deep_folders_cost_their_own_names(mount: MountFactory, tmp_path: Path) -> None:
    """Row 2: 60 members each 2,000 folders deep (paths just under PATH_MAX): folders are
    stored by their own names, so the index stays small and the server light."""
    folder = tmp_path / "zips"
    folder.mkdir()
    entries = [Entry(b"%02d/" % i + b"a/" * 1990 + b"leaf", b"deep %d" % i) for i in range(60)]
    entries.append(Entry(b"a/" * 30_000 + b"too-deep", b"x"))   # over PATH_MAX: skipped
    write_zip(folder / "deep.zip", entries)
    live = mount(folder)
    live.expect_log(r"path is longer than 4095 bytes: skipped")
    leaf = live.point / ("07/" + "a/" * 1990 + "leaf")
    assert leaf.read_bytes() == b"deep 7"
    assert sorted(os.listdir(live.point)) == ["%02d" % i for i in range(60)]
    assert _index_bytes(live.index_dir) < 10 << 20
    assert rss(live.pid, "VmHWM") < PEAK_LIMIT


def _shared_stream_zip(path: Path, members: int = 16, plain: int = 3 << 20) -> None:
    """An honest member, then ``members`` local headers whose extra-field lengths all point
    at one deflate stream placed after them; their central extents do not overlap."""
    stream = raw_deflate(bytes(plain), 9)
    honest = Entry(b"honest", b"honest member")
    gap = LOCAL.size + 1 + len(stream)   # each header's lower-bound extent ends at the next
    with open(path, "wb") as out:
        out.write(local_record(honest))
        placed = [(honest, 0)]
        start = out.tell() + members * gap
        for i in range(members):
            at = out.tell()
            shared = Entry(bytes([ord("a") + i]), stream, method=8, size=plain, crc=zlib.crc32(bytes(plain)),
                           local_extra=bytes(start - at - LOCAL.size - 1), central_extra=b"")
            out.write(local_record(shared)[:LOCAL.size + 1])  # header and name; its "extra" is what follows
            out.write(bytes(at + gap - out.tell()))
            placed.append((shared, at))
        out.write(stream)
        write_directory(out, placed)


def test_members_sharing_one_stream_through_local_extra_fields(mount: MountFactory, tmp_path: Path) -> None:
    """Row 15: only the last member owns the stream; the others' data would start inside
    another member's extent, so they get EIO (and verify lists them), the honest one reads."""
    folder = tmp_path / "zips"
    folder.mkdir()
    _shared_stream_zip(folder / "shared.zip")
    live = mount(folder)
    live.expect_log(r"local extra field runs into the next member")
    assert (live.point / "honest").read_bytes() == b"honest member"
    assert (live.point / "p").read_bytes() == bytes(3 << 20)
    for name in "abcdefghijklmno":
        with pytest.raises(OSError) as err:
            (live.point / name).read_bytes()
        assert err.value.errno == errno.EIO, name
    done = run_cli("verify", folder, "--index-dir", tmp_path / "verify-index")
    assert done.returncode == 1
    assert done.stdout.count("BAD ") == 15 and "17 members checked, 15 bad" in done.stdout, done.stdout


def test_impossible_size_is_skipped_and_totals_stay_right(mount: MountFactory, tmp_path: Path) -> None:
    """A declared size of 2^63 or more: skipped with one warning (stat's st_size is signed)."""
    folder = tmp_path / "zips"
    folder.mkdir()
    huge = Entry(b"huge", b"abc", size=1 << 63, zip64=True)
    write_zip(folder / "sizes.zip", [Entry(b"ok", b"fine"), huge, Entry(b"also", b"fine too")])
    live = mount(folder)
    live.expect_log(r"declare a size of 2\^63 bytes or more: skipped")
    assert sorted(os.listdir(live.point)) == ["also", "ok"]
    assert (live.point / "ok").read_bytes() == b"fine"
    report = json.loads(run_cli("info", folder, "--json", "--index-dir", tmp_path / "info-index").stdout)
    sizes = [split["bytes"] for package in report["packages"].values() for split in package["splits"].values()]
    assert sum(sizes) == len(b"fine") + len(b"fine too")


def test_name_twice_in_one_archive_serves_the_last_as_zipfile_does(mount: MountFactory, tmp_path: Path) -> None:
    folder = tmp_path / "zips"
    folder.mkdir()
    write_zip(folder / "twice.zip", [Entry(b"a.txt", b"first"), Entry(b"b.txt", b"b"), Entry(b"a.txt", b"second!")])
    live = mount(folder)
    live.expect_log(r"paths differ")
    with zipfile.ZipFile(folder / "twice.zip") as zf:
        assert zf.read("a.txt") == b"second!"
    assert (live.point / "a.txt").read_bytes() == b"second!"
    assert os.stat(live.point / "a.txt").st_size == 7


@pytest.mark.slow
def test_more_archives_than_the_archive_column_holds_are_refused(tmp_path: Path) -> None:
    """Row 6: archive numbers are 16 bits; 65,537 archives are refused in one line, not
    served from the wrong archive."""
    folder = tmp_path / "many"
    folder.mkdir()
    template = tmp_path / "one.zip"
    write_zip(template, [Entry(b"x", b"x")])
    data = template.read_bytes()
    for i in range(65_537):
        (folder / f"a{i:05d}.zip").write_bytes(data)
    done = run_cli("info", folder, "--index-dir", tmp_path / "index")
    assert_one_error_line(done, "65,537 archives: at most 65,536 can be mounted together")
