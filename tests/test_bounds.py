"""The member reader, bounded and strict (issue 16, issue 21 rows 3, 4, 5, 14 and minor cases).

Every case is one archive: written by the real tools (Info-ZIP, 7-Zip, pyzipper) for
encrypted members, or byte by byte with ``craft`` for the lies no tool writes. Mounts run
on both engines; expected bytes come from the files the archives were made of, checked
against an independent reader (pyzipper, zipfile, unzip). Where a header could once size
an allocation, the peak memory of the serving process (VmHWM) or of the command
(ru_maxrss) is held under RSS_LIMIT; each bound fails on the code before this change.
"""
from __future__ import annotations

import bz2
import errno
import io
import os
import random
import re
import resource
import shutil
import stat
import struct
import subprocess
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import pytest
from conftest import (
    PYTHON,
    Mount,
    MountFactory,
    assert_one_error_line,
    data_offset,
    errno_of,
    flip_byte,
    read_direct,
    rss,
    run_cli,
    write_at,
)
from craft import (
    SYMLINK_ATTR,
    Entry,
    Unseekable,
    crc32_of_zeros,
    deflate64_zeros,
    deflate_zeros,
    deflated,
    raw_deflate,
    symlink,
    write_zip,
)

from bioscanfs import Collection
from bioscanfs.errors import MemberError

try:  # in the test extra; without it only the encryption test is skipped
    import pyzipper
except ImportError:
    pyzipper = None

RSS_LIMIT = 300 << 20
PASSWORD = "Insecta-5M"
DEFLATE64, BZIP2, LZMA = 9, 12, 14
_LOCAL_LENGTHS = struct.Struct("<26xHH")  # APPNOTE 4.3.7: ... file name length, extra field length


def read_errno(live: Mount, member: str) -> int:
    """The errno of reading a whole member through the mount (0 when it reads)."""
    return errno_of(lambda: live.path(member).read_bytes())


def assert_logged(live: Mount, member: str, archive: Path, count: int = 0) -> None:
    """The log names ``member`` only on lines that also name its archive: at least one
    line, or exactly ``count`` when given."""
    lines = [line for line in live.log_text().splitlines() if member in line]
    assert lines and all(str(archive) in line for line in lines), live.log_text()
    assert not count or len(lines) == count, lines


