"""Untrusted member names: the clean_name table row by row, and hostile names on a real mount."""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest
from conftest import MountFactory, expected_tree, replace_name_bytes, walk_mount
from hypothesis import given, settings
from hypothesis import strategies as st

from bioscanfs.names import NAME_MAX, PATH_MAX, clean_name


class Row(NamedTuple):
    row: str                 #: the docstring table row this case checks
    raw: bytes
    utf8_flag: bool
    path: Optional[bytes]
    note: Optional[str]      #: a fragment of the note, or None for no note


ROWS = [
    Row("a/b.jpg", b"a/b.jpg", False, b"a/b.jpg", None),
    Row("/abs/x.jpg", b"/abs/x.jpg", False, b"abs/x.jpg", "absolute path made relative"),
    Row("./a//b/./c", b"./a//b/./c", False, b"a/b/c", None),
    Row("a\\b.jpg", b"a\\b.jpg", False, b"a/b.jpg", None),
    Row("dir/", b"dir/", False, b"dir", None),
    Row("../x, a/../../x", b"../x", False, None, "'..' component"),
    Row("../x, a/../../x", b"a/../../x", False, None, "'..' component"),
    Row("a\\x00b", b"a\x00b", False, None, "NUL"),
    Row("x * 300", b"x" * 300, False, None, str(NAME_MAX)),
    Row("a/ * 2100", b"a/" * 2100, False, None, str(PATH_MAX - 1)),
    Row("/, ., empty", b"/", False, None, "empty name"),
    Row("/, ., empty", b".", False, None, "empty name"),
    Row("/, ., empty", b"", False, None, "empty name"),
    Row("caf\\x82 (no UTF-8 flag)", b"caf\x82", False, "café".encode(), None),
    Row("\\xff (flag set, bad)", b"\xff", True, b"\xff", None),
]


def _table_rows() -> int:
    """Rows of the table in clean_name's docstring (between its 2nd and 3rd rule lines)."""
    lines = (clean_name.__doc__ or "").splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("====")]
    return rules[2] - rules[1] - 1


def test_every_table_row_has_a_case() -> None:
    """One test per row: a row added to the docstring needs a case here."""
    assert len({row.row for row in ROWS}) == _table_rows()


@pytest.mark.parametrize("case", ROWS, ids=[f"{r.row} <- {r.raw[:20]!r}" for r in ROWS])
def test_clean_name_table_row(case: Row) -> None:
    """The documented mapping, and a note exactly when the docstring gives one."""
    path, note = clean_name(case.raw, case.utf8_flag)
    assert path == case.path
    if case.note is None:
        assert note is None
    else:
        assert note is not None and case.note in note


def test_utf8_without_flag_is_taken_as_utf8() -> None:
    """The docstring's rule under the table: valid UTF-8 wins over CP437 when the flag is unset."""
    assert clean_name("é/ü.jpg".encode(), False) == ("é/ü.jpg".encode(), None)


@settings(database=None)  # leave no .hypothesis folder in the repository
@given(st.binary(max_size=600), st.booleans())
def test_clean_name_never_escapes(raw: bytes, utf8_flag: bool) -> None:
    """Whatever the input: relative, no '.'/'..'/empty component, no NUL or backslash, idempotent."""
    path, _ = clean_name(raw, utf8_flag)
    if path is None:
        return
    parts = path.split(b"/")
    assert all(part not in (b"", b".", b"..") and len(part) <= NAME_MAX for part in parts)
    assert b"\x00" not in path and b"\\" not in path
    assert clean_name(path, True) == (path, None)


# -- hostile names on a mount ---------------------------------------------------------------------
class Hostile(NamedTuple):
    written: str                   #: the name zipfile writes
    edit: Optional[bytes]          #: raw name bytes patched in afterwards (same length)
    mounted: Optional[bytes]       #: the path under the mount root, or None: not shown


HOSTILE = [
    Hostile("ok/plain.jpg", None, b"ok/plain.jpg"),
    Hostile("ok/é.jpg", None, "ok/é.jpg".encode()),
    Hostile("/abs/x.jpg", None, b"abs/x.jpg"),
    Hostile("./dots//y/./z.jpg", None, b"dots/y/z.jpg"),
    Hostile("back\\slash.jpg", None, b"back/slash.jpg"),
    Hostile("emptydir/", None, b"emptydir"),
    Hostile("../escape1.jpg", None, None),
    Hostile("ok/../../escape2.jpg", None, None),
    Hostile("nulXname.jpg", b"nul\x00name.jpg", None),
    Hostile("cafX.jpg", b"caf\x82.jpg", "café.jpg".encode()),
    Hostile("ok/ÿbad.jpg", b"ok/\xff\xffbad.jpg", b"ok/\xff\xffbad.jpg"),
]


def write_hostile_zip(folder: Path, cases: List[Hostile]) -> Dict[bytes, bytes]:
    """Write ``cases`` into folder/hostile.zip; returns mounted path -> expected bytes.

    zipfile writes it; names zipfile cannot write are patched in afterwards, so the
    expected bytes are read by zipfile before the patch.
    """
    folder.mkdir()
    archive = folder / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, case in enumerate(cases):
            zf.writestr(case.written, b"" if case.written.endswith("/") else f"member {i}\n".encode())
    expected: Dict[bytes, bytes] = {}
    with zipfile.ZipFile(archive) as zf:
        for case in cases:
            if case.mounted is not None and not case.written.endswith("/"):
                expected[case.mounted] = zf.read(case.written)
    for case in cases:
        if case.edit is not None:
            replace_name_bytes(archive, case.written.encode(), case.edit)
    return expected


def test_hostile_names_on_a_mount(mount: MountFactory, tmp_path: Path) -> None:
    """The documented mapping holds through the kernel and nothing lands outside the root."""
    hostile_zip = write_hostile_zip(tmp_path / "zips", HOSTILE)
    live = mount(tmp_path / "zips")
    live.expect_log(r"skipped|made relative")
    root = os.fsencode(live.point)
    for path, data in hostile_zip.items():
        with open(os.path.join(root, path), "rb") as f:
            assert f.read() == data, path
    files = [case.mounted.decode("utf-8", "surrogateescape") for case in HOSTILE
             if case.mounted is not None and not case.written.endswith("/")]
    tree = expected_tree(files)
    tree[""].add("emptydir")
    tree["emptydir"] = set()
    assert walk_mount(live.point) == tree  # exactly these: no '..', no escape*.jpg, no NUL name
    log = live.log_text()
    for skipped in ("escape1.jpg", "escape2.jpg", "nul", "/abs/x.jpg"):
        assert re.search(re.escape(skipped) + r".*(skipped|made relative)", log), skipped



def test_overlong_component_is_skipped_on_a_mount(mount: MountFactory, tmp_path: Path) -> None:
    """The 'x * 300' row on a mount: the member is left out with a warning, its neighbour stays."""
    long_name = "ok/" + "x" * 300 + ".jpg"
    write_hostile_zip(tmp_path / "zips", [Hostile("ok/plain.jpg", None, b"ok/plain.jpg"),
                                          Hostile(long_name, None, None)])
    live = mount(tmp_path / "zips")
    live.expect_log("skipped")
    assert os.listdir(live.path("ok")) == ["plain.jpg"]
    assert "x" * 300 in live.log_text()
