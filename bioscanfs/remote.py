"""Archives behind URLs: ``http(s)://``, ``s3://``, ``hf://`` and folder listings.

Owns the network side of a byte source; knows nothing of the zip structure. fsspec
provides transport and authentication only: every read is one exact ranged request
(``cat_file(path, start, end)``), never fsspec's file-like caching, so a member read
costs one request and fetches its own bytes and nothing more.

fsspec's async filesystems refuse to run in a forked child, and the CLI forks its daemon
after the archives are indexed. A RemoteSource therefore holds no fsspec object: each
request looks up this process's filesystem (created on first use, keyed on the pid).

``hf://`` paths are resolved once, at open, into the Hub's ``resolve`` URL of the file
(pinned to the revision the path names) plus the auth headers, then read over HTTPS.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import threading
import time
import zlib
from typing import Any, Dict, List, Optional, Tuple

from .errors import ArchiveError
from .zipdir import Source

log = logging.getLogger(__name__)

_URL = re.compile(r"^(https?|s3|hf)://", re.IGNORECASE)
#: Names discover.py knows as archives or pieces: a URL ending so is a file, else a folder.
_ARCHIVE_NAME = re.compile(r"\.(zip|z\d{2,3}|zip\.\d{3})$", re.IGNORECASE)
#: A tail read (the end records) is kept so that parsing it, and a directory lying
#: inside it, costs no second request.
_TAIL_KEEP = 1 << 18
#: Seconds without progress before a request is abandoned (then retried).
TIMEOUT = float(os.environ.get("BIOSCANFS_TIMEOUT", "30"))
#: Attempts per request for timeouts, 5xx, 429 and dropped connections.
ATTEMPTS = int(os.environ.get("BIOSCANFS_ATTEMPTS", "4"))
#: First backoff between attempts, doubled each time.
BACKOFF = 0.1

_filesystems: Dict[Tuple[int, str, str], Any] = {}
_filesystems_lock = threading.Lock()


class RemoteError(ArchiveError):
    """A request failed for good: the mount refuses the archive, a read answers EIO."""


class RangeCache:
    """Fetched byte ranges kept on disk, so that repeated epochs read no network.

    One file per range, named by a hash of (URL, validator, start, end): a changed archive
    (new ETag or Last-Modified) gets new names. A file holds the bytes plus their CRC-32,
    checked at every hit; a file that fails the check is deleted and the range fetched
    again, so a damaged cache costs a request, never wrong bytes. Files are written to a
    temporary name and renamed, so mounts sharing the folder see whole files or none.
    When the folder outgrows ``max_bytes`` the least recently used files are deleted
    (a hit refreshes a file's mtime).
    """

    _CRC = struct.Struct("<I")

    def __init__(self, folder: str, max_bytes: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._size = sum(size for _, _, size in self._files())

    def _files(self) -> List[Tuple[float, str, int]]:
        """(mtime, path, size) of each cached range; files gone meanwhile are skipped."""
        out = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.endswith(".range"):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    out.append((st.st_mtime, entry.path, st.st_size))
        return out

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(key.encode()).hexdigest() + ".range")

    def get(self, key: str, size: int) -> Optional[bytes]:
        """The cached bytes of a range, or None when absent or damaged (then deleted)."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                blob = f.read()
            os.utime(path)
        except OSError:
            return None
        data, crc = blob[:-self._CRC.size], blob[-self._CRC.size:]
        if len(data) == size and self._CRC.pack(zlib.crc32(data)) == crc:
            return data
        log.warning("%s: damaged cache file, fetching the range again", path)
        with contextlib.suppress(OSError):
            os.remove(path)
        return None

    def put(self, key: str, data: bytes) -> None:
        """Store a range (atomically), then evict the oldest files if over the bound."""
        if len(data) + self._CRC.size > self.max_bytes:
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        except OSError as err:
            log.warning("%s: cannot write the cache (%s)", self.folder, err.strerror)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data + self._CRC.pack(zlib.crc32(data)))
            os.replace(tmp, self._path(key))
        except OSError as err:
            log.warning("%s: cannot write the cache (%s)", self.folder, err.strerror)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            return
        with self._lock:
            self._size += len(data) + self._CRC.size
            if self._size <= self.max_bytes:
                return
            files = sorted(self._files())   # the whole folder: other mounts write to it too
            self._size = sum(size for _, _, size in files)
            for _, path, size in files:
                if self._size <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                self._size -= size


def is_url(text: str) -> bool:
    """True for the URL schemes bioscanfs reads remotely."""
    return bool(_URL.match(text))


def _missing_extra(scheme: str, err: ImportError) -> ArchiveError:
    extra = {"s3": "remote,s3", "hf": "remote,hf"}.get(scheme, "remote")
    return ArchiveError(f"{scheme}://", f"needs the optional dependencies: pip install 'bioscanfs[{extra}]' ({err})")


def _filesystem(protocol: str, options: Dict[str, Any]) -> Any:
    """This process's fsspec filesystem for a protocol and options (fork-safe: keyed on the pid)."""
    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True))
    fs = _filesystems.get(key)
    if fs is not None:
        return fs
    with _filesystems_lock:
        fs = _filesystems.get(key)
        if fs is None:
            try:
                import fsspec
                kwargs = dict(options)
                if protocol in ("http", "https"):
                    import aiohttp
                    kwargs["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(
                        total=None, sock_connect=TIMEOUT, sock_read=TIMEOUT)}
                fs = fsspec.filesystem(protocol, skip_instance_cache=True, **kwargs)
            except ImportError as err:
                raise _missing_extra(protocol, err) from None
            _filesystems[key] = fs
    return fs


