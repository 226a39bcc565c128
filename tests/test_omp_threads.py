"""release_omp_threads frees the calling thread's OpenMP worker team (model/omp_threads.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter: in the test process other threads (an engine's, Ray's) come and
# go, and the thread count is only meaningful where nothing else runs.
PROBE = """
import json, os
from concurrent.futures import ThreadPoolExecutor
import torch
from model.omp_threads import release_omp_threads

def threads():
    return len(os.listdir("/proc/self/task"))

weights = torch.randn(1024, 1024)
torch.mm(weights, weights)  # the main thread's own team exists from here on

def in_fresh_thread():
    before = threads()
    torch.mm(weights, weights)  # a parallel kernel: this thread gets a worker team
    with_team = threads()
    released = release_omp_threads()
    after_release = threads()
    torch.mm(weights, weights)  # still works: a fresh team is started
    return {"before": before, "with_team": with_team, "after_release": after_release,
            "released": released, "torch_threads": torch.get_num_threads()}

with ThreadPoolExecutor(1) as pool:
    print(json.dumps(pool.submit(in_fresh_thread).result()))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_a_threads_openmp_team_is_freed_and_comes_back_on_demand() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["torch_threads"] == 2
    assert probe["released"]
    assert probe["with_team"] > probe["before"]  # the thread's OpenMP worker(s)
    assert probe["after_release"] == probe["before"]  # ... all gone after the release
