#!/usr/bin/env python3
"""How the views' deflated CSV member reaches pyarrow's CSV reader, side by side in one run:

- ``reader``: a Python file over the mount's seek-point stream (``MemberFile``: the
  build before; it inflates only when pyarrow asks);
- ``piped``: ``Reader.copy_to`` inflating in one pass with zlib-ng on a thread of its
  own, through a pipe (``views.piped``: the build now);
- ``gzip``: the raw deflate stream wrapped as a gzip stream (a 10-byte header, the
  declared CRC-32 and size as trailer), inflated by pyarrow's own zlib in C++.

Each parses the needed columns (``views.read_batches``, the build's streaming reader);
rounds rotate the order. Wall time and the process's CPU time (all threads) are printed,
with ratios to ``reader``.

    python scripts/bench_views_inflate.py METADATA_ZIP [--rounds N]
"""
from __future__ import annotations

import argparse
import io
import os
import struct
import sys
import time
from typing import Callable, Dict, List, Tuple

from bioscanfs.layout import METADATA_CSV
from bioscanfs.reader import MemberFile, Reader
from bioscanfs.sources import open_sources
from bioscanfs.views import piped, read_batches
from bioscanfs.zipdir import Member, read_local_header, read_members

_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


class _Gzip(io.RawIOBase):
    """The member's raw deflate stream between a gzip header and trailer."""

    def __init__(self, fd: int, start: int, member: Member) -> None:
        self._parts = [_GZIP_HEADER]
        self._fd, self._pos, self._end = fd, start, start + member.compressed_size
        self._trailer = struct.pack("<II", member.crc32, member.size & 0xFFFFFFFF)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._parts:
            data = self._parts.pop()
        elif self._pos < self._end:
            data = os.pread(self._fd, min(len(buffer), self._end - self._pos), self._pos)
            self._pos += len(data)
        else:
            data, self._trailer = self._trailer, b""
        buffer[:len(data)] = data
        return len(data)


def main() -> int:
    import pyarrow as pa

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metadata_zip")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sources = open_sources([([args.metadata_zip], False)])
    members = read_members(sources[0])
    ends = [0] + members.name_ends.tolist()
    paths = [members.names[a:b].tobytes().decode() for a, b in zip(ends, ends[1:])]
    member = Member._make(members.table[paths.index(METADATA_CSV)].item())
    reader = Reader(sources)
    start = read_local_header(sources[0], member, METADATA_CSV).data_offset
    fd = os.open(args.metadata_zip, os.O_RDONLY)
    ways: Dict[str, Callable[[], object]] = {
        "reader": lambda: read_csv(io.BufferedReader(MemberFile(Reader(sources), member, METADATA_CSV), 1 << 20)),
        "piped": lambda: _piped(reader, member),
        "gzip": lambda: read_csv(pa.CompressedInputStream(
            pa.PythonFile(io.BufferedReader(_Gzip(fd, start, member), 4 << 20), mode="r"), "gzip")),
    }
    times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in ways}
    names = list(ways)
    for round_no in range(args.rounds):
        for name in names[round_no % len(names):] + names[:round_no % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            rows = ways[name]().num_rows
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            print(f"round {round_no + 1}: {name}: {rows:,} rows, {times[name][-1][0]:.2f} s "
                  f"(CPU {times[name][-1][1]:.2f} s), load {os.getloadavg()[0]:.1f}", flush=True)
    best = {name: (min(w for w, _ in t), min(c for _, c in t)) for name, t in times.items()}
    print(f"CSV {member.size:,} bytes ({member.compressed_size:,} deflated), {os.cpu_count()} cores; best of "
          f"{args.rounds}: " + ", ".join(f"{name} {w:.2f} s wall ({best['reader'][0] / w:.2f}x), CPU {c:.2f} s"
                                         for name, (w, c) in best.items()))
    return 0


def read_csv(stream: object) -> object:
    """The needed columns of the whole CSV, as the build reads them (batch by batch)."""
    import pyarrow as pa

    return pa.Table.from_batches(list(read_batches(stream)))


def _piped(reader: Reader, member: Member) -> object:
    with piped(lambda sink: reader.copy_to(member, METADATA_CSV, sink)) as stream:
        return read_csv(stream)


if __name__ == "__main__":
    sys.exit(main())
