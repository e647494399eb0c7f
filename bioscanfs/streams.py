"""Members of 32 MiB and more (the metadata CSV), served by ranges without decoding them whole.

Owns the in-order CRC check of a large member, deflate seek points and cursors, and the
decoding ahead of a sequential reader; ``reader.Reader`` decides which members come here.
"""
from __future__ import annotations

import bisect
import threading
from typing import List, NamedTuple, Optional, Tuple

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
        self.served: Optional[int] = None  #: where the last read it answered ended
        self.run = 0  #: bytes answered in order up to ``served``


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
    served from there instead of being decoded again from a seek point. Points made
    by a cursor that knew its CRC carry it, so cursors started from them follow the CRC
    too. A cursor that has answered ``AHEAD_AFTER`` bytes in order (a sequential reader;
    the kernel's readahead for one random read stays below it) is handed to an
    ``_Ahead``, which decodes ahead of that reader on a thread of its own.
    """

    INPUT_CHUNK = 64 << 10
    OUTPUT_CAP = 1 << 20
    MAX_CURSORS = 4
    MAX_POINTS = 256
    BACKLOG = 2 << 20   #: several readahead windows (128 KiB each)
    AHEAD_AFTER = 1 << 20  #: a reader is sequential once it has read this much in order

    def __init__(self, src: Source, member: Member, label: str, header: LocalHeader) -> None:
        super().__init__(src, member, label, header)
        self.interval = max(4 << 20, -(-self.size // self.MAX_POINTS))
        self._points: List[_Point] = [_Point(0, 0, inflate_impl.decompressobj(-15), 0)]
        self._idle: List[_Cursor] = []
        self._busy: List[_Cursor] = []
        self._lock = threading.Lock()  #: guards the seek points
        self._changed = threading.Condition()  #: guards the cursor lists and ``_ahead``
        self._ahead: Optional[_Ahead] = None

    def _read(self, size: int, offset: int) -> bytes:
        while True:
            ahead = self._ahead
            got = ahead.read(offset, size) if ahead is not None else None
            if got is not None:
                out, crc = got
                break
            cursor = self._take(offset)
            if cursor is None:  # a decoder ahead took over this stretch meanwhile
                continue
            out, crc = self._read_with(cursor, offset, size)
            break
        if offset + len(out) == self.size:
            self._at_end(crc)
        return out

    def _read_with(self, cursor: _Cursor, offset: int, size: int) -> Tuple[bytes, Optional[int]]:
        sequential = cursor.served == offset
        try:
            out = self._advance(cursor, offset, size)
        except BaseException:
            self._give(cursor, keep=False)  # its state is unknown now
            raise
        cursor.served = offset + len(out)
        cursor.run = cursor.run + len(out) if sequential else len(out)
        crc = cursor.crc
        if not (cursor.run >= self.AHEAD_AFTER and self._hand_ahead(cursor)):
            self._give(cursor, keep=True)
        return out, crc

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

    def _take(self, offset: int) -> Optional[_Cursor]:
        """A cursor for a read at ``offset``, or None when a decoder ahead covers it now."""
        with self._changed:
            while True:
                if self._ahead is not None and self._ahead.covers(offset):
                    return None
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

    def _hand_ahead(self, cursor: _Cursor) -> bool:
        """Give a busy cursor to a new decoder ahead, unless one runs or the cursor is at the end."""
        with self._changed:
            if self._ahead is not None or cursor.out_pos + len(cursor.pending) >= self.size:
                return False
            self._busy.remove(cursor)
            self._ahead = _Ahead(self, cursor)
            self._changed.notify_all()
            return True

    def _ahead_stopped(self, ahead: "_Ahead", cursor: Optional[_Cursor]) -> None:
        """The decoder ahead stopped; its cursor (None after an error) becomes an idle one."""
        with self._changed:
            if self._ahead is ahead:
                self._ahead = None
            if cursor is not None:
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


class _Ahead:
    """Decodes a deflate stream ahead of one sequential reader, on a thread of its own.

    Why: without it, each request decodes what it returns on the thread that answers it,
    so decoding, the kernel's copy and the reader's own work (an md5, a CSV parser) take
    turns. Here the thread decodes up to ``LEAD`` bytes beyond the furthest request while
    requests are answered from its buffer (zlib-ng drops the GIL while it inflates).
    Requests within ``[start, decoded end + LEAD]`` are answered from the buffer, waiting
    for the thread if need be; all others go to the stream's cursors. The thread stops
    at the end of the member, after ``IDLE`` seconds without a request, or at any error:
    what it has not decoded is then read through the cursors, which meet the same error
    and report it as for any read. The buffer keeps ``DeflateStream.BACKLOG`` bytes
    behind the furthest request for the readahead requests that arrive late.
    """

    LEAD = 8 << 20
    IDLE = 2.0

    def __init__(self, stream: DeflateStream, cursor: _Cursor) -> None:
        self._stream = stream
        self._start = cursor.out_pos  #: stream offset of _buffer[0]
        self._buffer = cursor.pending
        cursor.out_pos += len(cursor.pending)
        cursor.pending = bytearray()  # the cursor is the thread's alone from here on
        self._furthest = cursor.out_pos  #: the furthest end a request has asked for
        self._crc: Optional[int] = None  #: the member's CRC-32 once decoded to the end
        self._running = True
        self._changed = threading.Condition()
        threading.Thread(target=self._run, args=(cursor,), name="bioscanfs-ahead", daemon=True).start()

    def _end(self) -> int:
        return self._start + len(self._buffer)

    def _in_reach(self, offset: int) -> bool:
        """Inside the buffer, or at most LEAD beyond it (held: ``_changed``)."""
        return self._start <= offset <= self._end() + self.LEAD

    def covers(self, offset: int) -> bool:
        """Whether a read at ``offset`` waits for this decoder (rather than a cursor)."""
        with self._changed:
            return self._running and self._in_reach(offset)

    def read(self, offset: int, size: int) -> Optional[Tuple[bytes, Optional[int]]]:
        """(the bytes, and the member's CRC when they reach its end), or None when the
        range is not (or no longer) this decoder's."""
        want_end = min(offset + size, self._stream.size)
        with self._changed:
            if not self._in_reach(offset):
                return None
            if want_end > self._furthest:
                self._furthest = want_end
                self._changed.notify_all()
            while self._end() < want_end and self._running:
                self._changed.wait()
            if self._end() < want_end or offset < self._start:
                return None
            with memoryview(self._buffer) as view:   # one copy, not a slice's and then bytes'
                out = bytes(view[offset - self._start:want_end - self._start])
            self._trim()
            return out, self._crc if want_end == self._stream.size else None

    def _trim(self) -> None:
        drop = min(len(self._buffer), self._furthest - DeflateStream.BACKLOG - self._start)
        if drop > 0:
            del self._buffer[:drop]
            self._start += drop

    def _run(self, cursor: _Cursor) -> None:
        stream = self._stream
        try:
            while self._wait_for_room():
                stream._decode_some(cursor)  # outside the lock: requests are answered meanwhile
                with self._changed:
                    self._buffer += cursor.pending
                    cursor.out_pos += len(cursor.pending)
                    cursor.pending.clear()
                    if cursor.out_pos == stream.size:
                        self._crc = cursor.crc
                    self._trim()
                    self._changed.notify_all()
        except Exception:  # noqa: BLE001 - the cursors meet it again and report it
            cursor = None
        with self._changed:
            self._running = False
            self._changed.notify_all()
        stream._ahead_stopped(self, cursor)

    def _wait_for_room(self) -> bool:
        """Wait until the reader is less than LEAD behind; False to stop (at the end, or idle)."""
        with self._changed:
            while self._end() >= self._furthest + self.LEAD:
                if not self._changed.wait(self.IDLE):
                    return False
            return self._end() < self._stream.size
