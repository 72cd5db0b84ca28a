"""Real clips for benchmarks, decoded from ../shared/data (or VPURE_DATA)."""

from __future__ import annotations

import numpy as np


def load_clip(name: str = "vtest.avi", frames: int = 32, size: int = 224, start: int = 0) -> np.ndarray:
    """(frames, size, size, 3) uint8 RGB: decoded with PyAV, centre-cropped square, resized."""
    import av
    import cv2

    from vpure.runtime.env import read_environment

    data = read_environment().data_dir
    if data is None or not (data / name).is_file():
        raise SystemExit(f"footage {name} not found: set VPURE_DATA to the shared data folder")
    out = []
    with av.open(str(data / name)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i < start:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            h, w = rgb.shape[:2]
            s = min(h, w)
            crop = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            out.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
            if len(out) == frames:
                break
    if len(out) < frames:
        raise SystemExit(f"{name} has only {len(out)} frames after {start}")
    return np.stack(out)
