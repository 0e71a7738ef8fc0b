"""glibc's malloc keeps a forward's freed tensors for the next one once ``keep_freed_memory`` ran:
each case in a fresh interpreter (the setting is for the whole process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

#: Five forwards of a small transformer (4 layers, 256 wide, 5 x 400 tokens: the shapes of a
#: tiny scoring forward) and the minor page faults they cost, before and after ``keep_freed_memory``.
PROBE = """
import json, resource
import torch
from qalign_kvq.cpu_allocator import keep_freed_memory

torch.set_num_threads(1)
torch.manual_seed(0)
layers = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
                               for _ in range(4)]).eval()
x = torch.randn(5, 400, 256)

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        for _ in range(5):
            layers(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
print(json.dumps({"before": faults(), "applied": keep_freed_memory(), "again": keep_freed_memory(),
                  "after": faults()}))
"""


def _probe(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", PROBE], env={**environ, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    out = _probe()
    assert out["applied"] and out["again"]
    # measured: 38,471 faults before (the intermediates mmap'ed, or trimmed, and faulted in afresh
    # each forward), 1,001 after
    assert out["before"] > 20_000
    assert out["after"] < out["before"] / 10


def test_the_users_malloc_variables_win():
    out = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert not out["applied"]
    assert out["after"] > 20_000  # the user's threshold (128 KiB) still holds
