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

Work follows what a member honestly is, never what its headers declare: a stored
member's two sizes must agree; a compressed size over ``compressed_bound`` of the
declared size is refused unread; compressed input is read in pieces and decoding
stops at one byte past the declared size, at the end of the stream (input left over
is an error), or where input runs out. A member under 32 MiB that failed is
remembered (the most recent ``FAILED_MAX``): later reads fail at once, until the Reader
is made again (a remount).

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

import bz2
import ctypes
import functools
import io
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import cachetools
import numpy as np

# zlib-ng inflates 1.7x and checksums 4x faster than zlib here, with zlib's API (copy() too).
from zlib_ng import zlib_ng as inflate_impl

from .errors import EncryptedError, MemberError, UnsupportedError
from .streams import CHECK_CHUNK, DeflateStream, LargeMember, StoredStream
from .zipdir import (
    CENTRAL_DTYPE,
    CENTRAL_SIG,
    EOCD,
    EOCD_SIG,
    FLAG_ENCRYPTED,
    LOCAL,
    LOCAL_SIG,
    MADE_BY_UNIX,
    LocalHeader,
    Member,
    Source,
    parse_local_header,
    read_local_header,
)

STORED, DEFLATED, DEFLATE64, BZIP2, AES_METHOD = 0, 8, 9, 12, 99
METHOD_NAMES = {0: "stored", 8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma",
                93: "zstd", 95: "xz", 98: "ppmd", 99: "aes"}
#: Stored members up to this size are read whole, header included, in one pread and CRC-checked.
WHOLE_READ_MAX = 1 << 20
#: Compressed members up to this size are decoded whole into the LRU; larger deflate streams.
STREAM_MIN = 32 << 20
#: Slack read past a local header's name for its extra field, to save a second pread.
EXTRA_SLACK = 128
#: Compressed input is read this much at a time, so a lying compressed size costs nothing.
INPUT_PIECE = 1 << 20
#: Failed members remembered (the most recent), so that retries cost nothing until remount.
FAILED_MAX = 4096

_T = TypeVar("_T")


def compressed_bound(size: int) -> int:
    """The most compressed bytes an honest member of ``size`` bytes can need.

    No method here grows incompressible data by more than a few percent (deflate's stored
    blocks add 5 bytes per 64 KiB, bzip2 about 1%, LZMA, xz, zstd and PPMd less), and
    encryption adds at most 28 bytes (ZipCrypto 12; AES salt, verifier and MAC). Twice the
    size plus 64 KiB is far above all of them, and keeps a lying header from sizing a read.
    """
    return 2 * size + (64 << 10)


