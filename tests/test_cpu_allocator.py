"""glibc's malloc keeps freed blocks of up to 32 MiB for the next allocation once ``keep_freed_memory``
ran: each case in a fresh interpreter (the setting is for the whole process). What the setting saves
a pipelined scorer's forwards (whose allocation pattern defeats glibc's dynamic thresholds) is
measured by scripts/bench_pipeline.py (docs/benchmarks.md); a small forward's page faults under
the dynamic rule vary from run to run (1 to 38,000), so they are not pinned here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

#: A 20 MiB block malloc'ed, written (its pages touched) and freed, four times: the minor page
#: faults of each round.
PROBE = """
import ctypes, json, resource
from qalign_kvq.cpu_allocator import keep_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 20 << 20

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = keep_freed_memory()
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "faults": [faults() for _ in range(4)]}))
"""
PAGES = (20 << 20) // 4096


def _probe(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", PROBE], env={**environ, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_freed_block_is_reused_without_page_faults():
    out = _probe()
    assert out["applied"] and out["again"]
    first, *again = out["faults"]
    assert first >= PAGES * 0.9  # the heap grows once (measured 5,105 faults)
    assert all(n < 50 for n in again)  # then the block comes back from the heap (measured 0)


def test_the_users_malloc_variables_win():
    out = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert not out["applied"]
    # the user's fixed threshold (128 KiB) still holds: every block mmap'ed and faulted in afresh (5,121)
    assert all(n >= PAGES for n in out["faults"])
