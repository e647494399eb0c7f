#!/usr/bin/env python3
"""Decoding members of other methods: the standard library vs libarchive, in one run.

For bzip2 and lzma members written by CPython's zipfile (small ~8 KB and large ~4 MB),
times bioscanfs's libarchive path (a one-member archive from the member's own local
header) against the standard library's decompressor on the same bytes. bioscanfs uses
the faster one per method.

    python scripts/bench_methods.py [--repeat N]
"""
from __future__ import annotations

import argparse
import bz2
import functools
import io
import lzma
import os
import sys
import time
import zipfile
from typing import Callable, Optional

from bioscanfs.reader import libarchive_decode
from bioscanfs.sources import BytesSource
from bioscanfs.zipdir import Member, read_local_header, read_members


def _stdlib(method: int) -> Callable[[bytes], bytes]:
    if method == zipfile.ZIP_BZIP2:
        return bz2.decompress

    def lzma_zip(data: bytes) -> bytes:
        # APPNOTE 5.8.8: 2-byte version, 2-byte properties size, then the LZMA1 properties.
        props_size = int.from_bytes(data[2:4], "little")
        filters = [lzma._decode_filter_properties(lzma.FILTER_LZMA1, data[4:4 + props_size])]
        return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters).decompress(data[4 + props_size:])
    return lzma_zip


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    payloads = {"8 KB": os.urandom(4096) + b"jpeg-like tail " * 270, "4 MB": b"processid,split,chunk\n" * 190_000}
    print(f"{'method':<7} {'member':<6} {'stdlib ms':>10} {'libarchive ms':>14} {'libarchive/stdlib':>18}")
    for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        for label, payload in payloads.items():
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", compression=method) as zf:
                zf.writestr("m", payload)
            src = BytesSource(buf.getvalue())
            member = Member._make(read_members(src).table[0].item())
            start = read_local_header(src, member, "m").data_offset
            header = src.data[member.header_offset:start]
            data = src.data[start:start + member.compressed_size]
            repeat = args.repeat if label == "8 KB" else max(3, args.repeat // 50)
            timings = {}
            through_libarchive = functools.partial(libarchive_decode, src, member, "m", header, password=None)
            for name, decode in (("stdlib", _stdlib(method)), ("libarchive", through_libarchive)):
                assert decode(data) == payload, name
                started = time.perf_counter()
                for _ in range(repeat):
                    decode(data)
                timings[name] = (time.perf_counter() - started) / repeat * 1000
            print(f"{zipfile.compressor_names[method]:<7} {label:<6} {timings['stdlib']:>10.3f} "
                  f"{timings['libarchive']:>14.3f} {timings['libarchive'] / timings['stdlib']:>17.2f}x")
    print("command: python scripts/bench_methods.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
