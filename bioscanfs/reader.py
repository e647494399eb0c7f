"""Bytes of one member: one factory decides how each member is read, CRCs are checked.

Owns decoding and the caches of decoded bytes; knows nothing of paths beyond the label
it puts in error messages, and nothing of FUSE.

Contract of ``Reader.read(member, label, size, offset)``: returns exactly
``min(size, member size - offset)`` bytes (empty at or past the end), or raises
MemberError. It never returns a byte past the declared size, and never a byte of a
member whose CRC-32 was found wrong: every member decoded whole is checked before any
of it is returned. Members over 32 MiB (the metadata CSV) are streamed: their CRC is
checked when a reader reaches the end in order (that last read fails), and a corrupt
deflate stream fails as soon as zlib sees it.

How a member is read (``Reader.read``):

- stored: a whole member up to 1 MiB read in one ``os.pread`` with its header; any part of
  a stored member under 32 MiB comes from the member read whole once (CRC checked) into the
  LRU; larger stored members are served by ranges, CRC checked when read in order to the end;
- deflate, Deflate64, bzip2, and through libarchive lzma, xz, zstd, PPMd and encrypted
  members (ZipCrypto, WinZip AES): decoded whole, once, into a byte-bounded LRU;
- deflate over 32 MiB: streamed (``DeflateStream``). Other methods over 32 MiB are not
  supported (ENOTSUP).
"""
from __future__ import annotations

import bisect
import bz2
import struct
import threading
from typing import List, NamedTuple, Optional, Sequence, Tuple

import cachetools
import inflate64

# zlib-ng inflates 1.7x and checksums 4x faster than zlib here, with zlib's API (copy() too).
from zlib_ng import zlib_ng as inflate_impl

from .errors import EncryptedError, MemberError, UnsupportedError
from .zipdir import (FLAG_DATA_DESCRIPTOR, FLAG_ENCRYPTED, LOCAL, LocalHeader, Member, Source, parse_local_header,
                     read_local_header)

STORED, DEFLATED, DEFLATE64, BZIP2, AES_METHOD = 0, 8, 9, 12, 99
METHOD_NAMES = {0: "stored", 8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma",
                93: "zstd", 95: "xz", 98: "ppmd", 99: "aes"}
# 4.3.9 Data descriptor, with its optional signature
DATA_DESCRIPTOR = struct.Struct("<4sIII")
DATA_DESCRIPTOR_SIG = b"PK\x07\x08"
#: Stored members up to this size are read whole, header included, in one pread and CRC-checked.
WHOLE_READ_MAX = 1 << 20
#: Compressed members up to this size are decoded whole into the LRU; larger deflate streams.
STREAM_MIN = 32 << 20
#: Piece size when a whole member is checked.
CHECK_CHUNK = 4 << 20
#: Slack read past a local header's name for its extra field, to save a second pread.
EXTRA_SLACK = 128