class Reader:
    """Decodes members of a fixed list of sources; safe to call from many threads."""

    def __init__(self, sources: Sequence[Source], cache_bytes: int = 256 << 20,
                 password: Optional[bytes] = None) -> None:
        self._sources = list(sources)
        self._lock = threading.Lock()
        self._decoded: cachetools.LRUCache = cachetools.LRUCache(maxsize=max(cache_bytes, 1), getsizeof=len)
        self._headers: cachetools.LRUCache = cachetools.LRUCache(maxsize=1 << 16)
        self._streams: cachetools.LRUCache = cachetools.LRUCache(maxsize=8)
        self._failed: cachetools.LRUCache = cachetools.LRUCache(maxsize=FAILED_MAX)
        self._password = password

    @property
    def password(self) -> Optional[bytes]:
        """For encrypted members; may be set later (a prompt)."""
        return self._password

    @password.setter
    def password(self, value: Optional[bytes]) -> None:
        with self._lock:  # members that failed without it may read now
            self._password = value
            self._failed.clear()

    def read(self, member: Member, label: str, size: int, offset: int) -> bytes:
        size = min(size, member.size - offset)
        if size <= 0:
            return b""
        return self._guarded(member, label, lambda src: self._read(src, member, label, size, offset))

    def check(self, member: Member, label: str) -> None:
        """Decode a whole member and check its CRC-32, whatever its method and size (0 too)."""
        self._guarded(member, label, lambda src: self._check(src, member, label))

    def _guarded(self, member: Member, label: str, work: Callable[[Source], _T]) -> _T:
        """``work`` on the member's source, unless the member failed before.

        A MemberError of a member decoded whole (under STREAM_MIN) is remembered: a retry
        would decode it all again. A streamed member is not: it fails only at and after
        its damage, each read costs at most one seek interval, and it keeps its own CRC
        verdict. Other errors (a source that cannot be read, memory) may pass: not kept.
        """
        key = self._key(member)
        with self._lock:
            failed = self._failed.get(key)
        if failed is not None:
            raise _fresh(failed)
        src = self._sources[member.archive]
        try:
            check_sizes(src, member, label)
            return work(src)
        except MemberError as err:
            if member.size < STREAM_MIN:
                with self._lock:
                    self._failed[key] = _fresh(err)
            raise

    def _read(self, src: Source, member: Member, label: str, size: int, offset: int) -> bytes:
        total = member.size
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

    def copy_to(self, member: Member, label: str, sink: Callable[[bytes], None]) -> None:
        """A whole member to ``sink`` in order, CRC checked (raises MemberError): a deflated
        one inflated in one pass (``inflate_to``), any other read as ``read`` serves it."""
        if member.method == DEFLATED and not member.flags & FLAG_ENCRYPTED:
            self._guarded(member, label, lambda src: inflate_to(src, member, label, sink))
            return
        for offset in range(0, member.size, CHECK_CHUNK):
            sink(self.read(member, label, CHECK_CHUNK, offset))

    def _check(self, src: Source, member: Member, label: str) -> None:
        size = member.size
        if size < STREAM_MIN:
            self._decoded_whole(src, member, label)  # decoded and CRC-checked, 0 bytes too
            return
        crc = 0
        for offset in range(0, size, CHECK_CHUNK):
            crc = inflate_impl.crc32(self._read(src, member, label, min(CHECK_CHUNK, size - offset), offset), crc)
        check_crc(src, member, label, b"", crc)

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

    def _read_with_header(self, src: Source, member: Member, label: str, limit: int) -> Tuple[bytes, bytes, int]:
        """(local header with name and extra field, the first ``limit`` bytes of the data,
        where the data starts), in one pread when the header's extra field is short."""
        at = member.header_offset
        want = min(limit, member.compressed_size)
        raw = src.pread(LOCAL.size + member.name_length + EXTRA_SLACK + want, at)
        header = parse_local_header(src, member, label, raw)
        start = header.data_offset - at
        data = raw[start:start + want]
        if len(data) < want:
            data += src.pread(want - len(data), header.data_offset + len(data))
        if len(data) != want:
            raise MemberError(src.name, label, "member data is cut short (archive truncated?)")
        return raw[:start], data, header.data_offset

    def _read_whole_stored(self, src: Source, member: Member, label: str) -> bytes:
        data = self._read_with_header(src, member, label, member.compressed_size)[1]
        check_crc(src, member, label, data)
        return data

    def _decoded_whole(self, src: Source, member: Member, label: str) -> bytes:
        key = self._key(member)
        with self._lock:
            data = self._decoded.get(key)
        if data is not None:
            return data
        data = self._decode(src, member, label)
        if len(data) != member.size:
            raise MemberError(src.name, label, f"decodes to {len(data)} bytes, not the declared {member.size}")
        check_crc(src, member, label, data)
        if 0 < len(data) <= self._decoded.maxsize:  # an empty entry would cost the LRU nothing: never evicted
            with self._lock:
                self._decoded[key] = data
        return data

    def _decode(self, src: Source, member: Member, label: str) -> bytes:
        """A whole member by its method, at most one byte past its declared size.

        Deflate uses zlib-ng, Deflate64 inflate64, bzip2 the standard library (faster than
        libarchive, see scripts/bench_methods.py), each fed bounded pieces; every other
        method, and every encrypted member, goes through libarchive.
        """
        method = member.method
        if member.flags & FLAG_ENCRYPTED or method not in (STORED, DEFLATED, DEFLATE64, BZIP2):
            header, data, _ = self._read_with_header(src, member, label, member.compressed_size)
            return libarchive_decode(src, member, label, header, data, self.password)
        if method == STORED:
            return self._read_with_header(src, member, label, member.compressed_size)[1]
        _, first, data_offset = self._read_with_header(src, member, label, INPUT_PIECE)
        return _decode_pieces(src, member, label, _DECODERS[method](), _pieces(src, member, label, first, data_offset))

    def _stream(self, src: Source, member: Member, label: str) -> LargeMember:
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


