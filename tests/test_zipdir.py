"""zipdir.read_members against zipfile on unusual but valid archives, and on broken ones."""
from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List

import numpy as np
import pytest
from conftest import Member, replace_name_bytes
from craft import Unseekable

from bioscanfs import ArchiveError, Collection
from bioscanfs.sources import FileSource
from bioscanfs.zipdir import Members, read_members

GENERATED = "BIOSCAN_5M_cropped_256_train.zip"
#: Members whose bytes are compared through Collection.read (all of them in small archives).
BYTES_SAMPLE = 500
# APPNOTE 4.3.12 central directory header and 4.3.16 end of central directory record.
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<4sHHHHIIH")


def parse(path: Path) -> Members:
    src = FileSource([str(path)])
    try:
        return read_members(src)
    finally:
        src.close()


def member_names(members: Members) -> List[bytes]:
    ends = members.name_ends.tolist()
    blob = members.names.tobytes()
    return [blob[a:b] for a, b in zip([0] + ends[:-1], ends)]


def assert_matches_zipfile(path: Path) -> None:
    """Every central-directory field bioscanfs keeps equals zipfile's, and bytes read back equal."""
    members = parse(path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert member_names(members) == [info.filename.rstrip("/").encode() for info in infos]
        assert members.is_dir.tolist() == [info.is_dir() for info in infos]
        assert members.warnings == []
        table = members.table
        assert table["size"].tolist() == [i.file_size for i in infos]
        assert table["compressed_size"].tolist() == [i.compress_size for i in infos]
        assert table["crc32"].tolist() == [i.CRC for i in infos]
        assert table["header_offset"].tolist() == [i.header_offset for i in infos]
        assert table["method"].tolist() == [i.compress_type for i in infos]
        assert table["flags"].tolist() == [i.flag_bits for i in infos]
        assert table["mtime"].tolist() == [Member(path, i).mtime for i in infos]
        files = [i for i in infos if not i.is_dir()]
        if len(files) > BYTES_SAMPLE:
            picks = np.random.default_rng(0).choice(len(files), BYTES_SAMPLE, replace=False)
            files = [files[k] for k in sorted(picks.tolist())]
        with Collection(str(path), index_dir=None) as collection:
            for info in files:
                assert collection.read(info.filename) == zf.read(info), info.filename


# -- valid archives ---------------------------------------------------------------------------


def _generated(tmp_path: Path, fake_set: Path, bench: ModuleType) -> Path:
    """A generated package zip as is (mixed methods, ZIP64 extras in some local headers)."""
    return Path(shutil.copy(fake_set / GENERATED, tmp_path / "generated.zip"))


def _prepended(tmp_path: Path, fake_set: Path, bench: ModuleType) -> Path:
    """A self-extractor stub before the zip: every recorded offset is off by its length."""
    path = tmp_path / "sfx.zip"
    path.write_bytes(b"#!/bin/sh\nexec unzip \"$0\"\n" + bytes(range(256)) * 40 + (fake_set / GENERATED).read_bytes())
    return path


def _data_descriptors(tmp_path: Path, fake_set: Path, bench: ModuleType) -> Path:
    """zipfile writing to a non-seekable stream: sizes and CRC follow the data (flag bit 3)."""
    stream = Unseekable()
    with zipfile.ZipFile(fake_set / GENERATED) as src, zipfile.ZipFile(stream, "w") as out:
        for info in src.infolist():
            out.writestr(info, src.read(info), compress_type=info.compress_type)
    path = tmp_path / "descriptors.zip"
    path.write_bytes(bytes(stream.data))
    with zipfile.ZipFile(path) as zf:
        assert all(info.flag_bits & 0x08 for info in zf.infolist())
    return path


def _utf8_names(tmp_path: Path, fake_set: Path, bench: ModuleType) -> Path:
    path = tmp_path / "utf8.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i, name in enumerate(["日本/昆虫.jpg", "ü/ß/é.jpg", "ascii/plain.jpg", "emoji/🦋.jpg"]):
            zf.writestr(name, f"payload {i}\n" * (i + 1), compress_type=zipfile.ZIP_DEFLATED if i % 2 else 0)
    return path


def _cp437_names(tmp_path: Path, fake_set: Path, bench: ModuleType) -> Path:
    """Names in CP437 without the UTF-8 flag (patched in: zipfile would write UTF-8)."""
    path = tmp_path / "cp437.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dir/cafX.jpg", b"one\n")
        zf.writestr("dir/naXve.jpg", b"two\n")
    replace_name_bytes(path, b"cafX", b"caf\x82")   # CP437 0x82 = e acute
    replace_name_bytes(path, b"naXve", b"na\x8bve")  # CP437 0x8B = i diaeresis
    return path


def _false_signature(tmp_path: Path, fake_set: Path, bench: ModuleType) -> Path:
    """A name holding the central-header signature: the bulk scan sees a false record start."""
    path = tmp_path / "false-signature.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i, name in enumerate(["a.jpg", "bPK\x01\x02tricky.jpg", "c.jpg", "PK\x01\x02", "d/e.jpg"]):
            zf.writestr(name, f"payload {i}\n")
    with zipfile.ZipFile(path) as zf:
        directory = path.read_bytes()[zf.start_dir:]
    assert directory.count(b"PK\x01\x02") > 5, "the names must add false signatures to the directory"
    return path


