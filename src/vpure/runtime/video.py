"""Decoding clips from video files (PyAV) into the models' input layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import InputError


def open_video(source: str | Path, *, timeout: float | None = None, verb: str = "open"):
    """A PyAV container with a video stream, or an InputError naming the problem ("cannot
    <verb> <source>: ..."), with a hint on FFmpeg's "Invalid data" for local files."""
    import av

    try:
        container = av.open(str(source), timeout=timeout) if timeout else av.open(str(source))
    except (av.error.FFmpegError, OSError) as e:
        hint = ""
        if timeout and isinstance(e, av.error.ExitError):  # FFmpeg's interrupt: our timeout fired
            raise InputError(f"cannot {verb} {source}: no data within {timeout:g} s (read timeout)") from None
        if isinstance(e, av.error.InvalidDataError) and Path(source).is_file():
            hint = (" (the file is empty)" if Path(source).stat().st_size == 0 else
                    " (not a video FFmpeg can parse: a truncated MP4/MOV whose index (moov atom) was cut "
                    "off, or another format)")
        raise InputError(f"cannot {verb} {source}: {e}{hint}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{source} has no video stream")
    return container


def read_frames(path: str | Path, frames: int, size: int, start: int = 0) -> np.ndarray:
    """(frames, size, size, 3) uint8 RGB from ``path``: centre-cropped square, area-resized."""
    import av
    import cv2

    path = Path(path)
    if not path.is_file():
        raise InputError(f"video {path} does not exist")
    out = []
    try:
        with open_video(path, verb="decode") as container:
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
    except av.error.FFmpegError as e:
        raise InputError(f"cannot decode {path}: {e}") from None
    if len(out) < frames:
        raise InputError(f"{path} has only {len(out)} frames from frame {start}, {frames} wanted")
    return np.stack(out)


def load_clip(path: str | Path, frames: int, size: int, start: int = 0) -> torch.Tensor:
    """(1, 3, T, size, size) float32 in [0, 1]."""
    x = torch.from_numpy(read_frames(path, frames, size, start)).float().div(255.0)
    return x.permute(3, 0, 1, 2)[None].contiguous()