def _cause(err: BaseException) -> BaseException:
    """The real failure: fsspec's HTTP ``info`` turns every error into FileNotFoundError."""
    return err.__cause__ if isinstance(err, FileNotFoundError) and err.__cause__ is not None else err


def _status(err: BaseException) -> Optional[int]:
    status = getattr(err, "status", None)
    return status if isinstance(status, int) else None


def _transient(err: BaseException) -> bool:
    """Worth retrying: timeouts, dropped connections, short bodies, 5xx, 408 and 429."""
    status = _status(err)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return not isinstance(err, (FileNotFoundError, PermissionError))


def _describe(err: BaseException) -> str:
    status = _status(err)
    if status == 404 or (status is None and isinstance(err, FileNotFoundError)):
        return "not found (HTTP 404)" if status else "not found"
    if status in (401, 403) or isinstance(err, PermissionError):
        return f"access denied (HTTP {status})" if status else "access denied"
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return f"HTTP {status} {text}" if status else f"{type(err).__name__}: {text}"


def _transport(url: str) -> Tuple[str, str, Dict[str, Any]]:
    """(fsspec protocol, path for it, options) of a URL; hf:// becomes its HTTPS URL."""
    scheme = url.split("://", 1)[0].lower()
    if scheme != "hf":
        return scheme, url, {}
    try:
        from huggingface_hub import HfFileSystem, hf_hub_url
        from huggingface_hub.utils import build_hf_headers
    except ImportError as err:
        raise _missing_extra("hf", err) from None
    try:
        where = HfFileSystem().resolve_path(url)
    except (OSError, ValueError) as err:
        raise RemoteError(url, _describe(err)) from None
    https = hf_hub_url(where.repo_id, where.path_in_repo, repo_type=where.repo_type, revision=where.revision)
    return "https", https, {"headers": build_hf_headers()}


class RemoteSource(Source):
    """One zip archive behind a URL, read with one exact ranged request per pread."""

    def __init__(self, url: str, cache: Optional[RangeCache] = None) -> None:
        self.url = self.name = url
        self.disk_bases = [0]
        self._protocol, self._target, self._options = _transport(url)
        info = self._retrying("metadata", lambda fs: fs.info(self._target))
        if info.get("size") is None:
            raise RemoteError(url, "the server does not report the size")
        self.size = int(info["size"])
        validator = info.get("ETag") or info.get("Last-Modified") or info.get("LastModified") or info.get("mtime")
        #: Same shape as FileSource's (one piece): the index is re-built when any field changes.
        self.identity = [(url, self.size, str(validator or ""), 0)]
        #: Without a validator a changed archive could not be told apart: no disk cache.
        self._cache = cache if validator else None
        self._tail: Tuple[int, bytes] = (self.size, b"")

    def pread(self, size: int, offset: int) -> bytes:
        """Exactly the bytes asked for (shorter only at the end): one request, or none
        when the range lies in the last tail fetched or in the disk cache."""
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        start, tail = self._tail
        if start <= offset and end <= start + len(tail):
            return tail[offset - start:end - start]
        key = f"{self.url}\0{self.identity[0][2]}\0{offset}\0{end}"
        data = self._cache.get(key, end - offset) if self._cache else None
        if data is None:
            data = self._retrying(f"bytes {offset}-{end - 1}", lambda fs: self._range(fs, offset, end))
            if self._cache:
                self._cache.put(key, data)
        if end == self.size and end - offset <= _TAIL_KEEP:
            self._tail = (offset, data)
        return data

    def _range(self, fs: Any, start: int, end: int) -> bytes:
        data = fs.cat_file(self._target, start=start, end=end)
        if len(data) != end - start:
            raise ConnectionError(f"got {len(data)} bytes for a {end - start}-byte range")
        return data

    def _retrying(self, what: str, call: Any) -> Any:
        """``call(fs)``, retried with backoff on transient failures; RemoteError when it
        keeps failing or fails for good (404, 403, ...)."""
        attempt = 1
        while True:
            try:
                return call(_filesystem(self._protocol, self._options))
            except ArchiveError:
                raise
            except Exception as raised:  # fsspec backends raise anything; classified below
                err = _cause(raised)
                if not _transient(err) or attempt == ATTEMPTS:
                    tried = f" after {attempt} attempts" if attempt > 1 else ""
                    raise RemoteError(self.url, f"{what}: {_describe(err)}{tried}") from None
                log.info("%s: %s: %s; retrying", self.url, what, _describe(err))
                time.sleep(BACKOFF * 2 ** (attempt - 1))
                attempt += 1

    def close(self) -> None:
        """Nothing to release: connections belong to the process's filesystem."""
        self._tail = (self.size, b"")


def list_remote(url: str) -> List[str]:
    """The file URLs an input URL stands for: itself when it names an archive, else the
    files directly inside the folder it names (an HTTP index page, a bucket prefix, ...)."""
    if not url.endswith("/") and _ARCHIVE_NAME.search(url.split("?", 1)[0]):
        return [url]
    fs = _filesystem(url.split("://", 1)[0].lower(), {})
    try:
        entries = fs.ls(url, detail=True)
    except Exception as raised:  # fsspec backends raise anything
        raise RemoteError(url, f"cannot list the folder: {_describe(_cause(raised))}") from None
    folder = url.rstrip("/") + "/"
    names = (fs.unstrip_protocol(entry["name"]) for entry in entries if entry.get("type") == "file")
    return sorted({name for name in names if name.startswith(folder)
                   and re.fullmatch(r"[^/?#]+", name[len(folder):])})
