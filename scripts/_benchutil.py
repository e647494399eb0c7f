"""Helpers the benchmark scripts share: finding ratarmount, and a server's pid and RSS."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional


def find_ratarmount() -> Optional[str]:
    """ratarmount next to this interpreter or on PATH, if ``ratarmount --help`` works."""
    beside = Path(sys.executable).parent / "ratarmount"
    program = str(beside) if beside.exists() else shutil.which("ratarmount")
    if program is None:
        return None
    try:
        works = subprocess.run([program, "--help"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return program if works else None


def server_pid(mountpoint: Path, name: str) -> int:
    """The process that serves a mount point: the newest whose command line names both."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(name.encode() in a for a in args) and str(mountpoint).encode() in args:
            found.append(int(entry))
    if not found:
        raise SystemExit(f"no {name} process serves {mountpoint}")
    return max(found)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
