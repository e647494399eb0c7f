"""Row loops over large numpy arrays, in cache-sized chunks on every core.

numpy releases the GIL inside its loops, so chunks run in parallel threads; chunks are
small enough that their temporaries stay in cache and are reused, not faulted in, and
the memory a pass needs stays bounded whatever the number of rows.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List

CHUNK_ROWS = 1 << 16


def for_chunks(n: int, body: Callable[[slice], Any], size: int = CHUNK_ROWS) -> List[Any]:
    """``body`` of every row slice of ``range(n)``, in order; none when ``n`` is 0 (the
    links of a tree without views). One slice runs on this thread, with no pool to start."""
    if n <= size:
        return [body(slice(0, n))] if n else []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(body, (slice(lo, min(lo + size, n)) for lo in range(0, n, size))))


def give_back_freed() -> None:
    """Return what worker threads freed to the system, where the C library is glibc (else
    nothing happens).

    Why: glibc keeps the memory a thread frees in that thread's arena (numpy's temporaries
    of a few to tens of MB, once its mmap threshold has grown past them), so the next
    step's peak counts it again: the views build's peak (in ``merge.ViewsBuilder``, after
    the plan's threads) was about 90 MB higher without this (docs/views.md)."""
    import ctypes  # a build's step only: a remount does not import it

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
