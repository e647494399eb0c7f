"""Shim for tools that still call setup.py; metadata lives in setup.cfg.

It adds what setup.cfg cannot describe: the optional native FUSE engine (a C extension
on libfuse 3 and libdeflate; when it cannot be built, no compiler or no libfuse3-dev, the
install goes on without it and mounts use the mfusepy engine), and the central directory
walk of zipdir (plain C, no library: always built).
"""
import shutil
import subprocess

from setuptools import Extension, setup


def _pkg_config(*args: str) -> list:
    if not shutil.which("pkg-config"):
        return []
    done = subprocess.run(["pkg-config", *args, "fuse3"], capture_output=True, text=True)
    return done.stdout.split() if done.returncode == 0 else []


def _fuse_api() -> str:
    """The libfuse API version to build against: 3.12's where the library has it (its
    request loop takes a bound on workers, which the engine sets), else 3.5's."""
    found = (_pkg_config("--modversion") or ["0"])[0].split(".")
    minor = int(found[1]) if len(found) > 1 and found[0] == "3" and found[1].isdigit() else 0
    return "312" if minor >= 12 else "35"


native = Extension(
    "bioscanfs._nativefs", ["bioscanfs/_nativefs.c"],
    define_macros=[("FUSE_USE_VERSION", _fuse_api())],
    # C is held to -Wall -Wextra with no warning (scripts/sanitize adds -Werror, so scripts/test fails on one).
    extra_compile_args=(_pkg_config("--cflags") or ["-I/usr/include/fuse3"]) + ["-Wall", "-Wextra"],
    extra_link_args=(_pkg_config("--libs") or ["-lfuse3", "-lpthread"]) + ["-ldeflate"],
    optional=True,
)
cdscan = Extension("bioscanfs._cdscan", ["bioscanfs/_cdscan.c"], extra_compile_args=["-Wall", "-Wextra"])
setup(ext_modules=[native, cdscan])
