"""Remote archives (issue 10): URLs of archives and of folder listings, over real HTTP.

A small threaded HTTP/1.1 server on 127.0.0.1 serves a copy of the fake set plus one
archive whose central directory is larger than the end-record tail read. It honours
single Range requests, answers HEAD with ETag and Last-Modified, lists folders like
nginx's autoindex, logs every request (method, range, status, body bytes) and injects
failures on demand. Expected bytes come from zipfile on the served files.
"""
from __future__ import annotations

import errno
import html
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set
from urllib.parse import quote, unquote, urlsplit

import pytest

from bioscanfs import Collection
from bioscanfs.errors import BioscanError
from bioscanfs.remote import ATTEMPTS
from conftest import (MountFactory, assert_one_error_line, copy_archives, mounted, run_cli,
                      zip_contents, zip_members)

BIG_DIRECTORY = "many_members.zip"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Request:
    method: str
    path: str
    range: Optional[str]
    status: int
    sent: int   #: body bytes written (0 until the reply is done)


@dataclass
class Site:
    """The server's state: what it serves, what it logged, what it will break."""

    root: Path
    base: str = ""
    log: List[Request] = field(default_factory=list)
    faults: Dict[str, List[str]] = field(default_factory=dict)   #: path -> actions for the next ranged GETs
    forbidden: Set[str] = field(default_factory=set)
    delay: float = 0.0
    stall: float = 2.0
    inflight: int = 0
    max_inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, name: str = "") -> str:
        return f"{self.base}/bioscan/{quote(name)}"

    def fail(self, name: str, actions: List[str]) -> None:
        with self.lock:
            self.faults[f"/bioscan/{name}"] = list(actions)

    def mark(self) -> int:
        with self.lock:
            return len(self.log)

    def since(self, mark: int) -> List[Request]:
        with self.lock:
            return list(self.log[mark:])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"
    _request: Request

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: object) -> None:
        """Requests go to Site.log, not stderr."""

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _record(self, status: int, sent: int, path: str) -> None:
        """Complete this request's log entry, appended when it arrived."""
        with self.server.site.lock:
            self._request.status, self._request.sent = status, sent

    def _reply(self, status: int, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
               head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self._record(status, 0 if head else len(body), path)

    def _serve(self, head: bool) -> None:
        site = self.server.site
        path = unquote(urlsplit(self.path).path)
        target = site.root / path.lstrip("/")
        self._request = Request(self.command, path, self.headers.get("Range"), 0, 0)
        with site.lock:
            site.log.append(self._request)
            site.inflight += 1
            site.max_inflight = max(site.max_inflight, site.inflight)
        try:
            if path in site.forbidden:
                return self._reply(403, path, b"forbidden", head=head)
            if path.endswith("/") and target.is_dir():
                return self._reply(200, path, _listing(path, target), {"Content-Type": "text/html"}, head)
            if not target.is_file():
                return self._reply(404, path, b"not found", head=head)
            self._serve_file(path, target, head)
        finally:
            with site.lock:
                site.inflight -= 1

    def _serve_file(self, path: str, target: Path, head: bool) -> None:
        site = self.server.site
        st = target.stat()
        headers = {"ETag": f'"{st.st_size:x}-{st.st_mtime_ns:x}"', "Accept-Ranges": "bytes",
                   "Last-Modified": self.date_time_string(int(st.st_mtime)),
                   "Content-Type": "application/zip"}
        if head:
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(st.st_size))
            self.end_headers()
            return self._record(200, 0, path)
        spec = self.headers.get("Range")
        if spec is None:
            return self._reply(200, path, target.read_bytes(), headers)
        m = _RANGE.match(spec)
        if not m or (not m[1] and not m[2]):
            return self._reply(400, path, b"one range only", headers)  # multi-range: tests assert none
        if m[1]:
            start, stop = int(m[1]), min(int(m[2]) + 1 if m[2] else st.st_size, st.st_size)
        else:
            start, stop = max(st.st_size - int(m[2]), 0), st.st_size
        with open(target, "rb") as f:
            f.seek(start)
            body = f.read(stop - start)
        with site.lock:
            queue = site.faults.get(path) or []
            action = queue.pop(0) if queue else None
        time.sleep(site.delay)
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{st.st_size}"
        if action == "503":
            return self._reply(503, path, b"busy")
        if action == "stall":
            time.sleep(site.stall)
        if action in ("drop", "truncate"):
            if action == "truncate":
                self.send_response(206)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
            self._record(206 if action == "truncate" else 0, len(body) // 2 if action == "truncate" else 0, path)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if action == "short":  # a well-formed reply that holds fewer bytes than asked
            body = body[:len(body) // 2]
        return self._reply(206, path, body, headers)


def _listing(path: str, folder: Path) -> bytes:
    """An nginx/Apache-like index page: parent and sort links, a subfolder, the files."""
    links = ['<a href="../">../</a>', '<a href="?C=N;O=D">Name</a>']
    for entry in sorted(folder.iterdir()):
        name = entry.name + ("/" if entry.is_dir() else "")
        links.append(f'<a href="{quote(name)}">{html.escape(name)}</a>        01-Jan-2024 00:00    -')
    return (f"<html><head><title>Index of {path}</title></head><body><h1>Index of {path}</h1><pre>"
            + "\n".join(links) + "</pre></body></html>").encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    site: Site

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up on a stalled reply is expected; anything else is shown."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture
def site(tmp_path: Path, fake_set: Path) -> Iterator[Site]:
    """The fake set, one big-directory archive and a subfolder, served on 127.0.0.1."""
    folder = copy_archives(fake_set, tmp_path / "www" / "bioscan")
    (folder / "not-archives").mkdir()
    (folder / "README.txt").write_text("not an archive\n")
    with zipfile.ZipFile(folder / BIG_DIRECTORY, "w") as zf:  # its directory is > 64 KiB
        for i in range(1500):
            zf.writestr(f"extra/{'long-member-name-' * 3}{i:05d}.txt", f"member {i}\n")
    server = _Server(("127.0.0.1", 0), _Handler)
    server.site = Site(tmp_path / "www", f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.site
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert not [r for r in server.site.log if r.status == 400], "a multi-range or malformed Range request"


def _archives(site: Site) -> List[str]:
    return sorted(p.name for p in (site.root / "bioscan").glob("*.zip"))


def _per_archive(requests: List[Request]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for r in requests:
        if not r.path.endswith("/"):
            counts[r.path.rpartition("/")[2]] = counts.get(r.path.rpartition("/")[2], 0) + 1
    return counts


def _stored_members(site: Site) -> List[str]:
    """Small stored members that lie before the end-record tail (each read is a request)."""
    members = zip_members(site.root / "bioscan")
    return sorted(p for p, m in members.items() if m.info.compress_type == zipfile.ZIP_STORED
                  and 0 < m.info.file_size <= 1 << 16
                  and m.info.header_offset + (1 << 17) < m.archive.stat().st_size)


def test_cold_then_warm_daemon_mount_serves_every_member(site: Site, mount: MountFactory,
                                                          tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    expected = zip_contents(zip_members(site.root / "bioscan"))
    archives = _archives(site)

    with mounted([site.url()], tmp_path / "cold", index_dir=index_dir):  # type: ignore[list-item]
        cold = _per_archive(site.since(0))
    assert set(cold) == set(archives)
    assert max(cold.values()) <= 3, cold
    assert cold[BIG_DIRECTORY] == 3, "HEAD, tail, then the directory that lies before the tail"
    print(f"\ncold mount: {sum(cold.values())} requests for {len(archives)} archives (+1 listing)")

    mark = site.mark()
    live = mount(site.url(), index_dir=index_dir, daemon=True)   # fsspec must work after the fork
    warm = site.since(mark)
    assert _per_archive(warm) == {name: 1 for name in archives}
    assert {r.method for r in warm if not r.path.endswith("/")} == {"HEAD"}
    for path, data in expected.items():
        assert live.path(path).read_bytes() == data, path
    print(f"warm mount: {len(warm)} requests (1 listing + {len(archives)} HEAD)")


def test_random_small_reads_fetch_little_more_than_they_serve(site: Site, mount: MountFactory) -> None:
    live = mount(site.url())
    members = zip_members(site.root / "bioscan")
    images = sorted(p for p, m in members.items() if m.info.file_size <= 1 << 16 and m.archive.name != BIG_DIRECTORY)
    picked = random.Random(0).sample(images, 200)
    expected = zip_contents({p: members[p] for p in picked})
    mark = site.mark()
    served = 0
    for path in picked:
        data = live.path(path).read_bytes()
        assert data == expected[path], path
        served += len(data)
    gets = [r for r in site.since(mark) if r.method == "GET"]
    fetched = sum(r.sent for r in gets)
    assert len(gets) <= len(picked), "one ranged GET per member at most (none in the cached tail)"
    assert all(r.range for r in gets)
    assert fetched <= 1.5 * served, (fetched, served)
    # Stored members alone (no compression to flatter the ratio): their GET starts at the header.
    sent_at = {(r.path.rpartition("/")[2], int(r.range.split("=")[1].split("-")[0])): r.sent for r in gets}
    stored = [p for p in picked if members[p].info.compress_type == zipfile.ZIP_STORED
              and (members[p].archive.name, members[p].info.header_offset) in sent_at]
    stored_fetched = sum(sent_at[members[p].archive.name, members[p].info.header_offset] for p in stored)
    stored_served = sum(members[p].info.file_size for p in stored)
    assert len(stored) > 20 and stored_fetched <= 1.5 * stored_served, (len(stored), stored_fetched, stored_served)
    print(f"\n{len(picked)} random members: {len(gets)} GETs, {fetched} bytes fetched / {served} served "
          f"= {fetched / served:.3f}; {len(stored)} stored ones: {stored_fetched} / {stored_served} "
          f"= {stored_fetched / stored_served:.3f}")


def test_concurrent_readers_requests_overlap(site: Site, mount: MountFactory) -> None:
    live = mount(site.url())
    picked = _stored_members(site)[:16]
    expected = zip_contents({p: zip_members(site.root / "bioscan")[p] for p in picked})
    site.delay = 0.3
    with site.lock:
        site.max_inflight = 0
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: live.path(p).read_bytes(), picked))
    assert got == [expected[p] for p in picked]
    assert site.max_inflight >= 4, site.max_inflight
    print(f"\nmax requests in flight: {site.max_inflight}")


def test_archive_changed_upstream_is_reindexed(site: Site, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    with mounted([site.url()], tmp_path / "first", index_dir=index_dir) as live:  # type: ignore[list-item]
        assert not live.path("bioscan5m/added.txt").exists()
    changed = "BIOSCAN_5M_cropped_256_eval.zip"
    with zipfile.ZipFile(site.root / "bioscan" / changed, "a") as zf:
        zf.writestr("bioscan5m/added.txt", b"new upstream\n")
    mark = site.mark()
    with mounted([site.url()], tmp_path / "second", index_dir=index_dir) as live:  # type: ignore[list-item]
        counts = _per_archive(site.since(mark))
        assert live.path("bioscan5m/added.txt").read_bytes() == b"new upstream\n"
    assert counts.pop(changed) >= 2, "the changed archive's directory is read again"
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("actions", [["503", "503"], ["drop"], ["truncate"], ["short"]])
def test_transient_failures_are_retried(site: Site, tmp_path: Path, actions: List[str]) -> None:
    collection = Collection(site.url(), index_dir=str(tmp_path / "index"))
    members = zip_members(site.root / "bioscan")
    path = _stored_members(site)[0]
    name = members[path].archive.name
    site.fail(name, actions)
    mark = site.mark()
    assert collection.read(path) == members[path].read()
    assert len(site.since(mark)) == len(actions) + 1
    collection.close()


def test_persistent_failure_is_an_error_never_wrong_bytes(site: Site, tmp_path: Path) -> None:
    collection = Collection(site.url(), index_dir=str(tmp_path / "index"))
    members = zip_members(site.root / "bioscan")
    path = _stored_members(site)[1]
    name = members[path].archive.name
    site.fail(name, (["truncate", "short"] * ATTEMPTS)[:ATTEMPTS])
    mark = site.mark()
    with pytest.raises(BioscanError, match=re.escape(site.url(name)) + r": bytes \d+-\d+: .* after"):
        collection.read(path)
    assert len(site.since(mark)) == ATTEMPTS
    assert collection.read(path) == members[path].read(), "served once the server recovers"
    collection.close()


def test_read_failure_is_eio_with_the_url_logged(site: Site, mount: MountFactory) -> None:
    live = mount(site.url())
    members = zip_members(site.root / "bioscan")
    path = _stored_members(site)[2]
    name = members[path].archive.name
    live.expect_log(re.escape(site.url(name)))
    site.fail(name, ["truncate"] * 100)   # the kernel retries a failed read itself
    with pytest.raises(OSError) as caught:
        live.path(path).read_bytes()
    assert caught.value.errno == errno.EIO
    assert site.url(name) in live.log_text()


def test_stalled_request_times_out_and_is_retried(site: Site, mount: MountFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIOSCANFS_TIMEOUT", "0.5")   # read by the mount's process
    live = mount(site.url())
    members = zip_members(site.root / "bioscan")
    path = _stored_members(site)[3]
    site.fail(members[path].archive.name, ["stall"])
    mark = site.mark()
    started = time.monotonic()
    assert live.path(path).read_bytes() == members[path].read()
    assert time.monotonic() - started < site.stall, "served by the retry, not by the stalled request"
    assert len(site.since(mark)) == 2


@pytest.mark.parametrize("kind", ["missing", "forbidden"])
def test_unreachable_archive_is_one_clear_error_at_mount(site: Site, tmp_path: Path, mountpoint: Path,
                                                         kind: str) -> None:
    name = "BIOSCAN_5M_cropped_256_train.zip"
    if kind == "missing":
        os.remove(site.root / "bioscan" / name)
        url = site.url(name)
        sources = [url]
    else:
        site.forbidden.add(f"/bioscan/{name}")
        url = site.url(name)
        sources = [site.url()]
    done = run_cli("mount", *sources, mountpoint, "--index-dir", tmp_path / "index")
    assert_one_error_line(done, url)
    assert ("not found (HTTP 404)" if kind == "missing" else "access denied (HTTP 403)") in done.stderr


def test_missing_local_source_is_still_checked(tmp_path: Path, mountpoint: Path) -> None:
    done = run_cli("mount", tmp_path / "absent", mountpoint)
    assert done.returncode == 2 and "does not exist" in done.stderr, done.stderr


def test_folder_listing_and_single_archive_urls(site: Site, tmp_path: Path) -> None:
    with Collection(site.url(), index_dir=None) as whole:
        assert [s.name for s in whole.sources] == [site.url(n) for n in _archives(site)]
    name = "BIOSCAN_5M_cropped_256_train.zip"
    expected = zip_members(site.root / "bioscan")
    with Collection(site.url(name), index_dir=None) as one:
        paths = set(one.paths())
        assert paths == {p for p, m in expected.items() if m.archive.name == name}
        for path in sorted(paths)[:20]:
            assert one.read(path) == expected[path].read()
    shutil.rmtree(site.root / "bioscan")
    (site.root / "bioscan").mkdir()
    with pytest.raises(BioscanError, match="no zip archives found"):
        Collection(site.url(), index_dir=None)
