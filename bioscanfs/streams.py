"""Members of 32 MiB and more (the metadata CSV), served by ranges without decoding them whole.

Owns the in-order CRC check of a large member, deflate seek points and cursors, and the
decoding ahead of a sequential reader; ``reader.Reader`` decides which members come here.
"""
from __future__ import annotations

import bisect
import threading
from typing import List, NamedTuple, Optional

# zlib-ng inflates 1.7x and checksums 4x faster than zlib here, with zlib's API (copy() too).
from zlib_ng import zlib_ng as inflate_impl

from .errors import MemberError
from .zipdir import LocalHeader, Member, Source

#: Piece size when a whole member is checked.
CHECK_CHUNK = 4 << 20


class LargeMember:
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


class StoredStream(LargeMember):
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


class DeflateStream(LargeMember):
    """A large deflated member read through cursors and seek points.

    Seek points are decompressor snapshots taken every ``interval`` output bytes, kept
    for the member across opens, so a jump anywhere costs at most one interval of
    decoding. At most 256 points (interval grows with the member) and ``MAX_CURSORS``
    idle cursors are kept, so memory is bounded whatever the member's size. A read
    takes the idle cursor closest below its offset, waits for a busy one there, or
    starts one from the nearest seek point. Each cursor keeps the last ``BACKLOG``
    bytes it decoded: the kernel's readahead sends one reader's requests out of order
    on several threads, and a request that arrives just after the one beyond it is
    served from there instead of being decoded again from a seek point. Points made by a cursor that knew its CRC
    carry it, so cursors started from them follow the CRC too.
    """

    INPUT_CHUNK = 64 << 10
    OUTPUT_CAP = 1 << 20
    MAX_CURSORS = 4
    MAX_POINTS = 256
    BACKLOG = 2 << 20   #: several readahead windows (128 KiB each)

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
            self._trim(cursor, offset)
        start = offset - cursor.out_pos
        out = bytes(cursor.pending[start:start + (want_end - offset)])
        self._trim(cursor, offset + len(out))
        return out

    def _trim(self, cursor: _Cursor, position: int) -> None:
        """Drop what the cursor decoded more than BACKLOG before ``position``: memory
        stays bounded by the backlog and one output cap."""
        drop = min(len(cursor.pending), position - self.BACKLOG - cursor.out_pos)
        if drop > 0:
            del cursor.pending[:drop]
            cursor.out_pos += drop

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
        """At the declared size the stream must end (one more byte would be a bomb), and
        at the declared compressed size (input left over is not part of the member)."""
        inflater = cursor.inflater
        while not inflater.eof:
            if not inflater.unconsumed_tail and cursor.in_pos >= self.csize:
                raise MemberError(self.src.name, self.label, "deflate stream does not end at its declared size")
            if self._inflate_more(cursor, 1):
                raise MemberError(self.src.name, self.label, "deflate stream inflates past its declared size")
        if inflater.unused_data or cursor.in_pos < self.csize:
            raise MemberError(self.src.name, self.label, "deflate stream ends before its declared compressed size")

    def _maybe_add_point(self, out_pos: int, in_pos: int, inflater: object, crc: Optional[int]) -> None:
        with self._lock:
            last = self._points[-1].out_pos
            if out_pos >= last + self.interval:
                self._points.append(_Point(out_pos, in_pos, inflater.copy(), crc))  # type: ignore[attr-defined]
