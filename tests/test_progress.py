"""Progress while an index is built (issue 17): archives parsed, members so far and the
time left, on a terminal; nothing of it when standard error is a pipe or a log.

No mount here: the progress line is printed before a mount starts serving, by the same
code for ``index`` and ``mount``, so neither engine is involved.
"""
from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path

from conftest import MOUNT_TIMEOUT, PYTHON, run_cli, zip_members, zip_paths

_LINE = re.compile(r"indexing: (\d+)/(\d+) archives, ([\d,]+) members")


def _on_a_terminal(*args: object) -> str:
    """What ``python -m bioscanfs ARGS`` writes to standard error when that is a terminal."""
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run([PYTHON, "-m", "bioscanfs", *map(str, args)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=terminal, timeout=MOUNT_TIMEOUT)
        assert done.returncode == 0
    finally:
        os.close(terminal)
    out = b""
    while True:
        try:
            block = os.read(controller, 1 << 16)
        except OSError:  # EIO: the terminal side is closed and everything was read
            break
        if not block:
            break
        out += block
    os.close(controller)
    return out.decode()


def test_index_shows_progress_on_a_terminal(fake_set: Path, tmp_path: Path) -> None:
    """Every archive is counted once, the members add up to what zipfile lists, and the
    line is wiped at the end."""
    err = _on_a_terminal("index", fake_set, "--index-dir", tmp_path / "index")
    lines = [m.groups() for m in _LINE.finditer(err)]
    archives = len(zip_paths(fake_set))
    assert [int(done) for done, _, _ in lines] == list(range(1, archives + 1)), err
    assert {int(total) for _, total, _ in lines} == {archives}
    assert int(lines[-1][2].replace(",", "")) >= len(zip_members(fake_set))  # explicit folders count too
    assert err.endswith("\r" + " " * 79 + "\r"), "the progress line was left on the terminal"


def test_no_progress_when_not_a_terminal_or_index_built(fake_set: Path, tmp_path: Path) -> None:
    """Piped: no progress and no carriage return; a second run maps the index: nothing to show."""
    done = run_cli("index", fake_set, "--index-dir", tmp_path / "index")
    assert done.returncode == 0 and "indexing:" not in done.stderr and "\r" not in done.stderr, done.stderr
    assert "indexing:" not in _on_a_terminal("index", fake_set, "--index-dir", tmp_path / "index")
