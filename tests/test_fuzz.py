"""Fuzzing the central-directory parser and the reader with hypothesis.

Damaged archives must raise only the project's own errors: ArchiveError when the
directory cannot be used, MemberError (a BioscanError) when one member cannot be
served. Anything else (IndexError, OverflowError, MemoryError...) would reach FUSE as
EINVAL with a traceback, or crash a command.
"""
from __future__ import annotations

import io
import zipfile
from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bioscanfs.errors import ArchiveError, BioscanError
from bioscanfs.reader import Reader
from bioscanfs.sources import BytesSource
from bioscanfs.zipdir import Member, Members, Source, read_members


def _seed_archive() -> bytes:
    """A small zip with stored, deflated and ZIP64-flagged members, written by zipfile."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("bioscan5m/images/cropped_256/val/AACTA161-20.jpg", b"\xff\xd8" + bytes(range(200)))
        zf.writestr(zipfile.ZipInfo("bioscan5m/images/cropped_256/train/0/AACTA1026-20.jpg"),
                    b"jpeg" * 300, compress_type=zipfile.ZIP_DEFLATED)
        with zf.open("bioscan5m/metadata/csv/x.csv", "w", force_zip64=True) as member:
            member.write(b"processid,split\n" * 50)
    return out.getvalue()


SEED = _seed_archive()


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """The seed archive with a few bytes overwritten, a slice cut out, or cut short."""
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    kind = draw(st.sampled_from(["flip", "cut", "truncate"]))
    if kind == "cut":
        start = draw(st.integers(0, len(data) - 1))
        del data[start:start + draw(st.integers(1, 64))]
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    return bytes(data)


def _read_all(members: Members, src: Source) -> List[bytes]:
    reader = Reader([src], cache_bytes=1 << 20)
    out = []
    for row in members.table:
        member = Member._make(row.item())
        try:
            out.append(reader.read(member, "member", member.size + 10, 0))
        except BioscanError:
            out.append(b"")
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_damaged_archives_raise_only_project_errors(data: bytes) -> None:
    src = BytesSource(data, "fuzz.zip")
    try:
        members = read_members(src)
    except ArchiveError as err:
        assert str(err).startswith("fuzz.zip: ")
        return
    _read_all(members, src)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_arbitrary_bytes_are_refused_cleanly(data: bytes) -> None:
    with pytest.raises(ArchiveError):
        read_members(BytesSource(data + b"\x00" * 3, "fuzz.zip"))


def test_seed_reads_back_as_zipfile_does() -> None:
    """The fuzz seed itself is parsed and read exactly as zipfile reads it."""
    src = BytesSource(SEED)
    members = read_members(src)
    with zipfile.ZipFile(io.BytesIO(SEED)) as zf:
        assert _read_all(members, src) == [zf.read(info) for info in zf.infolist()]