def _zip64_central(tmp_path: Path, fake_set: Path, bench: ModuleType) -> Path:
    """Every central entry with sizes and offset saturated and held in a ZIP64 extra field
    (4.5.3), after an unrelated extra block; the central directory is rewritten from
    zipfile's view of a generated zip, the local records are kept as they are."""
    source = fake_set / GENERATED
    data = source.read_bytes()
    records = []
    with zipfile.ZipFile(source) as zf:
        infos, cd_start = zf.infolist(), zf.start_dir
    for info in infos:
        name = info.filename.encode()
        year, month, day, hour, minute, second = info.date_time
        extra = struct.pack("<HH4s", 0xCAFE, 4, b"test") + struct.pack(
            "<HHQQQ", 0x0001, 24, info.file_size, info.compress_size, info.header_offset)
        records.append(_CENTRAL.pack(
            b"PK\x01\x02", (3 << 8) | 45, 45, info.flag_bits, info.compress_type,
            (hour << 11) | (minute << 5) | (second // 2), ((year - 1980) << 9) | (month << 5) | day,
            info.CRC, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra), 0, 0, info.internal_attr,
            info.external_attr, 0xFFFFFFFF) + name + extra)
    directory = b"".join(records)
    end = _EOCD.pack(b"PK\x05\x06", 0, 0, len(infos), len(infos), len(directory), cd_start, 0)
    path = tmp_path / "zip64-central.zip"
    path.write_bytes(data[:cd_start] + directory + end)
    return path


def _zip64_many(tmp_path: Path, fake_set: Path, bench: ModuleType) -> Path:
    """70,000 stored members: the entry count only fits the ZIP64 end record (4.3.14)."""
    path = tmp_path / "many.zip"
    names = [f"d{i % 97}/m{i}.bin".encode() for i in range(70_000)]
    bench.write_stored_zip(path, names, [b"%d\n" % i for i in range(70_000)], 0x4A00, 0x58AE)
    assert b"PK\x06\x06" in path.read_bytes()[-200:]
    return path


VALID: Dict[str, Callable[[Path, Path, ModuleType], Path]] = {
    "generated": _generated,
    "prepended-stub": _prepended,
    "data-descriptors": _data_descriptors,
    "utf8-names": _utf8_names,
    "cp437-names": _cp437_names,
    "false-central-signature": _false_signature,
    "zip64-central-extras": _zip64_central,
    "zip64-end-record-70k-members": _zip64_many,
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_read_members_matches_zipfile(kind: str, tmp_path: Path, fake_set: Path, bench_scale: ModuleType) -> None:
    """Names, sizes, CRCs, offsets, methods, flags, times and bytes as zipfile reads them."""
    assert_matches_zipfile(VALID[kind](tmp_path, fake_set, bench_scale))


# -- broken archives ------------------------------------------------------------------------
def _end_record_at(data: bytes) -> int:
    at = len(data) - _EOCD.size
    assert data[at:at + 4] == b"PK\x05\x06", "the generated zip must end with a comment-less end record"
    return at


def _patch_end_record(data: bytes, **fields: int) -> bytes:
    """The same archive with some end-record fields (4.3.16) set to other values."""
    at = _end_record_at(data)
    names = ["signature", "disk", "cd_disk", "disk_entries", "entries", "cd_size", "cd_offset", "comment_length"]
    values = dict(zip(names, _EOCD.unpack_from(data, at)))
    values.update(fields)
    return data[:at] + _EOCD.pack(*(values[n] for n in names))


def _entries(data: bytes) -> int:
    return _EOCD.unpack_from(data, _end_record_at(data))[4]


BROKEN: Dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda data: b"",
    "not-a-zip": lambda data: b"\xff\xd8\xff\xe0 a JPEG, not a zip " * 200,
    "truncated-no-end-record": lambda data: data[:len(data) * 3 // 5],
    "end-record-points-outside": lambda data: _patch_end_record(data, cd_offset=len(data) + 1000),
    "directory-size-past-end": lambda data: _patch_end_record(data, cd_size=len(data) * 2),
    "count-mismatch": lambda data: _patch_end_record(data, entries=_entries(data) + 1,
                                                     disk_entries=_entries(data) + 1),
    "no-members-in-a-2-byte-directory": lambda data: _patch_end_record(
        data, entries=0, disk_entries=0, cd_size=2, cd_offset=_end_record_at(data) - 2),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_archive_raises_archive_error_naming_it(kind: str, tmp_path: Path, fake_set: Path) -> None:
    """ArchiveError (never another exception), and the message names the archive."""
    path = tmp_path / f"{kind}.zip"
    path.write_bytes(BROKEN[kind]((fake_set / GENERATED).read_bytes()))
    with pytest.raises(ArchiveError) as err:
        parse(path)
    assert str(path) in str(err.value)
