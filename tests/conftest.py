"""Test-wide set-up: tiers, real-data location, Triton interpreter on CPU-only machines."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides at decoration time whether kernels are compiled or interpreted, so the
# interpreter must be chosen before any vpure kernel module is imported. Without a GPU
# the Triton kernels are exercised on small shapes through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_dir():
    from vpure.runtime.env import read_environment

    d = read_environment().data_dir
    if d is None or not d.is_dir():
        pytest.skip("real footage not found: looked for shared/data beside the checkout; set VPURE_DATA to "
                    "a folder of footage to override")
    return d