def _fresh(err: MemberError) -> MemberError:
    """A new error equal to ``err`` (class, message, fields) without its traceback or
    context: what is remembered holds no frame (nor the buffers in it), and one instance
    is never raised from several threads at once."""
    again = type(err).__new__(type(err), *err.args)
    again.__dict__.update(err.__dict__)
    return again


def check_sizes(src: Source, member: Member, label: str) -> None:
    """The sizes a member declares, before any of its data is read: a plain stored member's
    two sizes are one; no compressed size exceeds what its declared size can need."""
    csize, size = member.compressed_size, member.size
    if member.method == STORED and not member.flags & FLAG_ENCRYPTED:
        if csize != size:
            raise MemberError(src.name, label, f"stored member declares {csize} bytes of data for a size of {size}")
    elif csize > compressed_bound(size):
        raise MemberError(src.name, label, f"compressed size {csize} is more than a {size}-byte member can need")


def _unchecked_aes(member: Member) -> bool:
    """WinZip AE-2 stores no CRC (0); libarchive checks its authentication code instead."""
    return member.method == AES_METHOD and member.crc32 == 0


def check_crc(src: Source, member: Member, label: str, data: bytes, crc: int = 0) -> None:
    """Raise unless the CRC of ``data`` (continuing from ``crc``) is the member's."""
    if inflate_impl.crc32(data, crc) != member.crc32 and not _unchecked_aes(member):
        raise MemberError(src.name, label, "CRC-32 mismatch: the archive is corrupt")


def _pieces(src: Source, member: Member, label: str, first: bytes, data_offset: int) -> Iterator[memoryview]:
    """A member's compressed bytes in pieces of at most INPUT_PIECE, ``first`` (already
    read) first; raises where the archive ends before the declared compressed size.

    The very last byte comes alone, so that a decoder that cannot say how much input it
    left over (inflate64) still tells a stream that ends before its declared compressed
    size (it ends before that byte) from one that ends exactly there.
    """
    end = data_offset + member.compressed_size
    pos = data_offset + len(first)
    piece = memoryview(first)
    while pos < end:
        yield piece
        more = src.pread(min(INPUT_PIECE, end - pos), pos)
        if not more:
            raise MemberError(src.name, label, "member data is cut short (archive truncated?)")
        pos += len(more)
        piece = memoryview(more)
    if len(piece) > 1:
        yield piece[:-1]
    if len(piece):
        yield piece[-1:]


def _decode_pieces(src: Source, member: Member, label: str, decoder: Any, pieces: Iterator[memoryview]) -> bytes:
    """Feed ``pieces`` to ``decoder`` (zlib's ``decompress(data, max_length)``, ``eof``,
    ``unused_data``) until its stream ends, as ``_decoded`` checks it; the whole member."""
    return b"".join(_decoded(src, member, label, decoder, pieces, member.size + 1))


