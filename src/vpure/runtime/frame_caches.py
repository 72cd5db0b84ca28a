"""Per-frame work shared by overlapping windows: each frame pair's flow and each frame's
gate logits are computed once and reused by every window that holds them.

Sliding windows overlap by ``window - stride`` frames; recomputing their flow and labels
per window would cost the dense route and the gate that much again. Results equal
recomputation exactly (the same network on the same frames).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


class CachedFlow:
    """A flow provider that computes each frame pair once across overlapping windows.

    The runner names the window's global frame ids (:meth:`set_window`) before the defence
    runs; pairs already computed are reused, the rest computed in one batch. Only pairs of
    the current window are kept afterwards, so memory stays bounded. Results equal
    recomputation exactly (the same network on the same frames).
    """

    def __init__(self, base: Callable, max_pairs: int = 256):
        self.base, self.max_pairs = base, max_pairs
        self._cache: OrderedDict[tuple[int, int, str], torch.Tensor] = OrderedDict()
        self._ids: list[int] | None = None
        self.computed = self.reused = 0

    def set_window(self, frame_ids: list[int]) -> None:
        self._ids = list(frame_ids)

    def reset(self) -> None:
        """Forget every pair and zero the counters (a new input: frame ids start again)."""
        self._cache.clear()
        self._ids = None
        self.computed = self.reused = 0

    def __call__(self, frames: torch.Tensor, input_range: str = "unit") -> torch.Tensor:
        b, _, t = frames.shape[:3]
        if self._ids is None or b != 1 or len(self._ids) != t:
            return self.base(frames, input_range=input_range)  # no ids for this call: plain computation
        pairs = [(self._ids[i], self._ids[i + 1], input_range) for i in range(t - 1)]
        missing = [i for i, p in enumerate(pairs) if p not in self._cache]
        self.reused += len(pairs) - len(missing)
        self.computed += len(missing)
        if missing:
            # Runs of consecutive missing pairs are computed as sub-clips in one call each.
            runs, start = [], missing[0]
            for a, b_ in zip(missing, missing[1:] + [None]):
                if b_ != a + 1:
                    runs.append((start, a))
                    start = b_
            for lo, hi in runs:
                flows = self.base(frames[:, :, lo:hi + 2], input_range=input_range)[0]
                for k in range(hi - lo + 1):
                    self._cache[pairs[lo + k]] = flows[k].clone()
        out = torch.stack([self._cache[p] for p in pairs])[None]
        keep = set(pairs)
        for key in [k for k in self._cache if k not in keep]:
            del self._cache[key]
        while len(self._cache) > self.max_pairs:
            self._cache.popitem(last=False)
        return out


class CachedFrameLogits:
    """A per-frame classifier that classifies each frame once across overlapping windows.

    The gate's classifier labels every frame on its own (the detection spec), so a frame's
    logits do not depend on the window it sits in: the runner names the window's global
    frame ids (:meth:`set_window`), logits of frames already classified are reused and only
    the new frames go through the network, in one call. The Detector may split a window
    into consecutive chunks (``frames_per_call``); calls advance through the window's ids in
    order. A call that does not fit the named window (batch > 1, more frames than are left)
    is computed plainly. Only the current window's frames are kept, and frames labelled
    ahead of their window (:meth:`prefill`).
    """

    def __init__(self, base: Callable, frames_per_call: int = 0):
        self.base, self.frames_per_call = base, frames_per_call
        self._cache: dict[int, torch.Tensor] = {}
        self._ids: list[int] | None = None
        self._cursor = 0
        self.computed = self.reused = self.ahead = 0

    def set_window(self, frame_ids: list[int]) -> None:
        self._ids, self._cursor = list(frame_ids), 0
        first, keep = min(self._ids), set(self._ids)
        for key in [k for k in self._cache if k not in keep and k < first]:
            del self._cache[key]

    def reset(self) -> None:
        """Forget every frame and zero the counters (a new input: frame ids start again)."""
        self._cache.clear()
        self._ids, self._cursor = None, 0
        self.computed = self.reused = self.ahead = 0

    def prefill(self, frame_ids: list[int], frames: torch.Tensor) -> int:
        """Label frames (1, 3, n, H, W), already as the classifier takes them, before their
        window is complete; returns how many went through the network. A later window that
        holds them reuses the logits."""
        missing = [i for i, f in enumerate(frame_ids) if f not in self._cache]
        k, done = self.frames_per_call or len(missing) or 1, 0
        for lo in range(0, len(missing), k):
            idx = missing[lo:lo + k]
            logits = self.base(frames[:, :, idx])
            if logits.ndim != 3 or logits.shape[:2] != (1, len(idx)):
                break  # not a per-frame classifier's output: the window's own call names the problem
            for j, i in enumerate(idx):
                self._cache[frame_ids[i]] = logits[0, j].clone()
            done += len(idx)
        self.computed += done
        self.ahead += done
        return done

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        b, _, t = frames.shape[:3]
        if self._ids is None or b != 1 or self._cursor + t > len(self._ids):
            return self.base(frames)
        ids = self._ids[self._cursor:self._cursor + t]
        self._cursor += t
        missing = [i for i, f in enumerate(ids) if f not in self._cache]
        self.reused += t - len(missing)
        self.computed += len(missing)
        if missing:
            sub = frames if len(missing) == t else frames[:, :, missing]
            logits = self.base(sub)
            if logits.ndim != 3 or logits.shape[:2] != (1, len(missing)):
                return logits  # not a per-frame classifier's output: the Detector names the problem
            for k, i in enumerate(missing):
                self._cache[ids[i]] = logits[0, k].clone()
        return torch.stack([self._cache[f] for f in ids])[None]