def cli_peak(*args: object) -> Tuple[subprocess.CompletedProcess, int]:
    """Run ``bioscanfs ARGS`` from a fresh Python that reports its children's peak RSS
    (ru_maxrss), so that earlier children of the test process do not count."""
    code = ("import resource, subprocess, sys; "
            "done = subprocess.run(sys.argv[1:], capture_output=True); "
            "sys.stdout.buffer.write(done.stdout); sys.stderr.buffer.write(done.stderr); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(done.returncode)")
    done = subprocess.run([PYTHON, "-c", code, PYTHON, "-m", "bioscanfs", *map(str, args)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    stderr, _, peak = done.stderr.rstrip("\n").rpartition("\n")
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout, stderr + "\n"), int(peak) * 1024


# == Encrypted members from every common writer (issue 16) ======================================
#: variant -> (writer, its switches). Info-ZIP always writes data descriptors when it
#: encrypts (flag bits 0x9) and ZIP64 with -fz; pyzipper writes them to unseekable output.
WRITERS: Dict[str, Tuple[str, List[str]]] = {
    "infozip-deflate": ("zip", []),
    "infozip-stored": ("zip", ["-0"]),
    "infozip-deflate-zip64": ("zip", ["-fz"]),
    "infozip-stored-zip64": ("zip", ["-0", "-fz"]),
    "7z-zipcrypto-deflate": ("7z", ["-mem=ZipCrypto", "-mx=5"]),
    "7z-zipcrypto-stored": ("7z", ["-mem=ZipCrypto", "-mx=0"]),
    "7z-aes256-deflate": ("7z", ["-mem=AES256", "-mx=5"]),
    "7z-aes256-stored": ("7z", ["-mem=AES256", "-mx=0"]),
    **{f"pyzipper-{kind}{'-descriptor' * descriptor}{'-zip64' * zip64}": ("pyzipper", [kind, descriptor, zip64])
       for kind in ("deflate", "stored") for descriptor in (False, True) for zip64 in (False, True)},
}


class Encrypted(NamedTuple):
    folder: Path
    files: Dict[str, bytes]        #: member path -> its plain bytes
    archives: Dict[str, Path]      #: member path -> its archive
    wrong: str                     #: a password that every member's check rejects


def _plain_files(variant: str) -> Dict[str, bytes]:
    rng = random.Random(variant)
    words = [b"ant ", b"bee ", b"moth ", b"wasp\n"]
    return {f"{variant}/empty.txt": b"", f"{variant}/one.txt": b"x",
            f"{variant}/text.txt": b"".join(rng.choice(words) for _ in range(30_000)),
            f"{variant}/random.bin": rng.randbytes(30_000)}




def _pyzipper_zip(out: Path, files: Dict[str, bytes], kind: str, descriptor: bool, zip64: bool) -> None:
    target = Unseekable() if descriptor else open(out, "wb")
    compression = pyzipper.ZIP_DEFLATED if kind == "deflate" else pyzipper.ZIP_STORED
    with pyzipper.AESZipFile(target, "w", compression=compression, encryption=pyzipper.WZ_AES) as zf:
        zf.setpassword(PASSWORD.encode())
        for path, data in files.items():
            with zf.open(path, "w", force_zip64=zip64) as member:
                member.write(data)
    if descriptor:
        out.write_bytes(target.data)
    else:
        target.close()


def _write_encrypted(out: Path, work: Path, variant: str, files: Dict[str, bytes]) -> None:
    writer, switches = WRITERS[variant]
    for path, data in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_bytes(data)
    if writer == "zip":
        command = ["zip", "-q", "-r", "-P", PASSWORD, *switches, str(out), variant]
    elif writer == "7z":
        command = ["7z", "a", "-tzip", "-bd", "-y", f"-p{PASSWORD}", *switches, str(out), variant]
    else:
        return _pyzipper_zip(out, files, *switches)
    subprocess.run(command, cwd=work, check=True, capture_output=True, timeout=120)


def _local_extra_ids(archive: Path, info: zipfile.ZipInfo) -> List[int]:
    """The header ids of the blocks in a member's local extra field (4.3.7, 4.5.1)."""
    with open(archive, "rb") as f:
        f.seek(info.header_offset)
        name_length, extra_length = _LOCAL_LENGTHS.unpack(f.read(_LOCAL_LENGTHS.size))
        f.seek(name_length, io.SEEK_CUR)
        extra = f.read(extra_length)
    ids, at = [], 0
    while at + 4 <= len(extra):
        block_id, block_length = struct.unpack_from("<HH", extra, at)
        ids.append(block_id)
        at += 4 + block_length
    return ids


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> Encrypted:
    """One folder with an archive per variant, each holding its own folder of four files.

    The variants are what they claim (flag bits, a ZIP64 field in the local header), and
    pyzipper, an independent reader, reads every member back with the password.
    """
    if pyzipper is None:
        pytest.skip("pyzipper is not installed")
    for tool in ("zip", "7z"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    work = tmp_path_factory.mktemp("encrypted")
    folder = work / "zips"
    folder.mkdir()
    files: Dict[str, bytes] = {}
    archives: Dict[str, Path] = {}
    for variant in WRITERS:
        plain = _plain_files(variant)
        archive = folder / f"{variant}.zip"
        _write_encrypted(archive, work / "src", variant, plain)
        files.update(plain)
        archives.update(dict.fromkeys(plain, archive))
        with pyzipper.AESZipFile(archive) as zf:
            info = zf.getinfo(f"{variant}/text.txt")
            assert info.flag_bits & 0x1, variant
            assert bool(info.flag_bits & 0x8) == ("infozip" in variant or "descriptor" in variant), variant
            assert (0x0001 in _local_extra_ids(archive, info)) == ("zip64" in variant), variant
            assert {path: zf.read(path, pwd=PASSWORD.encode()) for path in plain} == plain, variant
    return Encrypted(folder, files, archives, _rejected_password(files, archives))


def _rejected_password(files: Dict[str, bytes], archives: Dict[str, Path]) -> str:
    """A wrong password that the check of every encrypted member (ZipCrypto's one byte,
    AES's two) rejects, so that each read must give EACCES rather than a decoding error."""
    for candidate in (f"wrong-{n}" for n in range(100)):
        if all(_rejects(archives[path], path, candidate) for path, data in files.items() if data):
            return candidate
    raise AssertionError("no candidate is rejected by every member")


def _rejects(archive: Path, path: str, password: str) -> bool:
    with pyzipper.AESZipFile(archive) as zf:
        try:
            zf.read(path, pwd=password.encode())
        except RuntimeError:  # "Bad password"
            return True
        except (pyzipper.BadZipFile, zlib.error):  # the check passed; decoding or the CRC failed
            return False
    raise AssertionError(f"{path} decrypted with {password}")


def test_encrypted_members_of_every_writer(encrypted: Encrypted, mount: MountFactory, tmp_path: Path) -> None:
    """With the password every member of every variant reads as it was written; with a
    wrong one each encrypted member gets EACCES and a log line naming archive and member."""
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text(PASSWORD + "\n")
    wrong.write_text(encrypted.wrong + "\n")
    live = mount(encrypted.folder, args=["--password-file", right])
    for path, data in encrypted.files.items():
        assert live.path(path).read_bytes() == data, path
    live = mount(encrypted.folder, args=["--password-file", wrong])
    live.expect_log(r"cannot read")
    for path, data in encrypted.files.items():
        if data:  # the kernel asks nothing of a 0-byte file
            assert read_errno(live, path) == errno.EACCES, path
            assert_logged(live, path, encrypted.archives[path])


# == One size contract for stored members (issue 16) ===========================================
SIZES_GOOD = b"a neighbour that reads\n" * 40
SIZES_DATA = bytes(range(256)) * 4


@pytest.fixture
def sizes_zip(tmp_path: Path) -> Path:
    """Stored members whose compressed size says more (``longer``) or less (``shorter``)
    than their size; each CRC is that of the bytes the compressed size covers, so only
    the size contract can catch them."""
    padded = SIZES_DATA + bytes(512)
    (tmp_path / "zips").mkdir()
    return write_zip(tmp_path / "zips" / "sizes.zip", [
        Entry(b"sizes/good.txt", SIZES_GOOD),
        Entry(b"sizes/longer.bin", SIZES_DATA, size=len(SIZES_DATA), gap=512, crc=zlib.crc32(padded)),
        Entry(b"sizes/shorter.bin", SIZES_DATA, size=len(padded), crc=zlib.crc32(SIZES_DATA)),
    ])


SIZE_LIARS = ["sizes/longer.bin", "sizes/shorter.bin"]


def test_stored_sizes_must_agree_through_the_mount(sizes_zip: Path, mount: MountFactory) -> None:
    """A stored member whose two sizes differ: EIO for whole and partial reads, one log
    line naming archive and member per read; its neighbour reads."""
    live = mount(sizes_zip.parent)
    for member in SIZE_LIARS:
        live.expect_log(re.escape(member))
        assert read_errno(live, member) == errno.EIO, member
        fd = os.open(live.path(member), os.O_RDONLY | os.O_DIRECT)
        try:
            assert errno_of(lambda: os.pread(fd, 100, 10)) == errno.EIO, member
        finally:
            os.close(fd)
        assert_logged(live, member, sizes_zip)
    assert live.path("sizes/good.txt").read_bytes() == SIZES_GOOD


def test_stored_sizes_must_agree_in_collection_cat_and_verify(sizes_zip: Path, tmp_path: Path) -> None:
    """The same contract without a mount: Collection.read raises MemberError, `cat` fails
    in one line, `verify` lists both members (as `unzip -t` finds them bad)."""
    index = tmp_path / "index"
    with Collection(str(sizes_zip.parent), index_dir=str(index)) as collection:
        assert collection.read("sizes/good.txt") == SIZES_GOOD
        for member in SIZE_LIARS:
            with pytest.raises(MemberError, match=re.escape(f"{sizes_zip}: {member}: ")):
                collection.read(member)
    for member in SIZE_LIARS:
        assert_one_error_line(run_cli("cat", sizes_zip.parent, member, "--index-dir", index), member)
    done = run_cli("verify", sizes_zip.parent, "--index-dir", index)
    bad = sorted(line for line in done.stdout.splitlines() if line.startswith("BAD "))
    assert done.returncode == 1 and len(bad) == 2, done.stdout + done.stderr
    assert all(f"{sizes_zip}: {member}: " in line for line, member in zip(bad, SIZE_LIARS)), bad
    assert subprocess.run(["unzip", "-tq", str(sizes_zip)], capture_output=True).returncode != 0


# == Symlink targets are bounded (issue 21 row 3) ==============================================
HUGE_LINK = 512 << 20
LONG_TARGET = b"a/" * 2500


def test_symlink_targets_are_bounded(mount: MountFactory, tmp_path: Path) -> None:
    """A link member declared longer than readlink can return (4,095 bytes) is never
    decoded as a link: a 512 MiB deflated target and a 5,000-byte stored one are regular
    files, with one warning each naming archive and member; `ls -l` of them keeps the
    server under RSS_LIMIT; a short link next to them is still a link."""
    (tmp_path / "zips").mkdir()
    archive = write_zip(tmp_path / "zips" / "links.zip", [
        Entry(b"links/target.txt", b"the target\n"),
        symlink(b"links/good", b"target.txt"),
        symlink(b"links/long", LONG_TARGET),
        Entry(b"links/huge", deflate_zeros(HUGE_LINK), method=zipfile.ZIP_DEFLATED, size=HUGE_LINK,
              crc=crc32_of_zeros(HUGE_LINK), external_attr=SYMLINK_ATTR),
    ])
    live = mount(archive.parent)
    live.expect_log(r"links/(long|huge): symlink target of \d+ bytes")
    subprocess.run(["ls", "-l", str(live.path("links"))], check=True, capture_output=True, timeout=60)
    for name, size in (("links/huge", HUGE_LINK), ("links/long", len(LONG_TARGET))):
        st = os.lstat(live.path(name))
        assert stat.S_ISREG(st.st_mode) and st.st_size == size, (name, st)
        assert errno_of(lambda: os.readlink(live.path(name))) == errno.EINVAL
        assert_logged(live, name, archive, count=1)
    assert rss(live.pid, "VmHWM") <= RSS_LIMIT, rss(live.pid, "VmHWM")
    assert live.path("links/long").read_bytes() == LONG_TARGET
    assert os.readlink(live.path("links/good")) == "target.txt"
    assert live.path("links/good").read_bytes() == b"the target\n"


# == Every decoder stops at the declared size; input left over is an error (rows 4, 5) ========
TEXT = b"processid,split,chunk\nBIOUG1234-A01,train,1\n" * 400


def _lzma(data: bytes) -> bytes:
    """A zip LZMA member's bytes (APPNOTE 5.8: version, properties, then the stream)."""
    compressor = zipfile.LZMACompressor()
    return compressor.compress(data) + compressor.flush()


def _bombs() -> List[Entry]:
    """Bombs (a declared size far below what the stream gives, with the CRC of that many
    zeros) and streams followed by bytes inside their compressed size, by method."""
    d64_gib = deflate64_zeros(1 << 30)  # ~59 KB: inside compressed_bound(100), so it is decoded
    bomb = {"size": 100, "crc": crc32_of_zeros(100)}
    text = {"size": len(TEXT), "crc": zlib.crc32(TEXT)}
    return [
        Entry(b"d64/bomb-100.bin", d64_gib, method=DEFLATE64, **bomb),
        Entry(b"d64/bomb-1mib.bin", d64_gib, method=DEFLATE64, size=1 << 20, crc=crc32_of_zeros(1 << 20)),
        Entry(b"d64/trailing.bin", deflate64_zeros(300_000) + b"tail", method=DEFLATE64, size=300_000,
              crc=crc32_of_zeros(300_000)),
        Entry(b"deflate/trailing.bin", raw_deflate(TEXT) + b"tail" * 50, method=zipfile.ZIP_DEFLATED, **text),
        Entry(b"bzip2/bomb.bin", bz2.compress(bytes(16 << 20)), method=BZIP2, **bomb),
        Entry(b"bzip2/trailing.bin", bz2.compress(TEXT) + b"tail", method=BZIP2, **text),
        Entry(b"lzma/bomb.bin", _lzma(bytes(16 << 20)), method=LZMA, flags=0x2, **bomb),  # 0x2: end marker
    ]


def _honest() -> Dict[bytes, Tuple[Entry, bytes]]:
    """One honest member of each of those methods, with its bytes."""
    text = {"size": len(TEXT), "crc": zlib.crc32(TEXT)}
    return {entry.name: (entry, plain) for entry, plain in [
        (Entry(b"d64/honest.bin", deflate64_zeros(300_000), method=DEFLATE64, size=300_000,
               crc=crc32_of_zeros(300_000)), bytes(300_000)),
        (deflated(b"deflate/honest.txt", TEXT), TEXT),
        (Entry(b"bzip2/honest.txt", bz2.compress(TEXT), method=BZIP2, **text), TEXT),
        (Entry(b"lzma/honest.txt", _lzma(TEXT), method=LZMA, flags=0x2, **text), TEXT),
    ]}


def test_decoders_stop_at_the_declared_size(mount: MountFactory, tmp_path: Path) -> None:
    """Deflate64 (inflate64 has no output limit), deflate, bzip2 and lzma (libarchive):
    a bomb, or a stream followed by bytes inside its compressed size, gets EIO and a log
    line naming archive and member, twice; the server stays under RSS_LIMIT and honest
    members of each method read as they were written."""
    (tmp_path / "zips").mkdir()
    bad, honest = _bombs(), _honest()
    archive = write_zip(tmp_path / "zips" / "bombs.zip", bad + [entry for entry, _ in honest.values()])
    live = mount(archive.parent)
    for entry in bad:
        member = entry.name.decode()
        live.expect_log(re.escape(member))
        for _ in range(2):
            assert read_errno(live, member) == errno.EIO, member
        assert_logged(live, member, archive)
    assert rss(live.pid, "VmHWM") <= RSS_LIMIT, rss(live.pid, "VmHWM")
    for name, (_, plain) in honest.items():
        assert live.path(name.decode()).read_bytes() == plain, name


def test_a_lying_compressed_size_costs_nothing(mount: MountFactory, tmp_path: Path) -> None:
    """A 5-byte deflated member whose compressed size says 1 GiB (a hole: the archive
    takes a few KB on disk): EIO through the mount and one error line from `cat`, with
    the server and the command under RSS_LIMIT; its neighbour reads."""
    (tmp_path / "zips").mkdir()
    archive = write_zip(tmp_path / "zips" / "sparse.zip", [
        Entry(b"sparse/five.bin", raw_deflate(b"hello"), method=zipfile.ZIP_DEFLATED, size=5,
              crc=zlib.crc32(b"hello"), gap=1 << 30),
        Entry(b"sparse/ok.txt", b"fine\n"),
    ])
    live = mount(archive.parent)
    live.expect_log(re.escape("sparse/five.bin"))
    assert read_errno(live, "sparse/five.bin") == errno.EIO
    assert_logged(live, "sparse/five.bin", archive)
    assert rss(live.pid, "VmHWM") <= RSS_LIMIT, rss(live.pid, "VmHWM")
    assert live.path("sparse/ok.txt").read_bytes() == b"fine\n"
    done, peak = cli_peak("cat", archive.parent, "sparse/five.bin", "--index-dir", tmp_path / "index")
    assert_one_error_line(done, "sparse/five.bin")
    assert peak <= RSS_LIMIT, peak


# == A failed member is remembered until remount (row 4) =======================================
def test_a_failed_member_is_remembered_until_remount(mount: MountFactory, tmp_path: Path) -> None:
    """A deflated member found corrupt keeps failing, without being decoded again, even
    once its bytes are mended on disk under the live mount; a new mount reads it."""
    (tmp_path / "zips").mkdir()
    archive = write_zip(tmp_path / "zips" / "mended.zip", [deflated(b"mended/member.txt", TEXT)])
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("mended/member.txt")
    middle = data_offset(archive, info) + info.compress_size // 2
    original = archive.read_bytes()[middle:middle + 1]
    flip_byte(archive, middle)
    live = mount(archive.parent)
    live.expect_log(re.escape("mended/member.txt"))
    assert read_errno(live, "mended/member.txt") == errno.EIO
    write_at(archive, middle, original)
    with zipfile.ZipFile(archive) as zf:
        assert zf.read("mended/member.txt") == TEXT
    assert read_errno(live, "mended/member.txt") == errno.EIO
    assert_logged(live, "mended/member.txt", archive)
    assert mount(archive.parent).path("mended/member.txt").read_bytes() == TEXT


# == Large members through the API (row 14) ====================================================
#: Just over what Linux returns from one pread(2) (0x7ffff000 bytes).
PREAD_MAX = 0x7FFFF000


@pytest.mark.slow
def test_collection_reads_a_stored_member_over_one_pread(tmp_path: Path) -> None:
    """Collection.read of a valid 2 GiB stored member of zeros (a hole on disk) returns
    every byte: one pread(2) returns at most 0x7ffff000, so the source must loop. Runs in
    its own process: the result alone is 2 GiB."""
    size = PREAD_MAX + (1 << 20)
    (tmp_path / "zips").mkdir()
    write_zip(tmp_path / "zips" / "big.zip", [Entry(b"big/zeros.bin", b"", size=size, gap=size,
                                                    crc=crc32_of_zeros(size))])
    code = ("import sys, bioscanfs; "
            "data = bioscanfs.Collection(sys.argv[1], index_dir=sys.argv[2]).read('big/zeros.bin'); "
            "print(len(data), data == bytes(len(data)))")  # all zeros: 4x faster than count(0)
    done = subprocess.run([PYTHON, "-c", code, str(tmp_path / "zips"), str(tmp_path / "index")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == [str(size), "True"], done.stdout + done.stderr


# == Minor cases ==================================================================================
def test_verify_decodes_empty_members(tmp_path: Path) -> None:
    """0-byte members are decoded too: compressed garbage, or stored data, behind a size of
    0 is bad, as `unzip -t` says; an honest empty member is not."""
    (tmp_path / "zips").mkdir()
    archive = write_zip(tmp_path / "zips" / "empty.zip", [
        Entry(b"empty/garbage.bin", b"garbage!", method=zipfile.ZIP_DEFLATED, size=0, crc=0),
        Entry(b"empty/stored.bin", b"abc", size=0, crc=0),
        Entry(b"empty/honest.bin", b""),
        deflated(b"empty/honest-deflated.bin", b""),
    ])
    tested = subprocess.run(["unzip", "-t", str(archive)], capture_output=True, text=True)
    assert tested.returncode != 0 and "empty/garbage.bin" in tested.stdout + tested.stderr
    done = run_cli("verify", archive.parent, "--index-dir", tmp_path / "index")
    bad = sorted(line for line in done.stdout.splitlines() if line.startswith("BAD "))
    assert done.returncode == 1 and len(bad) == 2, done.stdout + done.stderr
    assert "empty/garbage.bin" in bad[0] and "empty/stored.bin" in bad[1], bad


def test_out_of_memory_is_eio(mount: MountFactory, tmp_path: Path) -> None:
    """A read that runs out of memory (the server's writable memory capped 16 MiB above
    what it holds) gets EIO and a log line on both engines, not mfusepy's EINVAL; with
    the cap lifted the member reads. The capped read is one request (O_DIRECT) served
    by a worker thread that exists already: a new one would need memory of its own."""
    size = 31 << 20  # decoded whole (under 32 MiB), so it needs far more than the margin
    (tmp_path / "zips").mkdir()
    archive = write_zip(tmp_path / "zips" / "memory.zip", [
        Entry(b"memory/zeros.bin", deflate_zeros(size), method=zipfile.ZIP_DEFLATED, size=size,
              crc=crc32_of_zeros(size)),
        Entry(b"memory/ok.txt", b"fine\n"),
    ])
    live = mount(archive.parent)
    live.expect_log(r"cannot read memory/zeros\.bin in .*: out of memory")
    fd = os.open(live.path("memory/zeros.bin"), os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(4):  # workers enough to take the next request without starting one
            assert read_direct(live.path("memory/ok.txt")) == b"fine\n"
        limits = resource.prlimit(live.pid, resource.RLIMIT_DATA)
        resource.prlimit(live.pid, resource.RLIMIT_DATA, (rss(live.pid, "VmData") + (16 << 20), limits[1]))
        try:
            assert errno_of(lambda: os.pread(fd, 4096, 0)) == errno.EIO
        finally:
            resource.prlimit(live.pid, resource.RLIMIT_DATA, limits)
    finally:
        os.close(fd)
    assert_logged(live, "memory/zeros.bin", archive)
    assert live.path("memory/zeros.bin").read_bytes() == bytes(size)
