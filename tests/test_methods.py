"""Compression methods beyond stored and deflate, and encrypted members (issue 8).

Members come from the scripts/ generator (JPEGs of a few KB, the metadata JSON-LD and a
~2 MB CSV); they are packed by 7-Zip (Deflate64, BZip2, LZMA, PPMd, ZipCrypto, AES-256)
and by CPython's zipfile (bzip2, lzma). xz and zstd members, which neither writes, are
built by compressing with the standard library (or a zstd compressor) into a stored
zipfile member and patching the method, size and CRC into both headers. Every byte read
through the mount is compared with the source bytes; zipfile cannot decode most of
these methods, so the source is the reference. Damaged members of every method, an
unsupported method and bombs in the non-deflate decoders must give a per-member error
and leave the daemon (and its memory) intact.
"""
from __future__ import annotations

import bz2
import collections
import errno
import functools
import importlib
import json
import lzma
import os
import pty
import re
import select
import shutil
import subprocess
import time
import zipfile
import zlib
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from conftest import (
    PYTHON,
    MountFactory,
    assert_preads,
    data_offset,
    edit_headers,
    expected_tree,
    flip_byte,
    force_unmount,
    is_mounted,
    read_windows,
    rss,
    run_cli,
    walk_mount,
    zip_members,
)

needs_7z = pytest.mark.skipif(shutil.which("7z") is None, reason="7z (p7zip-full) is not installed")

#: APPNOTE 4.4.5 names of the methods zipfile.compressor_names lacks (and 0, which it calls 'store').
_APPNOTE_NAMES = {0: "stored", 93: "zstd", 95: "xz"}
WAVPACK = 97
PASSWORD = "Insecta-5M"
BIG = 2 << 20


def method_name(method: int) -> str:
    return _APPNOTE_NAMES.get(method) or zipfile.compressor_names[method]


# -- source members ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, make_fake: ModuleType) -> Dict[str, bytes]:
    """Path -> bytes: the eval split's JPEGs, the JSON-LD and a ~2 MB metadata CSV, as the
    generator wrote them (read back with zipfile)."""
    folder = tmp_path_factory.mktemp("method_sources")
    make_fake.make_set(folder, images=16, deflate_fraction=0.5, seed=8, csv_bytes=BIG, imgtypes=("cropped_256",))
    members = zip_members(folder)
    keep = {p: m for p, m in members.items()
            if "/cropped_256/" not in p or m.archive.name == "BIOSCAN_5M_cropped_256_eval.zip"}
    out = {path: member.read() for path, member in keep.items()}
    assert max(map(len, out.values())) >= BIG and min(map(len, out.values())) < 16 << 10
    return out


def write_tree(folder: Path, files: Dict[str, bytes]) -> Path:
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def seven_zip(out: Path, files: Dict[str, bytes], work: Path, *switches: str) -> Path:
    """out, written by ``7z a -tzip SWITCHES`` from the files laid out on disk."""
    src = write_tree(work / f"src-{out.stem}", files)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["7z", "a", "-tzip", "-bd", "-y", *switches, str(out), "bioscan5m"], cwd=src, check=True,
                   capture_output=True, timeout=120)
    return out


