"""tests/zygote.py stands for `python -m bioscanfs`: a forked run says and returns what a new
interpreter says and returns, and shows the same command line to the tests that look for it."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import pytest
import zygote
from conftest import MOUNT_TIMEOUT, PYTHON, run_cli

#: No mount: nothing here runs the C engine (see the no_c marker).
pytestmark = pytest.mark.no_c


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["mount"], ["no-such-command"],
                                  ["ls", "/nonexistent/folder"], ["ls", "relative"]],
                         ids=["version", "help", "usage", "unknown", "missing", "relative"])
def test_forked_run_says_and_returns_what_a_new_interpreter_does(args: List[str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit code, stdout and stderr byte for byte, program name in click's usage lines
    included; a relative path is taken from the test's folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "relative").mkdir()   # a folder with no archives in it: one error line
    real = subprocess.run([PYTHON, "-m", "bioscanfs", *args], capture_output=True, stdin=subprocess.DEVNULL,
                          timeout=MOUNT_TIMEOUT)
    forked = run_cli(*args, binary=True)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)


def _cmdline(pid: int) -> List[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")


def test_forked_run_shows_its_command_line_and_dies_of_its_signal(tmp_path: Path) -> None:
    """/proc/PID/cmdline reads `python -m bioscanfs ARGS` (server_pids finds daemons by
    it), and a run killed by a signal returns minus that signal, as Popen says."""
    args = ["mount", str(tmp_path), str(tmp_path), "-f", "--password-file", "/dev/stdin"]
    read_end, write_end = os.pipe()
    try:   # the mount waits for a password line on a pipe no one writes to
        proc = zygote.spawn(args, stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert isinstance(proc, zygote.ForkedProcess)
        expected = [os.fsencode(a) for a in [PYTHON, "-m", "bioscanfs", *args]]
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while _cmdline(proc.pid) != expected and time.monotonic() < deadline:   # set just after the fork
            time.sleep(0.01)
        assert _cmdline(proc.pid) == expected
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=MOUNT_TIMEOUT) == -signal.SIGTERM
    finally:
        os.close(read_end)
        os.close(write_end)


def test_an_environment_read_at_start_gets_a_new_interpreter() -> None:
    """A variable read at the interpreter's start or at an import the zygote did cannot be
    given to a fork: such a run is a real `python -m bioscanfs`."""
    proc = zygote.spawn(["--version"], stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONHASHSEED="7"))
    assert isinstance(proc, subprocess.Popen) and proc.wait(timeout=MOUNT_TIMEOUT) == 0
    proc = zygote.spawn(["--version"], stdout=subprocess.DEVNULL, env=dict(os.environ, XDG_CACHE_HOME="/tmp"))
    assert isinstance(proc, zygote.ForkedProcess) and proc.wait(timeout=MOUNT_TIMEOUT) == 0
