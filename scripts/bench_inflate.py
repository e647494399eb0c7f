#!/usr/bin/env python3
"""Which inflater the native engine uses: zlib against libdeflate on whole JPEG members.

Builds members like BIOSCAN-5M's (synthetic JPEGs of about 10 KB, deflated at level 6 as
zip tools do), compiles scripts/bench_inflate.c with gcc against both libraries
(`apt install zlib1g-dev libdeflate-dev`), and prints the time per member of inflating
and of the CRC-32 (over the same bytes), best of 7 passes, with the ratio.

    python scripts/bench_inflate.py [--members 3000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from _zipkit import make_jpeg

_HERE = Path(__file__).resolve().parent


def write_members(folder: Path, count: int) -> None:
    """``count`` deflated JPEGs end to end, and their index (offset, deflated size, size, crc)."""
    rng = np.random.default_rng(0)
    rows = []
    with open(folder / "members.bin", "wb") as out:
        for i in range(count):
            jpeg = make_jpeg(rng, 160, 120, f"member {i}")
            deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
            stream = deflater.compress(jpeg) + deflater.flush()
            rows.append((out.tell(), len(stream), len(jpeg), zlib.crc32(jpeg)))
            out.write(stream)
    np.asarray(rows, dtype=np.uint64).tofile(folder / "index.bin")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_members(folder, args.members)
        program = folder / "bench_inflate"
        subprocess.run(["gcc", "-O2", "-o", str(program), str(_HERE / "bench_inflate.c"), "-lz", "-ldeflate"],
                       check=True)
        done = subprocess.run([str(program), str(folder / "members.bin"), str(folder / "index.bin")],
                              check=True, capture_output=True, text=True)
    r = json.loads(done.stdout)
    n, mb = r["members"], r["bytes"] / 1e6
    print(f"{n} members, {r['bytes'] / n / 1024:.1f} KiB each on average")
    print(f"{'':<10}{'zlib':>18}{'libdeflate':>18}{'zlib/libdeflate':>18}")
    for what in ("inflate", "crc32"):
        z, d = r[f"zlib_{what}"], r[f"libdeflate_{what}"]
        print(f"{what:<10}{z / n * 1e6:>9.1f} us/member{d / n * 1e6:>9.1f} us/member{z / d:>17.2f}x")
    print(f"(inflate: {mb / r['zlib_inflate']:.0f} vs {mb / r['libdeflate_inflate']:.0f} MB/s of output)")
    print("command: python scripts/bench_inflate.py" + (f" --members {args.members}" if args.members != 3000 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
