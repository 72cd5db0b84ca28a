"""Real clips for benchmarks, decoded from ../shared/data (or VPURE_DATA)."""

from __future__ import annotations

import numpy as np

from vpure.runtime.env import read_environment
from vpure.runtime.video import read_frames


def load_clip(name: str = "vtest.avi", frames: int = 32, size: int = 224, start: int = 0) -> np.ndarray:
    """(frames, size, size, 3) uint8 RGB."""
    return read_frames(data_path(name), frames, size, start)


def data_path(name: str):
    """Path of shared footage ``name`` (exits with a clear message when it is absent)."""
    data = read_environment().data_dir
    if data is None or not (data / name).is_file():
        raise SystemExit(f"footage {name} not found: set VPURE_DATA to the shared data folder")
    return data / name
