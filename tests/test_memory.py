"""retain_cpu_memory: freed large CPU tensors stay in the process (no fresh pages per call)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vpure.runtime import memory
from vpure.runtime.env import read_environment

# A convolution network's call in miniature (activations of 26, 6 and 13 MB), eight calls
# after an optional retain_cpu_memory(); prints the page faults the last three took
# (resource's minor-fault count). By default glibc maps the largest afresh and trims the
# freed heap top, so every call faults its activations' pages in again.
_PROBE = r"""
import json, resource, sys, torch
import torch.nn.functional as F
from vpure.runtime.memory import retain_cpu_memory
applied = retain_cpu_memory() if sys.argv[1] == "1" else False
torch.set_num_threads(1)  # one allocation order (worker threads' scratch would vary it)
torch.manual_seed(0)
w1, w2, x = torch.randn(32, 3, 3, 3), torch.randn(64, 32, 3, 3), torch.rand(16, 3, 112, 112)
def call():
    with torch.inference_mode():
        y = F.relu(F.conv2d(x, w1, padding=1))
        y = F.max_pool2d(y, 2)
        return F.conv2d(y, w2, padding=1).mean()
for _ in range(5):
    call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    call()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(call: str, env_value: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != memory.ENV}
    if env_value is not None:
        env[memory.ENV] = env_value
    out = subprocess.run([sys.executable, "-P", "-c", _PROBE, call], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._glibc() is None, reason="glibc malloc only")
def test_retained_memory_takes_no_fresh_pages_per_call():
    pages = (25 << 20) // 4096  # the largest activation's pages
    # glibc's own choice varies from run to run (address-space layout): the premise, that
    # the probe's calls fault their pages in afresh by default, is looked for in up to 3 runs
    defaults = []
    for _ in range(3):
        defaults.append(_probe("0"))
        if defaults[-1]["faults"] >= 3 * pages:
            break
    else:
        pytest.skip(f"glibc kept this probe's memory on its own in 3 runs: {defaults}")
    assert not any(d["applied"] for d in defaults)
    for _ in range(3):  # retained: never a fresh page, in every run
        retained = _probe("1")
        assert retained["applied"]
        assert retained["faults"] < pages // 4, (retained, defaults[-1])
    assert not _probe("1", env_value="0")["applied"]  # the environment turns it off


def test_retain_cpu_memory_is_applied_once_and_reports_it():
    first = memory.retain_cpu_memory()
    assert memory.retain_cpu_memory() is first
    assert first == (memory._glibc() is not None and read_environment().retain_cpu_memory)
    assert ("retained (" in memory.describe()) == first
