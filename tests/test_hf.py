"""Hugging Face Hub sources: ``hf://datasets/ORG/REPO/...`` against a local stand-in of the Hub.

A small Hub (HfHandler below, built on scripts/_rangeserver.py's Handler) serves a
generated set as the files of one dataset repo on 127.0.0.1, answering only what
huggingface_hub asks for these operations: the repo info (``GET /api/datasets/{repo}``,
or ``.../revision/{rev}``), the folder tree (``GET /api/datasets/{repo}/tree/{rev}/{path}``)
and the files (``HEAD``/``GET /datasets/{repo}/resolve/{rev}/{path}``, with Range, ETag
and X-Repo-Commit). huggingface_hub reads HF_ENDPOINT when it is imported, so the
environment is set before bioscanfs.remote first imports it (it does so lazily) and is
inherited by mount subprocesses. Expected bytes come from zipfile on the local copy.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List, NamedTuple, Optional
from urllib.parse import quote, unquote, urlsplit

import pytest

# Looked for, not imported: huggingface_hub must first be imported after HF_ENDPOINT is set.
if importlib.util.find_spec("huggingface_hub") is None:
    pytest.skip("needs huggingface_hub (pip install 'bioscanfs[hf]')", allow_module_level=True)
pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

from conftest import MountFactory, assert_one_error_line, load_script, run_cli, zip_contents, zip_members, zip_paths  # noqa: E402

from bioscanfs import Collection  # noqa: E402

_rangeserver = load_script("_rangeserver")

REPO = "bioscan-org/bioscan-test"
FOLDER = "zips"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
_API = re.compile(rf"^/api/datasets/{re.escape(REPO)}(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(rf"^/api/datasets/{re.escape(REPO)}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(rf"^/datasets/{re.escape(REPO)}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class HfHandler(_rangeserver.Handler):
    """The Hub endpoints huggingface_hub calls here; anything else is logged and 404."""

    _resolving = False

    def do_POST(self) -> None:
        self._hub(head=False)

    def _serve(self, head: bool) -> None:  # type: ignore[override]
        self._hub(head)

    def _hub(self, head: bool) -> None:
        site = self.server.site
        path = unquote(urlsplit(self.path).path)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        m = _RESOLVE.match(path)
        self._resolving = bool(m)
        if m and m["rev"] in ("main", COMMIT) and self.command in ("GET", "HEAD"):
            self.path = "/" + quote(m["path"])   # the file itself, served by the range server
            super()._serve(head)
            self._request.path = path            # logged under the URL asked for
            return None
        self._request = _rangeserver.Request(self.command, path, self.headers.get("Range"), 0, 0)
        with site.lock:
            site.log.append(self._request)
        if self.command != "GET":
            return self._json(405, {"error": "method not allowed"}, head)
        m = _API.match(path)
        if m and (m["rev"] or "main") in ("main", COMMIT):
            return self._json(200, {"id": REPO, "sha": COMMIT, "private": False, "siblings": [
                {"rfilename": p.relative_to(site.root).as_posix()}
                for p in sorted(site.root.rglob("*")) if p.is_file()]}, head)
        m = _TREE.match(path)
        if m and m["rev"] in ("main", COMMIT):
            folder = site.root / (m["path"] or "")
            if folder.is_dir():
                return self._json(200, [_entry(site.root, p) for p in sorted(folder.iterdir())], head)
        return self._json(404, {"error": "Entry not found"}, head, {"X-Error-Code": "EntryNotFound"})

    def _json(self, status: int, body: Any, head: bool, headers: Optional[Dict[str, str]] = None) -> None:
        self._reply(status, self._request.path, json.dumps(body).encode(),
                    {"Content-Type": "application/json", **(headers or {})}, head)

    def end_headers(self) -> None:
        if self._resolving:
            self.send_header("X-Repo-Commit", COMMIT)
        super().end_headers()


def _entry(root: Path, path: Path) -> Dict[str, Any]:
    rel = path.relative_to(root).as_posix()
    if path.is_dir():
        return {"type": "directory", "oid": "0" * 40, "path": rel}
    return {"type": "file", "oid": "1" * 40, "size": path.stat().st_size, "path": rel}


class Hub(NamedTuple):
    site: Any            #: scripts/_rangeserver.Site: the served folder and the request log
    local: Path          #: the repo's archives, as local copies

    def url(self, name: str = "") -> str:
        return f"hf://datasets/{REPO}/{FOLDER}" + (f"/{name}" if name else "")


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory, make_fake: ModuleType) -> Iterator[Hub]:
    """The stand-in Hub serving a small fake set under ``zips/`` of dataset REPO (plus a
    non-archive file and a deeper archive, which a folder listing must skip)."""
    root = tmp_path_factory.mktemp("hf_repo")
    local = root / FOLDER
    local.mkdir()
    make_fake.make_set(local, images=40, deflate_fraction=0.4, seed=2)
    (local / "README.txt").write_text("not an archive\n")
    (local / "deeper").mkdir()
    (local / "deeper" / "other.zip").write_bytes(b"not listed")
    server = _rangeserver.Server(("127.0.0.1", 0), HfHandler)
    assert "huggingface_hub.constants" not in sys.modules, "imported before HF_ENDPOINT was set"
    with pytest.MonkeyPatch.context() as env:
        server.site = _rangeserver.Site(root, f"http://127.0.0.1:{server.server_address[1]}")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        for name, value in {"HF_ENDPOINT": server.site.base, "HF_HUB_OFFLINE": "0",
                            "HF_TOKEN": "hf_dummy_token", "HF_HUB_DISABLE_TELEMETRY": "1",
                            "HF_HOME": str(root.parent / "hf_home")}.items():
            env.setenv(name, value)
        try:
            yield Hub(server.site, local)
            unknown = [r for r in server.site.log if r.status in (404, 405) and "absent" not in r.path]
            assert not unknown, f"requests the stand-in Hub does not answer: {unknown}"
            assert not [r for r in server.site.log if r.status == 400], "a multi-range or malformed Range"
        finally:
            server.shutdown()
            server.server_close()
            thread.join()


@pytest.fixture(scope="session")
def hub_contents(hub: Hub) -> Dict[str, bytes]:
    return zip_contents(zip_members(hub.local))


def _resolves(requests: List[Any]) -> List[Any]:
    return [r for r in requests if _RESOLVE.match(r.path)]


def _ranged_get(request: Any) -> bool:
    """A ranged GET of a resolved file, answered in part (206)."""
    return bool(request.method == "GET" and _RESOLVE.match(request.path) and request.range and request.status == 206)


def test_folder_listing_reads_every_member(hub: Hub, hub_contents: Dict[str, bytes]) -> None:
    archives = zip_paths(hub.local)
    mark = hub.site.mark()
    with Collection(hub.url(), index_dir=None) as collection:
        assert [s.name for s in collection.sources] == [hub.url(p.name) for p in archives]
        assert set(collection.paths()) == set(hub_contents)
        for path, data in hub_contents.items():
            assert collection.read(path) == data, path
    requests = hub.site.settled(mark)
    # The API: the repo info and one tree listing, not one call per archive or per read.
    api = [r for r in requests if r.path.startswith("/api/")]
    assert len(api) <= 3 and any(_TREE.match(r.path) for r in api), api
    # Each archive resolved once (one HEAD), then read with ranged GETs only.
    heads = [r.path.rpartition("/")[2] for r in requests if r.method == "HEAD"]
    assert sorted(heads) == [p.name for p in archives]
    assert [r for r in _resolves(requests) if r.method != "HEAD" and not _ranged_get(r)] == []


def test_mount_of_an_hf_archive_serves_its_members(hub: Hub, mount: MountFactory) -> None:
    name = "BIOSCAN_5M_original_256.zip"   # larger than the end-record read: members need requests
    members = zip_members(hub.local)
    expected = {p: d for p, d in zip_contents(members).items() if members[p].archive.name == name}
    assert expected
    mark = hub.site.mark()
    live = mount(hub.url(name), daemon=True)   # the daemon reads after the fork
    opened = hub.site.settled(mark)
    for path, data in expected.items():
        assert live.path(path).read_bytes() == data, path
    during_reads = hub.site.settled(mark)[len(opened):]
    assert [r.method for r in opened if r.method == "HEAD"] == ["HEAD"], opened
    assert len([r for r in opened if r.path.startswith("/api/")]) <= 1, opened
    # The daemon (after the fork) reads with ranged GETs of the resolved URL only.
    assert during_reads
    assert [r for r in during_reads if not _ranged_get(r)] == [], during_reads


def test_resolved_once_then_only_ranged_reads(hub: Hub, hub_contents: Dict[str, bytes]) -> None:
    name = "BIOSCAN_5M_original_256.zip"
    file_url = f"/datasets/{REPO}/resolve/main/{FOLDER}/{name}"
    members = zip_members(hub.local)
    expected = {p: d for p, d in hub_contents.items() if members[p].archive.name == name}
    assert len(expected) > 1
    mark = hub.site.mark()
    with Collection(hub.url(name), index_dir=None) as collection:
        opened = hub.site.settled(mark)
        for path, data in expected.items():
            assert collection.read(path) == data, path
    during_reads = hub.site.settled(mark)[len(opened):]
    # Opening: the repo info at most once, one HEAD of the file, ranged GETs of its end records.
    api = [r for r in opened if r.path.startswith("/api/")]
    assert len(api) <= 1 and all(r.method == "GET" and _API.match(r.path) for r in api), opened
    assert [r.method for r in opened if r.method == "HEAD"] == ["HEAD"], opened
    assert all(r.path == file_url for r in _resolves(opened)), opened
    # Reading: only ranged GETs of the resolved URL, never the API or another HEAD.
    assert during_reads, "members were read without a request"
    odd = [r for r in during_reads if not (r.method == "GET" and r.path == file_url and r.range and r.status == 206)]
    assert not odd, odd   # only the offending requests: the whole list is cut short in the report
    assert len(during_reads) <= len(expected)
    # The stand-in answers as the Hub does: huggingface_hub's own view of the file agrees.
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    meta = get_hf_file_metadata(hf_hub_url(REPO, f"{FOLDER}/{name}", repo_type="dataset"))
    assert (meta.commit_hash, meta.size) == (COMMIT, (hub.local / name).stat().st_size)
    assert meta.etag


# One engine: the mount is refused while opening the archives, before any engine serves.
def test_missing_file_is_one_clear_error_at_mount(hub: Hub, tmp_path: Path, mountpoint: Path) -> None:
    url = hub.url("BIOSCAN_5M_absent.zip")
    done = run_cli("mount", url, mountpoint, "--index-dir", tmp_path / "index")
    assert_one_error_line(done, url)
    assert "not found" in done.stderr
