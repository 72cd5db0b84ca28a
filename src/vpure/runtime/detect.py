"""Detection gate (spec/detection.md): per-frame labels -> exception index -> route.

An exception frame is an interior frame whose label differs from both neighbours:

    alpha = (1 / T) * sum_{n=1}^{T-2} [f(n-1) != f(n) and f(n+1) != f(n)]   (0-based n)

The paper's sum starts at its n = 2 (1-based), so the first and last frames are never
exception frames, and the normaliser stays 1/T (not 1/(T-2)). Clips of one or two frames
have no interior frame: alpha = 0.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from vpure.kernels.resize import resize_antialiased

from .config import ConfigBase, check
from .backends.base import all_finite
from .errors import InputError, NonFiniteOutput

ROUTES = ("clean", "sparse", "dense")


def _labels_list(labels) -> list[int]:
    """Per-frame class labels as ints: a 1-D tensor, array or sequence of integral values."""
    if isinstance(labels, (str, bytes)):
        raise InputError(f"labels must be a sequence of integer class labels, got {type(labels).__name__}")
    values = labels.tolist() if hasattr(labels, "tolist") and hasattr(labels, "ndim") else list(labels)
    if getattr(labels, "ndim", 1) != 1:
        raise InputError(f"labels must be one sequence (T,), got shape {tuple(labels.shape)}")
    out = []
    for v in values:
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:  # NumPy scalars, 0-d tensors
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or int(v) != v:
            raise InputError(f"labels must be integer class labels, got {v!r}")
        out.append(int(v))
    return out


def exception_frames(labels: Sequence[int] | torch.Tensor) -> list[int]:
    """0-based indices of the exception frames."""
    f = _labels_list(labels)
    return [n for n in range(1, len(f) - 1) if f[n - 1] != f[n] and f[n + 1] != f[n]]


def exception_index(labels: Sequence[int] | torch.Tensor) -> float:
    """alpha of spec/detection.md for one sequence of per-frame labels (0.0 for T < 3)."""
    f = _labels_list(labels)
    if not f:
        raise InputError("labels is empty: a clip needs at least one frame")
    return len(exception_frames(f)) / len(f)


def route(alpha: float, gamma1: float = 0.175, gamma2: float = 0.3) -> str:
    """"clean" if alpha < gamma1, "sparse" if gamma1 <= alpha < gamma2, else "dense"."""
    if not 0.0 <= gamma1 <= gamma2:
        raise InputError(f"thresholds must satisfy 0 <= gamma1 <= gamma2, got {gamma1}, {gamma2}")
    try:
        a = float(alpha) if not isinstance(alpha, (str, bytes, bool)) else math.nan
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        a = math.nan
    if not 0.0 <= a <= 1.0:  # NaN fails too
        raise InputError(f"alpha must be an exception index in [0, 1], got {alpha!r}")
    if a < gamma1:
        return "clean"
    return "sparse" if a < gamma2 else "dense"


@dataclass(frozen=True)
class DetectionConfig(ConfigBase):
    gamma1: float = 0.175
    gamma2: float = 0.3
    frames_per_call: int = 0  # frames per frame-classifier call; 0 = the whole batch at once
    # Frames are resized to frame_size x frame_size before classification (0: as given).
    # Per-frame labels need far less resolution than recognition: at 112 a ResNet-18 gate
    # costs a quarter of its 224 cost.
    frame_size: int = 0

    def validate(self) -> None:
        check(0.0 <= self.gamma1 <= self.gamma2 <= 1.0,
              f"DetectionConfig thresholds must satisfy 0 <= gamma1 <= gamma2 <= 1, got {self.gamma1}, {self.gamma2}")
        check(self.frames_per_call >= 0, "DetectionConfig.frames_per_call must be >= 0")
        check(self.frame_size >= 0, "DetectionConfig.frame_size must be >= 0")


@dataclass
class Detection:
    labels: torch.Tensor  # (B, T) per-frame labels
    alpha: list[float]
    route: list[str]
    exception_frames: list[list[int]]


class Detector:
    """Runs a frame classifier ``(B, 3, T, H, W) -> (B, T, K)`` and applies the gate."""

    def __init__(self, frame_classifier, config: DetectionConfig | None = None):
        self.frame_classifier = frame_classifier
        self.config = config or DetectionConfig()

    def prepare(self, clip: torch.Tensor) -> torch.Tensor:
        """``clip`` as the frame classifier is given it (resized to ``frame_size``); frame by
        frame, so any run of frames can be prepared on its own."""
        s = self.config.frame_size
        if not s or clip.shape[-2:] == (s, s):
            return clip
        # antialiased bilinear (PyTorch's taps; the native kernel where no gradient is needed)
        return resize_antialiased(clip.float(), (s, s))

    @torch.inference_mode()
    def frame_labels(self, clip: torch.Tensor) -> torch.Tensor:
        clip = self.prepare(clip)
        k = self.config.frames_per_call or clip.shape[2]
        logits = torch.cat([self.frame_classifier(clip[:, :, i:i + k]) for i in range(0, clip.shape[2], k)], dim=1)
        if logits.ndim != 3 or logits.shape[:2] != clip.shape[:1] + clip.shape[2:3]:
            raise InputError(f"frame classifier must return (B, T, K), got {tuple(logits.shape)}")
        if not all_finite(logits):  # argmax of NaN is 0: an unchecked gate would call the clip clean
            bad = ~torch.isfinite(logits).all(-1)  # (B, T)
            frames = [row.nonzero().flatten().tolist() for row in bad]
            raise NonFiniteOutput("frame_classifier", f"for frames {frames}", frames)
        return logits.argmax(-1)

    def __call__(self, clip: torch.Tensor) -> Detection:
        labels = self.frame_labels(clip)
        exc = [exception_frames(row) for row in labels]
        alphas = [len(e) / labels.shape[1] for e in exc]
        routes = [route(a, self.config.gamma1, self.config.gamma2) for a in alphas]
        return Detection(labels, alphas, routes, exc)
