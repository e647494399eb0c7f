"""A struct-level zip writer for hostile archives: every header field is the test's to set.

zipfile refuses to write most lies (a declared size that is not the data's, a local extra
field that differs from the central one, a member placed inside another), so hostile
cases are written here byte by byte from APPNOTE.TXT. Defaults make an honest archive:
an ``Entry`` with only a name and data is a stored member with true sizes and CRC.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Optional, Sequence, Tuple

from zlib_ng import zlib_ng

# APPNOTE 4.3.7 local file header, 4.3.12 central directory header, 4.3.16 end record,
# 4.3.14/4.3.15 ZIP64 end record and locator, 4.5.3 ZIP64 extra field.
LOCAL = struct.Struct("<4sHHHHHIIIHH")
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
EOCD = struct.Struct("<4sHHHHIIH")
EOCD64 = struct.Struct("<4sQHHIIQQQQ")
EOCD64_LOCATOR = struct.Struct("<4sIQI")
MADE_BY_UNIX = 3 << 8 | 30
DOS_TIME, DOS_DATE = 0, (2024 - 1980) << 9 | 1 << 5 | 1   # 2024-01-01 00:00:00
SYMLINK_ATTR = (0o120777 << 16)
FILE_ATTR = (0o100644 << 16)
DIR_ATTR = (0o040755 << 16) | 0x10   # Unix mode and the MS-DOS directory bit


@dataclass
class Entry:
    """One member. ``data`` is written as is (already compressed when ``method`` != 0);
    every ``None`` field is derived from it honestly."""

    name: bytes
    data: bytes = b""
    method: int = 0
    size: Optional[int] = None              #: declared uncompressed size (default: len(data))
    compressed_size: Optional[int] = None   #: declared (default: len(data) + gap)
    crc: Optional[int] = None               #: declared (default: CRC-32 of data, right when stored)
    flags: int = 0
    local_extra: bytes = b""
    central_extra: Optional[bytes] = None   #: default: the local extra field
    external_attr: int = FILE_ATTR
    header_offset: Optional[int] = None     #: declared offset (default: where it is written)
    gap: int = 0                            #: zero bytes written after data, as a hole (sparse)
    zip64: bool = False                     #: sizes and offset in a ZIP64 extra field
    local_sizes: Optional[Sequence[int]] = None   #: (crc, csize, size) in the local header
    dos_time: int = DOS_TIME                #: last-modified time and date (APPNOTE 4.4.6), both headers
    dos_date: int = DOS_DATE


def dos_stamp(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> Dict[str, int]:
    """``dos_time`` and ``dos_date`` fields of an Entry for a moment (seconds rounded down to even)."""
    return {"dos_time": hour << 11 | minute << 5 | second // 2,
            "dos_date": (year - 1980) << 9 | month << 5 | day}


def zip64_extra(size: int, compressed_size: int, offset: Optional[int] = None) -> bytes:
    """The ZIP64 extended information extra field (4.5.3)."""
    values = [size, compressed_size] + ([offset] if offset is not None else [])
    return struct.pack("<HH", 1, 8 * len(values)) + struct.pack(f"<{len(values)}Q", *values)


def raw_deflate(data: bytes, level: int = 6) -> bytes:
    """``data`` as a raw deflate stream (no zlib header), as zip members hold it."""
    deflater = zlib.compressobj(level, zlib.DEFLATED, -15)
    return deflater.compress(data) + deflater.flush()


def deflated(name: bytes, plain: bytes, **fields) -> Entry:
    """An honest deflated member of ``plain``."""
    fields.setdefault("size", len(plain))
    fields.setdefault("crc", zlib.crc32(plain))
    return Entry(name, raw_deflate(plain), method=8, **fields)


def symlink(name: bytes, target: bytes, **fields) -> Entry:
    """A stored Unix symlink member whose data is its target."""
    return Entry(name, target, external_attr=SYMLINK_ATTR, **fields)


def central_record(e: Entry, offset: int) -> bytes:
    """The central directory header of ``e`` written at ``offset`` (declared values as set)."""
    size = len(e.data) if e.size is None else e.size
    csize = len(e.data) + e.gap if e.compressed_size is None else e.compressed_size
    crc = zlib.crc32(e.data) if e.crc is None else e.crc
    offset = offset if e.header_offset is None else e.header_offset
    extra = e.local_extra if e.central_extra is None else e.central_extra
    if e.zip64:
        extra = zip64_extra(size, csize, offset) + extra
        size = csize = offset = 0xFFFFFFFF
    return CENTRAL.pack(b"PK\x01\x02", MADE_BY_UNIX, 45 if e.zip64 else 20, e.flags, e.method, e.dos_time, e.dos_date,
                        crc, csize, size, len(e.name), len(extra), 0, 0, 0, e.external_attr, offset) + e.name + extra


def local_record(e: Entry) -> bytes:
    """The local header, name, extra field and data of ``e`` (without its sparse gap)."""
    size = len(e.data) if e.size is None else e.size
    csize = len(e.data) + e.gap if e.compressed_size is None else e.compressed_size
    crc = zlib.crc32(e.data) if e.crc is None else e.crc
    extra = (zip64_extra(size, csize) if e.zip64 else b"") + e.local_extra
    sizes = (crc, 0xFFFFFFFF, 0xFFFFFFFF) if e.zip64 else (crc, csize, size)
    sizes = tuple(e.local_sizes) if e.local_sizes is not None else sizes
    return LOCAL.pack(b"PK\x03\x04", 45 if e.zip64 else 20, e.flags, e.method, e.dos_time, e.dos_date,
                      *sizes, len(e.name), len(extra)) + e.name + extra + e.data


def write_zip(path: Path, entries: Sequence[Entry], comment: bytes = b"", force_zip64: bool = False) -> Path:
    """Write ``entries`` as one archive (local headers, data, central directory, end
    records); ZIP64 end records when any count or offset needs them or ``force_zip64``."""
    with open(path, "wb") as out:
        placed = []
        for e in entries:
            placed.append((e, out.tell()))
            out.write(local_record(e))
            if e.gap:
                out.seek(e.gap, 1)
        write_directory(out, placed, comment, force_zip64)
    return path


def write_directory(out: BinaryIO, placed: Sequence[Tuple[Entry, int]], comment: bytes = b"",
                    force_zip64: bool = False) -> None:
    """The central directory of members already written at their offsets, and the end
    records, at the current position of ``out`` (for archives laid out by hand)."""
    cd_start = out.tell()
    directory = b"".join(central_record(e, offset) for e, offset in placed)
    out.write(directory)
    count, cd_size = len(placed), len(directory)
    if force_zip64 or count >= 0xFFFF or cd_start >= 0xFFFFFFFF:
        eocd64_at = out.tell()
        out.write(EOCD64.pack(b"PK\x06\x06", EOCD64.size - 12, 45, 45, 0, 0, count, count, cd_size, cd_start))
        out.write(EOCD64_LOCATOR.pack(b"PK\x06\x07", 0, eocd64_at, 1))
        count, cd_start = min(count, 0xFFFF), min(cd_start, 0xFFFFFFFF)
    out.write(EOCD.pack(b"PK\x05\x06", 0, 0, count, count, min(cd_size, 0xFFFFFFFF), cd_start, len(comment)) + comment)


def deflate_zeros(count: int) -> bytes:
    """A raw deflate stream of ``count`` zero bytes, compressed piece by piece (a bomb's
    payload without holding it: 1 GiB becomes ~1 MB, in a tenth of a second with zlib-ng)."""
    deflater = zlib_ng.compressobj(6, zlib.DEFLATED, -15)
    block, out = bytes(16 << 20), []
    while count > 0:
        out.append(deflater.compress(block[:min(count, len(block))]))
        count -= len(block)
    out.append(deflater.flush())
    return b"".join(out)


class _Bits:
    """Deflate's bit order (RFC 1951 3.1.1): values LSB first, Huffman codes MSB first."""

    def __init__(self) -> None:
        self.out, self._acc, self._n = bytearray(), 0, 0

    def put(self, value: int, width: int) -> None:
        self._acc |= value << self._n
        self._n += width
        while self._n >= 8:
            self.out.append(self._acc & 0xFF)
            self._acc >>= 8
            self._n -= 8

    def code(self, code: int, width: int) -> None:
        self.put(int(format(code, f"0{width}b")[::-1], 2), width)

    def flush(self) -> bytes:
        return bytes(self.out) + (bytes([self._acc]) if self._n else b"")