class Reader:
    """Decodes members of a fixed list of sources; safe to call from many threads."""

    def __init__(self, sources: Sequence[Source], cache_bytes: int = 256 << 20,
                 password: Optional[bytes] = None) -> None:
        self._sources = list(sources)
        self.password = password  #: for encrypted members; may be set later (a prompt)
        self._lock = threading.Lock()
        self._decoded: cachetools.LRUCache = cachetools.LRUCache(maxsize=max(cache_bytes, 1), getsizeof=len)
        self._headers: cachetools.LRUCache = cachetools.LRUCache(maxsize=1 << 16)
        self._streams: cachetools.LRUCache = cachetools.LRUCache(maxsize=8)

    def read(self, member: Member, label: str, size: int, offset: int) -> bytes:
        total = member.size
        size = min(size, total - offset)
        if size <= 0:
            return b""
        src = self._sources[member.archive]
        method = member.method
        plain = not member.flags & FLAG_ENCRYPTED
        if method == STORED and plain:
            if offset == 0 and size == total and total <= WHOLE_READ_MAX:
                return self._read_whole_stored(src, member, label)
            if total >= STREAM_MIN:
                return self._stream(src, member, label).read(size, offset)
        if total < STREAM_MIN:
            return self._decoded_whole(src, member, label)[offset:offset + size]
        if method == DEFLATED and plain:
            return self._stream(src, member, label).read(size, offset)
        raise UnsupportedError(src.name, label, f"{method_name(method)} members over {STREAM_MIN >> 20} MiB "
                                                "are not supported (only deflate streams)")

    def check(self, member: Member, label: str) -> None:
        """Decode a whole member and check its CRC-32, whatever its method and size."""
        size, crc = member.size, 0
        for offset in range(0, size, CHECK_CHUNK):
            crc = inflate_impl.crc32(self.read(member, label, CHECK_CHUNK, offset), crc)
        if crc != member.crc32 and not _unchecked_aes(member):
            src = self._sources[member.archive]
            raise MemberError(src.name, label, "CRC-32 mismatch: the archive is corrupt")

    def _key(self, member: Member) -> tuple:
        return member.archive, member.header_offset

    def _header(self, src: Source, member: Member, label: str) -> LocalHeader:
        key = self._key(member)
        with self._lock:
            header = self._headers.get(key)
        if header is None:
            header = read_local_header(src, member, label)
            with self._lock:
                self._headers[key] = header
        return header

    def _read_with_header(self, src: Source, member: Member, label: str) -> Tuple[bytes, bytes]:
        """(local header with name and extra field, raw data) of a member, in one pread."""
        at = member.header_offset
        csize = member.compressed_size
        raw = src.pread(LOCAL.size + member.name_length + EXTRA_SLACK + csize, at)
        header = parse_local_header(src, member, label, raw)
        start = header.data_offset - at
        data = raw[start:start + csize]
        if len(data) < csize:
            data += src.pread(csize - len(data), header.data_offset + len(data))
        if len(data) != csize:
            raise MemberError(src.name, label, "member data is cut short (archive truncated?)")
        return raw[:start], data

    def _read_whole_stored(self, src: Source, member: Member, label: str) -> bytes:
        data = self._read_with_header(src, member, label)[1]
        check_crc(src, member, label, data)
        return data

    def _decoded_whole(self, src: Source, member: Member, label: str) -> bytes:
        key = self._key(member)
        with self._lock:
            data = self._decoded.get(key)
        if data is not None:
            return data
        data = decode_whole(src, member, label, *self._read_with_header(src, member, label), self.password)
        if len(data) <= self._decoded.maxsize:
            with self._lock:
                self._decoded[key] = data
        return data

    def _stream(self, src: Source, member: Member, label: str) -> "_LargeMember":
        key = self._key(member)
        with self._lock:
            stream = self._streams.get(key)
        if stream is None:
            kind = StoredStream if member.method == STORED else DeflateStream
            fresh = kind(src, member, label, self._header(src, member, label))
            with self._lock:
                stream = self._streams.setdefault(key, fresh)
        return stream


def method_name(method: int) -> str:
    return METHOD_NAMES.get(method, f"compression method {method}")


def _unchecked_aes(member: Member) -> bool:
    """WinZip AE-2 stores no CRC (0); libarchive checks its authentication code instead."""
    return member.method == AES_METHOD and member.crc32 == 0


def check_crc(src: Source, member: Member, label: str, data: bytes, crc: int = 0) -> None:
    """Raise unless the CRC of ``data`` (continuing from ``crc``) is the member's."""
    if inflate_impl.crc32(data, crc) != member.crc32 and not _unchecked_aes(member):
        raise MemberError(src.name, label, "CRC-32 mismatch: the archive is corrupt")


def decode_whole(src: Source, member: Member, label: str, header: bytes, data: bytes,
                 password: Optional[bytes]) -> bytes:
    """Decode a whole member by its method: exactly the declared size, CRC checked.

    Deflate uses zlib-ng, Deflate64 inflate64, bzip2 the standard library (faster than
    libarchive, see scripts/bench_methods.py); every other method, and every encrypted
    member, goes through libarchive, fed the member's own local header and data.
    """
    method = member.method
    if member.flags & FLAG_ENCRYPTED or method not in (STORED, DEFLATED, DEFLATE64, BZIP2):
        out = _libarchive_decode(src, member, label, header, data, password)
    elif method == STORED:
        out = data
    elif method == DEFLATED:
        out = _inflate(src, member, label, data)
    else:
        out = _one_shot(src, member, label, data)
    if len(out) != member.size:
        raise MemberError(src.name, label, f"decodes to {len(out)} bytes, not the declared {member.size}")
    check_crc(src, member, label, out)
    return out


