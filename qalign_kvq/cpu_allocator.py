"""glibc's malloc tuned for repeated CPU forwards in a process that only runs forwards.

glibc hands an allocation of more than ``M_MMAP_THRESHOLD`` (128 KiB at start) fresh pages from
``mmap`` and gives them back on ``free``, so every such tensor of a forward is page-faulted in
again. The threshold rises by itself once the process frees a large malloc'ed block: a process
that also reads and preprocesses videos (the sequential scorer) gets there, the main process of
the pipelined scorer does not (its inputs arrive in shared memory), and there the forwards spent a
fifth of their time in page faults (the clips and a 22-layer model of scripts/bench_pipeline.py,
one worker: 1.29 -> 1.04 s a forward, minor page faults 112,000 -> 18,000 a video).
:func:`keep_freed_memory` fixes the thresholds at the values the dynamic rule reaches at most,
the documented ``mallopt`` settings behind glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap (glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory kept at the top of the heap (twice the mmap threshold, as the dynamic rule sets).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve blocks up to 32 MiB from the heap and keep up to 64 MiB of freed
    memory there, for this process (once; later calls return the first answer). Whether it was
    set: not on other C libraries, nor where the user set either ``MALLOC_*_THRESHOLD_`` variable."""
    global _applied
    if _applied is None:
        _applied = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not any(map(os.environ.get, _ENV)):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
