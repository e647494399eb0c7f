"""Installing the native engine (issue 19): the binary wheel, and what is said when the
engine is missing.

``scripts/wheel`` builds the wheel, a fresh virtualenv installs it with binaries only and
no compiler on PATH, and its native engine, linked against the libfuse 3 and libdeflate
copies inside the wheel, mounts. Those tests are marked slow (a build and an install of
the dependencies: about two minutes; built once per session). Native engine only: the
wheel exists to carry it (the mfusepy engine is pure Python, the same in every install).

A copy of the package without its engine, or with one that links a library that is not
there, stands for an install that lost it.
"""
from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Dict, NamedTuple

import pytest
from conftest import (
    MOUNT_TIMEOUT,
    REPO,
    assert_one_error_line,
    force_unmount,
    is_mounted,
    zip_contents,
    zip_members,
)

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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



class EnginelessCli(NamedTuple):
    """``python -S -m bioscanfs`` on a copy of the package without its compiled engine:
    without site, the editable install's finder (which would find the engine in the
    repository) is not loaded; the dependencies come from this environment's site-packages."""

    package_root: Path

    def __call__(self, *args: object) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=f"{self.package_root}:{sysconfig.get_paths()['purelib']}")
        return subprocess.run([sys.executable, "-S", "-m", "bioscanfs", *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=str(self.package_root), timeout=MOUNT_TIMEOUT,
                              stdin=subprocess.DEVNULL)


@pytest.fixture
def engineless(tmp_path: Path) -> EnginelessCli:
    root = tmp_path / "pkg"
    # Only the engine is optional: the central directory walk (_cdscan, plain C) is always built.
    shutil.copytree(REPO / "bioscanfs", root / "bioscanfs",
                    ignore=shutil.ignore_patterns("_nativefs*.so", "__pycache__"))
    return EnginelessCli(root)


def test_engine_not_built(engineless: EnginelessCli, fake_set: Path, mountpoint: Path, tmp_path: Path) -> None:
    """``--engine native`` refuses with one line saying why and how to get it; the default
    falls back to mfusepy and says so once. (The fallback is the mfusepy engine by nature.)"""
    index = ["--index-dir", tmp_path / "index"]
    done = engineless("mount", fake_set, mountpoint, "--engine", "native", *index)
    assert_one_error_line(done, "the native engine was not built when bioscanfs was installed")
    assert "scripts/wheel" in done.stderr and "apt install gcc python3-dev libfuse3-dev" in done.stderr
    done = engineless("mount", fake_set, mountpoint, *index)
    try:
        assert done.returncode == 0 and is_mounted(mountpoint), done.stderr
        warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "serving with mfusepy" in warnings[0] and "not built" in warnings[0], done.stderr
    finally:
        engineless("umount", mountpoint)
        force_unmount(mountpoint)


def test_engine_links_a_missing_library(engineless: EnginelessCli, fake_set: Path, mountpoint: Path,
                                        tmp_path: Path) -> None:
    """An engine built against a library this machine lacks: one line naming the library
    and the packages that bring it."""
    gone = tmp_path / "libbioscanfs_gone.so"
    engine = engineless.package_root / "bioscanfs" / f"_nativefs{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    for command in (["gcc", "-shared", "-fPIC", "-x", "c", "/dev/null", "-o", str(gone)],
                    ["gcc", "-shared", "-fPIC", "-x", "c", "/dev/null", "-o", str(engine),
                     f"-L{tmp_path}", "-Wl,--no-as-needed", "-lbioscanfs_gone"]):
        _run(command)
    gone.unlink()
    done = engineless("mount", fake_set, mountpoint, "--engine", "native", "--index-dir", tmp_path / "index")
    assert_one_error_line(done, "the native engine cannot be loaded (libbioscanfs_gone.so: cannot open")
    assert "apt install libfuse3-3 libdeflate0" in done.stderr
