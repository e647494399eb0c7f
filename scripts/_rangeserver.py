"""A threaded HTTP/1.1 server on loopback that serves a folder with single Range requests.

Shared by tests/test_remote.py and scripts/bench_remote.py, so the benchmark measures the
server the tests check. It answers HEAD with ETag and Last-Modified, lists folders like
nginx's autoindex, logs every request (method, range, status, body bytes), injects
failures on demand and can delay each ranged reply (a stand-in for network latency).
"""
from __future__ import annotations

import contextlib
import html
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set
from urllib.parse import quote, unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Request:
    method: str
    path: str
    range: Optional[str]
    status: int
    sent: int   #: body bytes of the reply (0 until it is sent; see Handler._record)


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

    def settled(self, mark: int, timeout: float = 10.0) -> List[Request]:
        """The requests since ``mark`` once none is in flight, each with its reply logged (or
        as they are after ``timeout``): a client may still be reading, e.g. a mount's
        read-ahead after the read that a test waited for."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if (self.inflight == 0 and all(r.status for r in self.log[mark:])) or time.monotonic() > deadline:
                    return list(self.log[mark:])
            time.sleep(0.01)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "Server"
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
        """Complete this request's log entry, appended when it arrived. A whole reply is
        logged before its headers go out (end_headers sends them): a client that has read it
        must find its entry complete, or a test that looks right after a read races this
        thread (status 0 seen under load)."""
        with self.server.site.lock:
            self._request.status, self._request.sent = status, sent

    def _reply(self, status: int, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
               head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self._record(status, 0 if head else len(body), path)
        self.end_headers()
        if not head:
            self.wfile.write(body)

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
            self._record(200, 0, path)
            return self.end_headers()
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


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    site: Site

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up on a stalled reply is expected; anything else is shown."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serving(root: Path) -> Iterator[Site]:
    """Serve ``root`` on 127.0.0.1 (an ephemeral port) until the block ends."""
    server = Server(("127.0.0.1", 0), Handler)
    server.site = Site(root, f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.site
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