def patched_zip(out: Path, files: Dict[str, bytes], method: int, compress: Callable[[bytes], bytes]) -> Path:
    """A zip whose members hold ``compress(data)``, written stored by zipfile, then
    relabelled as ``method`` with the true size and CRC in both headers."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as zf:
        for path, data in files.items():
            zf.writestr(zipfile.ZipInfo(path, (2024, 5, 6, 7, 8, 10)), compress(data))
    for path, data in files.items():
        edit_headers(out, path, method=method, size=len(data), crc32=zlib.crc32(data))
    return out


def _zstd_compressor() -> Tuple[Optional[Callable[[bytes], bytes]], str]:
    """A zstd compressor: an importable module, else the zstd command; (None, why) if neither."""
    for module, call in (("compression.zstd", "compress"), ("zstandard", "compress"), ("pyzstd", "compress")):
        try:
            return getattr(importlib.import_module(module), call), module
        except ImportError:
            continue
    if shutil.which("zstd"):
        return (lambda data: subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                                            check=True).stdout), "zstd command"
    return None, "no zstd compressor (compression.zstd, zstandard, pyzstd or the zstd command)"


# -- archives by method ----------------------------------------------------------------------------
def _7z(method: str) -> Callable[[Path, Dict[str, bytes], Path], Path]:
    def build(out: Path, files: Dict[str, bytes], work: Path) -> Path:
        if shutil.which("7z") is None:
            pytest.skip("7z (p7zip-full) is not installed")
        return seven_zip(out, files, work, f"-mm={method}")
    return build


def _zipfile(method: int) -> Callable[[Path, Dict[str, bytes], Path], Path]:
    def build(out: Path, files: Dict[str, bytes], work: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", compression=method) as zf:
            for path, data in files.items():
                zf.writestr(path, data)
        return out
    return build


def _xz(out: Path, files: Dict[str, bytes], work: Path) -> Path:
    return patched_zip(out, files, 95, lambda data: lzma.compress(data, format=lzma.FORMAT_XZ))


def _zstd(out: Path, files: Dict[str, bytes], work: Path) -> Path:
    compress, how = _zstd_compressor()
    if compress is None:
        pytest.skip(how)
    return patched_zip(out, files, 93, compress)


#: case -> (archive builder, the method number its compressible members must carry).
METHODS: Dict[str, Tuple[Callable[[Path, Dict[str, bytes], Path], Path], int]] = {
    "7z-deflate64": (_7z("Deflate64"), 9),
    "7z-bzip2": (_7z("BZip2"), 12),
    "7z-lzma": (_7z("LZMA"), 14),
    "7z-ppmd": (_7z("PPMd"), 98),
    "zipfile-bzip2": (_zipfile(zipfile.ZIP_BZIP2), 12),
    "zipfile-lzma": (_zipfile(zipfile.ZIP_LZMA), 14),
    "patched-xz": (_xz, 95),
    "patched-zstd": (_zstd, 93),
}
ARCHIVE = "BIOSCAN_5M_cropped_256_eval.zip"


@pytest.fixture(scope="module")
def method_archive(tmp_path_factory: pytest.TempPathFactory,
                   sources: Dict[str, bytes]) -> Callable[[str], Path]:
    """case -> the archive of the sources that METHODS[case] builds, built on first use and
    shared by the module's tests and both engines (7-Zip and the compressors are the slow
    part). Tests only read it: one that edits bytes edits a copy."""
    work = tmp_path_factory.mktemp("methods")

    @functools.lru_cache(maxsize=None)
    def build(case: str) -> Path:
        return METHODS[case][0](work / case / "zips" / ARCHIVE, sources, work / case)
    return build


def _methods_of(archive: Path, big: str, method: int) -> Dict[int, int]:
    """Method -> member count, as zipfile reads the archive; checks that the archive holds
    what the case says (the large member in ``method``, the rest stored or ``method``)."""
    with zipfile.ZipFile(archive) as zf:
        infos = [info for info in zf.infolist() if not info.is_dir()]
    methods = collections.Counter(info.compress_type for info in infos)
    assert next(i for i in infos if i.filename == big).compress_type == method, methods
    assert set(methods) <= {0, method}, methods
    return methods


@pytest.mark.parametrize("case", sorted(METHODS))
def test_method_reads_back_the_source_bytes(case: str, sources: Dict[str, bytes], mount: MountFactory,
                                            method_archive: Callable[[str], Path]) -> None:
    """Whole reads and O_DIRECT preads equal the source; the tree is complete."""
    archive = method_archive(case)
    big = max(sources, key=lambda p: len(sources[p]))
    _methods_of(archive, big, METHODS[case][1])

    live = mount(archive.parent)
    assert walk_mount(live.point) == expected_tree(sources)
    for path, data in sources.items():
        assert live.path(path).read_bytes() == data, path
    assert_preads(live.path(big), sources[big], read_windows(len(sources[big])), os.O_DIRECT)


# No engine: `info` reads the index and serves nothing (it ran once per engine inside the
# test above: the same command twice).
@pytest.mark.no_c
@pytest.mark.parametrize("case", sorted(METHODS))
def test_info_names_the_method(case: str, sources: Dict[str, bytes], method_archive: Callable[[str], Path],
                               tmp_path: Path) -> None:
    """`info --json` counts the members of each method as zipfile does."""
    archive = method_archive(case)
    methods = _methods_of(archive, max(sources, key=lambda p: len(sources[p])), METHODS[case][1])
    done = run_cli("info", "--json", archive.parent, "--index-dir", tmp_path / "info-index")
    assert done.returncode == 0, done.stderr
    (entry,) = [a for p in json.loads(done.stdout)["packages"].values() for a in p["archives"]]
    assert entry["methods"] == {method_name(m): n for m, n in methods.items()}, entry


def test_unsupported_method_is_refused_per_member(sources: Dict[str, bytes], mount: MountFactory,
                                                  tmp_path: Path) -> None:
    """A member relabelled as WavPack (97): its reads get ENOTSUP or EIO with a log line
    naming member and method; listing and every other member still work."""
    archive = _zipfile(zipfile.ZIP_DEFLATED)(tmp_path / "zips" / ARCHIVE, sources, tmp_path)
    victim = sorted(p for p in sources if p.endswith(".jpg"))[0]
    edit_headers(archive, victim, method=WAVPACK)
    with zipfile.ZipFile(archive) as zf, pytest.raises(NotImplementedError):
        zf.read(victim)  # zipfile agrees it cannot be decoded

    live = mount(archive.parent)
    live.expect_log(re.escape(victim))
    assert walk_mount(live.point) == expected_tree(sources)
    assert os.stat(live.path(victim)).st_size == len(sources[victim])
    for _ in range(2):
        with pytest.raises(OSError) as err:
            live.path(victim).read_bytes()
        assert err.value.errno in (errno.ENOTSUP, errno.EIO), err.value
    lines = [line for line in live.log_text().splitlines() if victim in line]
    assert any(re.search(rf"\b{WAVPACK}\b|wav-?pack", line, re.IGNORECASE) for line in lines), live.log_text()
    for path, data in sources.items():
        if path != victim:
            assert live.path(path).read_bytes() == data, path


# -- encryption ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory, sources: Dict[str, bytes]) -> Dict[str, Path]:
    """Folders holding one 7z-encrypted archive each: ZipCrypto and AES-256 (both deflate)."""
    if shutil.which("7z") is None:
        pytest.skip("7z (p7zip-full) is not installed")
    work = tmp_path_factory.mktemp("encrypted")
    out = {}
    for scheme in ("ZipCrypto", "AES256"):
        archive = seven_zip(work / scheme / ARCHIVE, sources, work, f"-p{PASSWORD}", f"-mem={scheme}")
        with zipfile.ZipFile(archive) as zf:
            assert all(info.flag_bits & 0x1 for info in zf.infolist() if not info.is_dir())
        out[scheme] = archive.parent
    return out


def _wrong_password_detected(archive: Path, path: str, password: bytes) -> bool:
    """Whether ZipCrypto's one check byte rejects ``password`` (1 in 256 wrong ones pass it;
    then only decoding can fail, with EIO)."""
    with zipfile.ZipFile(archive) as zf:
        try:
            zf.read(path, pwd=password)
        except RuntimeError:
            return True
        except (zipfile.BadZipFile, zlib.error):
            return False
    raise AssertionError(f"{path} decrypted with a wrong password")


@needs_7z
@pytest.mark.parametrize("scheme", ["ZipCrypto", "AES256"])
@pytest.mark.parametrize("password", ["none", "right", "wrong"])
def test_encrypted_members(scheme: str, password: str, encrypted: Dict[str, Path], sources: Dict[str, bytes],
                           mount: MountFactory, tmp_path: Path) -> None:
    """Listing always works; without the password or with a wrong one reads get EACCES and
    the log says why; with --password-file every byte is right."""
    folder = encrypted[scheme]
    args: List[str] = []
    if password != "none":
        secret = PASSWORD if password == "right" else PASSWORD[::-1]
        (tmp_path / "password").write_text(secret + "\n")
        args = ["--password-file", str(tmp_path / "password")]
    live = mount(folder, args=args)
    assert walk_mount(live.point) == expected_tree(sources)
    for path, data in sources.items():
        assert os.stat(live.path(path)).st_size == len(data), path
    if password == "right":
        for path, data in sources.items():
            assert live.path(path).read_bytes() == data, path
        return
    live.expect_log(r"cannot read")
    for path in sources:
        with pytest.raises(OSError) as err:
            live.path(path).read_bytes()
        allowed = {errno.EACCES}
        if password == "wrong" and scheme == "ZipCrypto" and not _wrong_password_detected(
                folder / ARCHIVE, path, PASSWORD[::-1].encode()):
            allowed.add(errno.EIO)
        assert err.value.errno in allowed, (path, err.value)
        lines = [line for line in live.log_text().splitlines() if path in line]
        assert lines and str(folder / ARCHIVE) in lines[0], live.log_text()
        if err.value.errno == errno.EACCES:  # the log says why
            assert re.search(r"encrypted|password|passphrase|decrypt", lines[0], re.IGNORECASE), lines[0]


@pytest.mark.parametrize("case", sorted(METHODS))
def test_corrupt_member_of_each_method_gets_eio(case: str, sources: Dict[str, bytes], mount: MountFactory,
                                                method_archive: Callable[[str], Path], tmp_path: Path) -> None:
    """A flipped byte in the middle of the large member's compressed data: every read of
    it, whole or partial, gets EIO (it is decoded and CRC-checked before any byte is
    served), the log names it, and its neighbours still read."""
    (tmp_path / "zips").mkdir()
    archive = Path(shutil.copy(method_archive(case), tmp_path / "zips" / ARCHIVE))
    big = max(sources, key=lambda p: len(sources[p]))
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(big)
    flip_byte(archive, data_offset(archive, info) + info.compress_size // 2, 0x55)

    live = mount(archive.parent)
    live.expect_log(".")  # judged below, more strictly: every problem line names archive and member
    for read in (lambda: live.path(big).read_bytes(), lambda: os.pread(fd, 4096, 0)):
        fd = os.open(live.path(big), os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as err:
                read()
        finally:
            os.close(fd)
        assert err.value.errno == errno.EIO, err.value
    for path, data in sources.items():
        if path != big:
            assert live.path(path).read_bytes() == data, path
    problems = [line for line in live.log_text().splitlines() if re.search(r"\b(WARNING|ERROR)\b", line)]
    assert problems and all(str(archive) in line and big in line for line in problems), problems


#: Real output of the bombs below, and the daemon's peak RSS bound (it idles near 50 MB).
BOMB = 300 << 20
BOMB_PEAK_LIMIT = 200 << 20
BOMB_MEMBER = "bioscan5m/extra/bomb.bin"
BOMBS: Dict[str, Tuple[int, Callable[[bytes], bytes]]] = {
    "bzip2": (12, lambda data: bz2.compress(data, 1)),                             # the standard library's decoder
    "xz": (95, lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=0)),  # libarchive's
}


@pytest.fixture(scope="module")
def bomb_archive(tmp_path_factory: pytest.TempPathFactory, sources: Dict[str, bytes]) -> Callable[[str], Path]:
    """case -> an archive of the small sources (deflated) plus BOMB_MEMBER: BOMB zeros
    compressed by BOMBS[case], declared as 1000 bytes with the CRC of 1000 zeros. Built on
    first use and shared by both engines (compressing 300 MiB is the slow part); read only."""
    work = tmp_path_factory.mktemp("bombs")

    @functools.lru_cache(maxsize=None)
    def build(case: str) -> Path:
        method, compress = BOMBS[case]
        small = {p: d for p, d in sources.items() if len(d) < BIG}
        archive = _zipfile(zipfile.ZIP_DEFLATED)(work / case / ARCHIVE, small, work)
        with zipfile.ZipFile(archive, "a") as zf:
            zf.writestr(BOMB_MEMBER, compress(bytes(BOMB)))
        edit_headers(archive, BOMB_MEMBER, method=method, size=1000, crc32=zlib.crc32(bytes(1000)))
        return archive
    return build


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BOMBS))
def test_bomb_in_another_method_stops_at_the_declared_size(case: str, sources: Dict[str, bytes],
                                                           mount: MountFactory,
                                                           bomb_archive: Callable[[str], Path]) -> None:
    """300 MiB of zeros declared as 1000 bytes (with the CRC of 1000 zeros): EIO, the
    daemon's peak memory stays far below the real size, the neighbours still read."""
    small = {p: d for p, d in sources.items() if len(d) < BIG}
    live = mount(bomb_archive(case).parent)
    live.expect_log(re.escape(BOMB_MEMBER))
    assert os.stat(live.path(BOMB_MEMBER)).st_size == 1000
    for _ in range(2):
        with pytest.raises(OSError) as err:
            live.path(BOMB_MEMBER).read_bytes()
        assert err.value.errno == errno.EIO, err.value
    assert rss(live.pid, "VmHWM") < BOMB_PEAK_LIMIT, rss(live.pid, "VmHWM")
    assert any(BOMB_MEMBER in line and "ERROR" in line for line in live.log_text().splitlines()), live.log_text()
    for path, data in small.items():
        assert live.path(path).read_bytes() == data, path


@needs_7z
def test_password_prompt_in_foreground(encrypted: Dict[str, Path], sources: Dict[str, bytes], tmp_path: Path) -> None:
    """`mount -f` on a terminal asks for the password when members are encrypted; the
    answer decrypts them. Run under a real pseudo-terminal, as a user at a shell would."""
    point = tmp_path / "mnt"
    point.mkdir()
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the CLI on the pty
        os.execv(PYTHON, [PYTHON, "-m", "bioscanfs", "mount", str(encrypted["AES256"]), str(point), "-f",
                          "--index-dir", str(tmp_path / "index")])
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"password" not in seen:
            assert time.monotonic() < deadline, f"no password prompt; the terminal showed {seen!r}"
            ready, _, _ = select.select([terminal], [], [], 1)
            if ready:
                seen += os.read(terminal, 1024)
        os.write(terminal, PASSWORD.encode() + b"\n")
        while not is_mounted(point):
            assert time.monotonic() < deadline, "not mounted after the password was typed"
            time.sleep(0.05)
        path, data = max(sources.items(), key=lambda item: len(item[1]))
        assert (point / path).read_bytes() == data
    finally:
        run_cli("umount", point)
        force_unmount(point)
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0