def _inflate(src: Source, member: Member, label: str, compressed: bytes) -> bytes:
    """Inflate to exactly the declared size: never more (zip bombs), never less."""
    size = member.size
    inflater = inflate_impl.decompressobj(-15)
    try:
        data = inflater.decompress(compressed, size + 1)
    except inflate_impl.error as err:
        raise MemberError(src.name, label, f"deflate stream is corrupt ({err})") from None
    if len(data) > size or (inflater.unconsumed_tail and not inflater.eof):
        raise MemberError(src.name, label, "deflate stream inflates past its declared size")
    if len(data) < size or not inflater.eof:
        raise MemberError(src.name, label, "deflate stream ends early")
    return data


def _one_shot(src: Source, member: Member, label: str, compressed: bytes) -> bytes:
    """Deflate64 and bzip2 (bzip2 bounded by the declared size plus one byte)."""
    method = member.method
    size = member.size
    try:
        if method != DEFLATE64:
            return bz2.BZ2Decompressor().decompress(compressed, size + 1)
        inflater, out = inflate64.Inflater(), []
        for at in range(0, len(compressed), 1 << 16):  # bounded steps: a bomb stops early
            out.append(inflater.inflate(compressed[at:at + (1 << 16)]))
            size -= len(out[-1])
            if size < 0:
                break
        return b"".join(out)
    except (OSError, ValueError, EOFError) as err:
        raise MemberError(src.name, label, f"{method_name(method)} stream is corrupt ({err})") from None


def _libarchive_decode(src: Source, member: Member, label: str, header: bytes, data: bytes,
                       password: Optional[bytes]) -> bytes:
    """Decode one member with libarchive from a one-member archive: the member's own local
    header (name, extra field such as the AES one) with the central CRC and sizes, its
    data, and a data descriptor when its flags announce one."""
    import libarchive  # only members with rare methods or encryption pay for the import

    encrypted = bool(member.flags & FLAG_ENCRYPTED)
    if encrypted and password is None:
        raise EncryptedError(src.name, label, "member is encrypted; mount with --password-file (or -f for a prompt)")
    fields = list(LOCAL.unpack_from(header))
    fields[6:9] = [member.crc32, len(data), member.size]
    blob = LOCAL.pack(*fields) + header[LOCAL.size:] + data
    if fields[2] & FLAG_DATA_DESCRIPTOR:
        blob += DATA_DESCRIPTOR.pack(DATA_DESCRIPTOR_SIG, *fields[6:9])
    budget = member.size + 1
    chunks: List[bytes] = []
    try:
        with libarchive.memory_reader(blob, format_name="zip", passphrase=password) as archive:
            for entry in archive:
                for block in entry.get_blocks():
                    chunks.append(block)
                    budget -= len(block)
                    if budget <= 0:
                        raise MemberError(src.name, label, "stream decodes past its declared size")
                break
    except libarchive.ArchiveError as err:
        message = str(err).split(" (errno=")[0]
        if encrypted and any(word in message.lower() for word in ("passphrase", "password", "decrypt")):
            raise EncryptedError(src.name, label, f"cannot decrypt: {message}") from None
        if "Unsupported" in message:
            raise UnsupportedError(src.name, label, message) from None
        raise MemberError(src.name, label, f"{method_name(member.method)} stream is corrupt ({message})") from None
    return b"".join(chunks)


