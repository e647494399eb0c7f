"""The binary wheel (issue 19): ``scripts/wheel`` builds it, a fresh virtualenv installs
it with binaries only and no compiler on PATH, and its native engine, linked against the
libfuse 3 and libdeflate copies inside the wheel, mounts.

Marked slow (a build and an install of the dependencies: about two minutes); built once
per session. Native engine only: the wheel exists to carry it (the mfusepy engine is
pure Python and the same in every install). Mounting needs /dev/fuse and root or
fusermount3, as every mount test.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Dict

import pytest

from conftest import REPO, force_unmount, is_mounted, zip_contents, zip_members

pytestmark = pytest.mark.slow
BUILD_TIMEOUT = 900.0   #: liveness only: the build and the install fetch and unpack wheels


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                          stdin=subprocess.DEVNULL, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repaired wheel scripts/wheel writes, for the Python running the tests."""
    out = tmp_path_factory.mktemp("dist")
    _run([str(REPO / "scripts" / "wheel"), str(out)], env=dict(os.environ, PYTHON=sys.executable))
    built = list(out.glob("bioscanfs-*.whl"))
    assert len(built) == 1, built
    return built[0]


@pytest.fixture(scope="session")
def wheel_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed from binaries only (``--only-binary
    :all:``: nothing may be compiled), with no gcc or cc on PATH."""
    env_dir = tmp_path_factory.mktemp("wheel_env") / "venv"
    _run([sys.executable, "-m", "venv", str(env_dir)])
    bare_path = f"{env_dir / 'bin'}:/nonexistent"
    _run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "--only-binary", ":all:", str(wheel)], env=dict(os.environ, PATH=bare_path), cwd=str(env_dir))
    return env_dir


def test_wheel_carries_its_libraries(wheel: Path) -> None:
    """A manylinux tag, the compiled engine, and libfuse 3 and libdeflate inside."""
    assert re.search(r"-manylinux_2_\d+_\w+\.whl$", wheel.name), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"bioscanfs/_nativefs\..*\.so", n) for n in names), names
    libs = [n for n in names if n.startswith("bioscanfs.libs/")]
    assert any("libfuse3" in n for n in libs) and any("libdeflate" in n for n in libs), libs


def _engine_of(env_dir: Path) -> Dict[str, str]:
    """Where the installed package and its engine load from, and whether the engine is usable."""
    code = ("import bioscanfs, bioscanfs.nativefs as n, bioscanfs._nativefs as c;"
            "print(bioscanfs.__file__); print(c.__file__); print(n.available())")
    done = _run([str(env_dir / "bin" / "python"), "-c", code], cwd="/", env={"PATH": "/usr/bin:/bin"})
    package, engine, available = done.stdout.split("\n")[:3]
    return {"package": package, "engine": engine, "available": available}


def test_engine_loads_the_bundled_libraries(wheel_env: Path) -> None:
    """The engine imports from the fresh environment, and ldd resolves libfuse3 and
    libdeflate to the copies beside it, not to /usr/lib."""
    loaded = _engine_of(wheel_env)
    assert loaded["package"].startswith(str(wheel_env)) and loaded["engine"].startswith(str(wheel_env)), loaded
    assert loaded["available"] == "True", loaded
    ldd = _run(["ldd", loaded["engine"]]).stdout
    for lib in ("libfuse3", "libdeflate"):
        lines = [line for line in ldd.splitlines() if lib in line]
        assert lines and all("/bioscanfs.libs/" in line for line in lines), ldd


def test_wheel_mounts_with_the_native_engine(wheel_env: Path, make_fake: ModuleType, tmp_path: Path) -> None:
    """The installed command mounts with ``--engine native`` (which refuses rather than
    falling back) and serves members as zipfile reads them; its own umount ends it."""
    folder, point, index = tmp_path / "set", tmp_path / "mnt", tmp_path / "index"
    make_fake.make_set(folder, images=24, deflate_fraction=0.5, seed=5, imgtypes=["cropped_256"])
    point.mkdir()
    command = wheel_env / "bin" / "bioscanfs"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    try:
        _run([str(command), "mount", str(folder), str(point), "--engine", "native", "--index-dir", str(index)],
             env=env, cwd="/")
        assert is_mounted(point)
        for path, data in zip_contents(zip_members(folder)).items():
            assert (point / path).read_bytes() == data, path
        _run([str(command), "umount", str(point)], env=env, cwd="/")
        assert not is_mounted(point)
    finally:
        force_unmount(point)
    assert "Traceback" not in (index / "bioscanfs.log").read_text()

