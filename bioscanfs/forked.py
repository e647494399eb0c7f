"""A child process forked with a pipe to its parent: what the mount's daemon (``cli``) and
an index built apart from the mount command (``index``) start from.

Owns the order of the steps, which matters: buffered output is flushed first (else the
child writes it a second time), and each side closes the end of the pipe it does not
use (else the parent never sees the end of the child's messages).
"""
from __future__ import annotations

import os
import sys
from typing import Tuple


def fork_with_pipe() -> Tuple[int, int]:
    """Fork; (0, the pipe's write end) in the child, (the child's pid, its read end) in
    the parent."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        return 0, write_end
    os.close(write_end)
    return pid, read_end