class _LargeMember:
    """What large members (32 MiB and more) share: served by ranges, checked at the end.

    The CRC is followed while the member is read in order. When the read that reaches the
    end was not preceded by an in-order pass (the kernel's readahead and retries arrive out
    of order), the whole member is decoded once more just to check it. The verdict is kept:
    once a member is known to be corrupt, every read of it fails.
    """

    def __init__(self, src: Source, member: Member, label: str, header: LocalHeader) -> None:
        self.src, self.label = src, label
        self.size, self.csize, self.crc = member.size, member.compressed_size, member.crc32
        self.data_offset = header.data_offset
        self._verdict: Optional[bool] = None
        self._verdict_lock = threading.Lock()

    def read(self, size: int, offset: int) -> bytes:
        if self._verdict is False:
            raise self._corrupt()
        return self._read(size, offset)

    def _read(self, size: int, offset: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def _whole_crc(self) -> int:  # pragma: no cover - interface
        """The CRC-32 of the whole member, decoded again from the start."""
        raise NotImplementedError

    def _corrupt(self) -> MemberError:
        return MemberError(self.src.name, self.label, "CRC-32 mismatch: the archive is corrupt")

    def _at_end(self, followed_crc: Optional[int]) -> None:
        """Called by the read that reaches the end; raises if the member is corrupt."""
        with self._verdict_lock:
            if self._verdict is None:
                try:
                    crc = followed_crc if followed_crc is not None else self._whole_crc()
                except MemberError:
                    self._verdict = False
                    raise
                self._verdict = crc == self.crc
        if not self._verdict:
            raise self._corrupt()


class StoredStream(_LargeMember):
    """A large stored member: ``os.pread`` of each range, the CRC followed in order."""

    def __init__(self, src: Source, member: Member, label: str, header: LocalHeader) -> None:
        super().__init__(src, member, label, header)
        self._next, self._crc = 0, 0   #: in-order progress: next offset, CRC so far
        self._lock = threading.Lock()

    def _pread(self, size: int, offset: int) -> bytes:
        data = self.src.pread(size, self.data_offset + offset)
        if len(data) != size:
            raise MemberError(self.src.name, self.label, "member data is cut short (archive truncated?)")
        return data

    def _read(self, size: int, offset: int) -> bytes:
        data = self._pread(size, offset)
        with self._lock:
            if offset == 0:
                self._next, self._crc = 0, 0
            followed = offset == self._next
            if followed:
                self._next, self._crc = offset + size, inflate_impl.crc32(data, self._crc)
            crc = self._crc
        if offset + size == self.size:
            self._at_end(crc if followed else None)
        return data

    def _whole_crc(self) -> int:
        crc = 0
        for offset in range(0, self.size, CHECK_CHUNK):
            crc = inflate_impl.crc32(self._pread(min(CHECK_CHUNK, self.size - offset), offset), crc)
        return crc


class _Point(NamedTuple):
    out_pos: int          #: uncompressed offset
    in_pos: int           #: compressed offset, relative to the member's data
    state: object         #: a decompressor positioned there (only ever copied)
    crc: Optional[int]    #: CRC-32 of everything before out_pos, when known


class _Cursor:
    """One sequential decoder; used by one thread at a time."""

    def __init__(self, point: _Point) -> None:
        self.inflater = point.state.copy()  # type: ignore[attr-defined]
        self.out_pos = point.out_pos
        self.in_pos = point.in_pos
        self.pending = bytearray()  #: decoded bytes starting at out_pos (appends stay linear)
        self.crc = point.crc     #: running CRC of everything decoded, when known


class DeflateStream(_LargeMember):
    """A large deflated member read through cursors and seek points.

    Seek points are decompressor snapshots taken every ``interval`` output bytes, kept
    for the member across opens, so a jump anywhere costs at most one interval of
    decoding. At most 256 points (interval grows with the member) and ``MAX_CURSORS``
    idle cursors are kept, so memory is bounded whatever the member's size. A read
    takes the idle cursor closest below its offset, waits for a busy one there, or
    starts one from the nearest seek point. Points made by a cursor that knew its CRC
    carry it, so cursors started from them follow the CRC too.
    """

    INPUT_CHUNK = 64 << 10
    OUTPUT_CAP = 1 << 20
    MAX_CURSORS = 4
    MAX_POINTS = 256

    def __init__(self, src: Source, member: Member, label: str, header: LocalHeader) -> None:
        super().__init__(src, member, label, header)
        self.interval = max(4 << 20, -(-self.size // self.MAX_POINTS))
        self._points: List[_Point] = [_Point(0, 0, inflate_impl.decompressobj(-15), 0)]
        self._idle: List[_Cursor] = []
        self._busy: List[_Cursor] = []
        self._lock = threading.Lock()  #: guards the seek points
        self._changed = threading.Condition()  #: guards the cursor lists

    def _read(self, size: int, offset: int) -> bytes:
        cursor = self._take(offset)
        try:
            out = self._advance(cursor, offset, size)
        except BaseException:
            self._give(cursor, keep=False)  # its state is unknown now
            raise
        crc = cursor.crc
        self._give(cursor, keep=True)
        if offset + len(out) == self.size:
            self._at_end(crc)
        return out

    def _whole_crc(self) -> int:
        cursor = _Cursor(self._points[0])
        while cursor.out_pos < self.size:
            self._decode_some(cursor)
            cursor.out_pos += len(cursor.pending)
            cursor.pending.clear()
        return cursor.crc  # type: ignore[return-value]  # started at 0, so known

    def _nearest(self, cursors: List[_Cursor], offset: int) -> Optional[_Cursor]:
        """The cursor closest below ``offset`` and less than one interval before it."""
        best = None
        for cursor in cursors:
            if cursor.out_pos <= offset < cursor.out_pos + len(cursor.pending) + self.interval:
                if best is None or cursor.out_pos > best.out_pos:
                    best = cursor
        return best

    def _take(self, offset: int) -> _Cursor:
        with self._changed:
            while True:
                cursor = self._nearest(self._idle, offset)
                if cursor is not None:
                    self._idle.remove(cursor)
                    break
                # The kernel's readahead sends one reader's requests out of order on
                # several threads: wait for the busy cursor just below rather than
                # decoding the same stretch again from a seek point.
                if self._nearest(self._busy, offset) is None or not self._changed.wait(timeout=1.0):
                    keys = [p.out_pos for p in self._points]
                    point = self._points[bisect.bisect_right(keys, offset) - 1]
                    cursor = _Cursor(point)
                    break
            self._busy.append(cursor)
            return cursor

    def _give(self, cursor: _Cursor, keep: bool) -> None:
        with self._changed:
            self._busy.remove(cursor)
            if keep:
                self._idle.append(cursor)
                if len(self._idle) > self.MAX_CURSORS:
                    self._idle.pop(0)
            self._changed.notify_all()

    def _advance(self, cursor: _Cursor, offset: int, size: int) -> bytes:
        """Decode until [offset, offset+size) is in cursor.pending, then slice it."""
        want_end = min(offset + size, self.size)
        while cursor.out_pos + len(cursor.pending) < want_end:
            self._decode_some(cursor)
            # Drop what lies before the offset, keeping memory bounded by one output cap.
            drop = min(len(cursor.pending), offset - cursor.out_pos)
            if drop > 0:
                del cursor.pending[:drop]
                cursor.out_pos += drop
        start = offset - cursor.out_pos
        out = bytes(cursor.pending[start:start + (want_end - offset)])
        # Keep only what follows this read: the next sequential read starts there.
        del cursor.pending[:start + len(out)]
        cursor.out_pos = offset + len(out)
        return out

    def _decode_some(self, cursor: _Cursor) -> None:
        inflater = cursor.inflater
        produced_at = cursor.out_pos + len(cursor.pending)
        if not inflater.unconsumed_tail and (inflater.eof or cursor.in_pos >= self.csize):
            raise MemberError(self.src.name, self.label, "deflate stream ends early")
        data = self._inflate_more(cursor, self.OUTPUT_CAP)
        end = produced_at + len(data)
        if end > self.size:
            raise MemberError(self.src.name, self.label, "deflate stream inflates past its declared size")
        cursor.pending += data
        if cursor.crc is not None:
            cursor.crc = inflate_impl.crc32(data, cursor.crc)
        if end == self.size:
            self._expect_end(cursor)
        if not inflater.unconsumed_tail:
            self._maybe_add_point(end, cursor.in_pos, inflater, cursor.crc)

    def _inflate_more(self, cursor: _Cursor, limit: int) -> bytes:
        """Up to ``limit`` more bytes from the cursor's inflater, reading input as needed."""
        inflater = cursor.inflater
        try:
            if inflater.unconsumed_tail:
                return inflater.decompress(inflater.unconsumed_tail, limit)
            chunk = self.src.pread(min(self.INPUT_CHUNK, self.csize - cursor.in_pos), self.data_offset + cursor.in_pos)
            if not chunk:
                raise MemberError(self.src.name, self.label, "member data is cut short (archive truncated?)")
            cursor.in_pos += len(chunk)
            return inflater.decompress(chunk, limit)
        except inflate_impl.error as err:
            raise MemberError(self.src.name, self.label, f"deflate stream is corrupt ({err})") from None

    def _expect_end(self, cursor: _Cursor) -> None:
        """At the declared size the stream must end: one more byte would be a bomb."""
        inflater = cursor.inflater
        while not inflater.eof:
            if not inflater.unconsumed_tail and cursor.in_pos >= self.csize:
                raise MemberError(self.src.name, self.label, "deflate stream does not end at its declared size")
            if self._inflate_more(cursor, 1):
                raise MemberError(self.src.name, self.label, "deflate stream inflates past its declared size")

    def _maybe_add_point(self, out_pos: int, in_pos: int, inflater: object, crc: Optional[int]) -> None:
        with self._lock:
            last = self._points[-1].out_pos
            if out_pos >= last + self.interval:
                self._points.append(_Point(out_pos, in_pos, inflater.copy(), crc))  # type: ignore[attr-defined]