def _decoded(src: Source, member: Member, label: str, decoder: Any, pieces: Iterator[memoryview],
             most: int) -> Iterator[bytes]:
    """The output of ``decoder`` fed ``pieces``, at most ``most`` bytes a piece, until its
    stream ends. The stream must give exactly the declared size (decoding stops one byte
    past it) and end exactly at the declared compressed size (``_check_end``); a piece
    whose output is cut at ``most`` is drained through ``unconsumed_tail`` (zlib's)."""
    name = method_name(member.method)
    produced = fed = 0
    try:
        for piece in pieces:
            fed += len(piece)
            while piece and not decoder.eof:
                out = decoder.decompress(piece, min(most, member.size + 1 - produced))
                produced += len(out)
                if produced > member.size:
                    raise MemberError(src.name, label, f"{name} stream inflates past its declared size")
                yield out
                piece = getattr(decoder, "unconsumed_tail", b"")
            if decoder.eof:
                break
    except (inflate_impl.error, OSError, ValueError, EOFError) as err:
        raise MemberError(src.name, label, f"{name} stream is corrupt ({err})") from None
    _check_end(src, member, label, decoder, produced, fed)


def _check_end(src: Source, member: Member, label: str, decoder: Any, produced: int, fed: int) -> None:
    """A stream decoded to its end gave exactly the declared size and ended exactly at the
    declared compressed size."""
    name = method_name(member.method)
    if not decoder.eof or produced < member.size:
        raise MemberError(src.name, label, f"{name} stream ends early")
    if decoder.unused_data or fed < member.compressed_size:
        raise MemberError(src.name, label, f"{name} stream ends before its declared compressed size")


def inflate_to(src: Source, member: Member, label: str, sink: Callable[[bytes], None]) -> None:
    """A deflated member's bytes to ``sink`` in order, in pieces of at most INPUT_PIECE: one
    pass, none of the seek points, cursors and caches of ``DeflateStream``, for a reader
    that takes a large member once from start to end (the views' CSV: docs/views.md).
    Checked as a member decoded whole (sizes, stream end, CRC-32), except that ``sink``
    has had the bytes before the fault when MemberError is raised: whoever reads them
    must wait for this to return."""
    check_sizes(src, member, label)
    header = read_local_header(src, member, label)
    crc = 0
    for out in _decoded(src, member, label, inflate_impl.decompressobj(-15),
                        _pieces(src, member, label, b"", header.data_offset), INPUT_PIECE):
        crc = inflate_impl.crc32(out, crc)
        sink(out)
    check_crc(src, member, label, b"", crc)


class _Deflate64:
    """inflate64 behind zlib's ``decompress(data, max_length)``: inflate64 has no output
    limit, and one Deflate64 length code copies 65,538 bytes for as little as 18 bits of
    input (1-bit length and distance codes and 16 extra bits), so input goes in steps of
    STEP bytes (at most 128 x 29,128 = 3.7 MB out each), stopping once the limit is passed.
    ``unused_data`` is the input after the step where the stream ended."""

    STEP = 128

    def __init__(self) -> None:
        import inflate64  # here, not at the top: it imports importlib.metadata, 35-50 ms of every start

        self._inflater = inflate64.Inflater()
        self.unused_data = b""

    @property
    def eof(self) -> bool:
        return self._inflater.eof

    def decompress(self, data: memoryview, max_length: int) -> bytes:
        inflate, out, produced = self._inflater.inflate, [], 0
        for at in range(0, len(data), self.STEP):
            out.append(inflate(data[at:at + self.STEP]))
            produced += len(out[-1])
            if self._inflater.eof:
                self.unused_data = bytes(data[at + self.STEP:])
                break
            if produced >= max_length:
                break
        return b"".join(out)


#: Decoders with zlib's ``decompress(data, max_length)``, ``eof`` and ``unused_data``, by method.
_DECODERS: Dict[int, Callable[[], Any]] = {
    DEFLATED: lambda: inflate_impl.decompressobj(-15),
    DEFLATE64: _Deflate64,
    BZIP2: bz2.BZ2Decompressor,
}


@functools.lru_cache(maxsize=None)
def _archive_read_data() -> Callable[..., int]:
    """libarchive's archive_read_data without libarchive-c's error check, which logs a
    warning (a bad CRC, a bad AES authentication code) and hands back -20 as a length;
    here every negative return is an error."""
    from libarchive import ffi
    function = ffi.libarchive["archive_read_data"]  # a fresh function pointer, without errcheck
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    function.restype = ctypes.c_ssize_t
    return function