def deflate64_zeros(count: int) -> bytes:
    """A raw Deflate64 stream of ``count`` (>= 1) zero bytes, written as a bomb is: one
    literal, then copies of up to 65,538 bytes at distance 1 (Deflate64's length symbol
    285 has 16 extra bits), in one block of fixed Huffman codes: 29 bits per copy, so
    about 18,000 bytes out per byte in. No library writes Deflate64 (7-Zip does, slowly)."""
    bits = _Bits()
    bits.put(1, 1)         # BFINAL: the last block
    bits.put(1, 2)         # BTYPE 01: fixed Huffman codes (RFC 1951 3.2.6)
    bits.code(0x30, 8)     # literal 0
    left = count - 1
    while left >= 3:
        length = min(left, 65538)
        bits.code(0xC5, 8)        # length symbol 285
        bits.put(length - 3, 16)  # its extra bits in Deflate64
        bits.code(0, 5)           # distance symbol 0: distance 1
        left -= length
    for _ in range(left):
        bits.code(0x30, 8)
    bits.code(0, 7)        # end of block (symbol 256)
    return bits.flush()


def crc32_of_zeros(count: int) -> int:
    """CRC-32 of ``count`` zero bytes, without holding them."""
    block, crc = bytes(64 << 20), 0
    while count > 0:
        crc = zlib_ng.crc32(block[:min(count, len(block))], crc)
        count -= len(block)
    return crc


class Unseekable(io.RawIOBase):
    """A write-only stream without tell/seek: zipfile then writes data descriptors (flag bit 3)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, chunk) -> int:  # type: ignore[override]
        self.data += chunk
        return len(chunk)
