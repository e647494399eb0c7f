"""Remote archives (issue 10): URLs of archives and of folder listings, over real HTTP.

scripts/_rangeserver.py (a threaded HTTP/1.1 server on 127.0.0.1 honouring single Range
requests, with a request log and fault injection) serves a copy of the fake set plus one
archive whose central directory is larger than the end-record tail read. Expected bytes
come from zipfile on the served files.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from conftest import (
    MountFactory,
    assert_one_error_line,
    copy_archives,
    load_script,
    mounted,
    run_cli,
    zip_contents,
    zip_members,
)

from bioscanfs import Collection
from bioscanfs.errors import BioscanError
from bioscanfs.remote import ATTEMPTS

_rangeserver = load_script("_rangeserver")
Site, Request, serving = _rangeserver.Site, _rangeserver.Request, _rangeserver.serving

BIG_DIRECTORY = "many_members.zip"


@pytest.fixture
def site(tmp_path: Path, fake_set: Path) -> Iterator[Site]:
    """The fake set, one big-directory archive and a subfolder, served on 127.0.0.1."""
    folder = copy_archives(fake_set, tmp_path / "www" / "bioscan")
    (folder / "not-archives").mkdir()
    (folder / "README.txt").write_text("not an archive\n")
    with zipfile.ZipFile(folder / BIG_DIRECTORY, "w") as zf:  # its directory is > 64 KiB
        for i in range(1500):
            zf.writestr(f"extra/{'long-member-name-' * 3}{i:05d}.txt", f"member {i}\n")
    with serving(tmp_path / "www") as served:
        yield served
    assert not [r for r in served.log if r.status == 400], "a multi-range or malformed Range request"


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


@pytest.mark.slow
def test_cold_then_warm_daemon_mount_serves_every_member(site: Site, mount: MountFactory,
                                                          tmp_path: Path, engine: str) -> None:
    index_dir = tmp_path / "index"
    expected = zip_contents(zip_members(site.root / "bioscan"))
    archives = _archives(site)

    with mounted([site.url()], tmp_path / "cold", index_dir=index_dir, engine=engine):  # type: ignore[list-item]
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


def test_archive_changed_upstream_is_reindexed(site: Site, tmp_path: Path, engine: str) -> None:
    index_dir = tmp_path / "index"
    with mounted([site.url()], tmp_path / "first", index_dir=index_dir,  # type: ignore[list-item]
                 engine=engine) as live:
        assert not live.path("bioscan5m/added.txt").exists()
    changed = "BIOSCAN_5M_cropped_256_eval.zip"
    with zipfile.ZipFile(site.root / "bioscan" / changed, "a") as zf:
        zf.writestr("bioscan5m/added.txt", b"new upstream\n")
    mark = site.mark()
    with mounted([site.url()], tmp_path / "second", index_dir=index_dir,  # type: ignore[list-item]
                 engine=engine) as live:
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


# One engine: the mount is refused while opening the archives, before any engine serves.
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


# One engine: click refuses the argument before any engine serves.
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


def _gets(requests: List[Request]) -> List[Request]:
    return [r for r in requests if r.method == "GET" and not r.path.endswith("/")]


def _cached(cache_dir: Path) -> List[Path]:
    return sorted(cache_dir.glob("*.range"))


def test_disk_cache_serves_repeated_reads_and_is_shared(site: Site, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    members = zip_members(site.root / "bioscan")
    picked = _stored_members(site)[:30]
    expected = zip_contents({p: members[p] for p in picked})
    first = Collection(site.url(), index_dir=str(tmp_path / "index"), cache_dir=str(cache_dir))
    second = Collection(site.url(), index_dir=str(tmp_path / "index"), cache_dir=str(cache_dir))
    mark = site.mark()
    assert [first.read(p) for p in picked] == [expected[p] for p in picked]
    assert len(_gets(site.since(mark))) == len(picked)
    mark = site.mark()
    assert [first.read(p) for p in picked] == [expected[p] for p in picked], "second epoch"
    assert [second.read(p) for p in picked] == [expected[p] for p in picked], "another Collection"
    assert site.since(mark) == []
    assert not list(cache_dir.glob("*.tmp"))
    first.close()
    second.close()


def test_disk_cache_stays_under_its_bound(site: Site, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    members = zip_members(site.root / "bioscan")
    picked = _stored_members(site)[:40]
    bound = sum(members[p].info.file_size for p in picked) // 4
    with Collection(site.url(), index_dir=str(tmp_path / "index"), cache_dir=str(cache_dir),
                    cache_max=bound) as collection:
        for path in picked:
            assert collection.read(path) == members[path].read(), path
            assert 0 < sum(f.stat().st_size for f in _cached(cache_dir)) <= bound
        mark = site.mark()
        assert collection.read(picked[-1]) == members[picked[-1]].read()
        assert site.since(mark) == [], "the newest range is kept"
        assert collection.read(picked[0]) == members[picked[0]].read()
        assert len(_gets(site.since(mark))) == 1, "the oldest range was evicted"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_cache_file_is_refetched_never_served(site: Site, tmp_path: Path, damage: str) -> None:
    cache_dir = tmp_path / "cache"
    members = zip_members(site.root / "bioscan")
    path = _stored_members(site)[0]
    with Collection(site.url(), index_dir=str(tmp_path / "index"), cache_dir=str(cache_dir)) as collection:
        before = set(_cached(cache_dir))   # directories read while indexing are cached too
        assert collection.read(path) == members[path].read()
    [cached] = set(_cached(cache_dir)) - before
    data = cached.read_bytes()
    if damage == "flip":
        cached.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    else:
        cached.write_bytes(data[:len(data) // 2])
    with Collection(site.url(), index_dir=str(tmp_path / "index"), cache_dir=str(cache_dir)) as collection:
        mark = site.mark()
        assert collection.read(path) == members[path].read()
        assert len(_gets(site.since(mark))) == 1
        mark = site.mark()
        assert collection.read(path) == members[path].read()
    assert site.since(mark) == [], "the refetched range replaced the damaged file"
    assert set(_cached(cache_dir)) - before == {cached} and cached.read_bytes() == data


def test_mount_cache_dir_option(site: Site, mount: MountFactory, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    members = zip_members(site.root / "bioscan")
    picked = _stored_members(site)[:10]
    live = mount(site.url(), args=["--cache-dir", str(cache_dir), "--cache-max", "1M"])
    before = set(_cached(cache_dir))
    for path in picked:
        assert live.path(path).read_bytes() == members[path].read()
    assert len(set(_cached(cache_dir)) - before) == len(picked)
    assert sum(f.stat().st_size for f in _cached(cache_dir)) <= 1 << 20