def one_member_archive(member: Member, header: bytes, data: bytes) -> bytes:
    """A complete zip of one member, as libarchive's seekable reader expects it.

    The local header keeps the member's flags, method, DOS time and extra field (where
    the AES fields are); the name is a placeholder (libarchive need not convert it) and
    the CRC and sizes are the central directory's. A central directory and end record
    follow the data, so libarchive takes the sizes from there and never looks for a data
    descriptor (which its streaming reader cannot find at the end of a buffer); with bit 3
    set, the ZipCrypto check byte is still the DOS time's, as the writer made it.
    """
    fields = LOCAL.unpack_from(header)
    flags, method, dos_time, dos_date = fields[2:6]
    extra = header[LOCAL.size + fields[9]:]
    name = b"m"
    local = LOCAL.pack(LOCAL_SIG, 20, flags, method, dos_time, dos_date, member.crc32, len(data), member.size,
                       len(name), len(extra)) + name + extra
    central = np.zeros(1, CENTRAL_DTYPE)
    for field, value in (("signature", CENTRAL_SIG), ("version_made_by", MADE_BY_UNIX << 8 | 20),
                         ("version_needed", 20), ("flags", flags), ("method", method), ("mod_time", dos_time),
                         ("mod_date", dos_date), ("crc32", member.crc32), ("compressed_size", len(data)),
                         ("uncompressed_size", member.size), ("name_length", len(name)),
                         ("extra_length", len(extra)), ("external_attr", 0o100644 << 16)):
        central[field] = value
    directory = central.tobytes() + name + extra
    end = EOCD.pack(EOCD_SIG, 0, 0, 1, 1, len(directory), len(local) + len(data), 0)
    return local + data + directory + end


def libarchive_decode(src: Source, member: Member, label: str, header: bytes, data: bytes,
                      password: Optional[bytes]) -> bytes:
    """Decode one member with libarchive, from ``one_member_archive``: at most one byte
    past its declared size; libarchive's own checks (CRC, AES authentication code, sizes)
    are errors."""
    import libarchive  # only members with rare methods or encryption pay for the import

    encrypted = bool(member.flags & FLAG_ENCRYPTED)
    if encrypted and password is None:
        raise EncryptedError(src.name, label, "member is encrypted; mount with --password-file (or -f for a prompt)")
    read_data = _archive_read_data()
    budget = member.size + 1
    chunks: List[bytes] = []
    try:
        with libarchive.memory_reader(one_member_archive(member, header, data), format_name="zip",
                                      passphrase=password) as archive:
            next(iter(archive))  # the one entry; archive._pointer is its reader
            buffer = ctypes.create_string_buffer(1 << 16)
            while budget > 0:
                got = read_data(archive._pointer, buffer, len(buffer))
                if got < 0:
                    raise libarchive.ffi.archive_error(archive._pointer, got)
                if got == 0:
                    break
                chunks.append(buffer.raw[:got])
                budget -= got
    except libarchive.ArchiveError as err:
        message = str(err).split(" (errno=")[0]
        if encrypted and any(word in message.lower() for word in ("passphrase", "password", "decrypt")):
            raise EncryptedError(src.name, label, f"cannot decrypt: {message}") from None
        if "Unsupported" in message:
            raise UnsupportedError(src.name, label, message) from None
        raise MemberError(src.name, label, f"{method_name(member.method)} stream is corrupt ({message})") from None
    if budget <= 0:
        raise MemberError(src.name, label, f"{method_name(member.method)} stream decodes past its declared size")
    return b"".join(chunks)


class MemberFile(io.RawIOBase):
    """A seekable binary file over one member, read through a Reader (wrap it in an
    io.BufferedReader): ``Collection.open``, and the views' CSV read by the index build."""

    def __init__(self, reader: Reader, member: Member, label: str) -> None:
        self._reader, self._member, self._label = reader, member, label
        self._size = member.size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self._reader.read(self._member, self._label, len(buffer), self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)
