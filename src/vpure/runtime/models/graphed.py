"""CUDA-graph replay of a UNet: one captured graph per latent shape and dtype."""

from __future__ import annotations

import torch
from torch import nn

from .diffusion import eps_fn_of


class GraphedEps:
    """``eps_fn(z, t: int)`` replayed from one CUDA graph per latent shape and dtype.

    A UNet call at purification sizes launches hundreds of small kernels; on a GPU the
    launches, not the arithmetic, bound it. The first call of each shape runs the module
    twice on a side stream (allocator and cuDNN warm-up), then captures one call into a
    graph whose static inputs are ``z`` and the timestep; later calls copy into those
    buffers and replay. The output is cloned, so callers may keep it across calls.

    Eager where a graph cannot help or would be wrong: on CPU, when gradients must flow to
    ``z`` (the full-gradient attack), and for good once a capture has failed (the reason
    is kept in ``failure`` and logged). Graphs hold their inputs' memory, so one instance
    serves one module.
    """

    def __init__(self, module: nn.Module, warmup: int = 2):
        self.module, self.warmup = module, warmup
        self._eager = eps_fn_of(module)
        self.graphs: dict[tuple, tuple] = {}
        self.failure: str | None = None
        self.replays = 0

    def _capture(self, z: torch.Tensor, t: int) -> tuple:
        static_z = z.detach().clone()
        static_t = torch.full((1,), int(t), dtype=torch.int64, device=z.device)
        side = torch.cuda.Stream(z.device)
        side.wait_stream(torch.cuda.current_stream(z.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.module(static_z, static_t)
        torch.cuda.current_stream(z.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.module(static_z, static_t)
        return static_z, static_t, static_out, graph

    def __call__(self, z: torch.Tensor, t: int) -> torch.Tensor:
        if z.device.type != "cuda" or self.failure is not None or (torch.is_grad_enabled() and z.requires_grad):
            return self._eager(z, t)
        key = (tuple(z.shape), z.dtype, z.device)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(z, t)
            except RuntimeError as e:  # an op that cannot be captured: stay eager from now on
                from ..log import get_logger

                self.failure = f"{type(e).__name__}: {e}".splitlines()[0]
                get_logger(__name__).warning("CUDA graph capture of the UNet failed, running eagerly: %s",
                                             self.failure)
                torch.cuda.synchronize(z.device)
                return self._eager(z, t)
            self.graphs[key] = entry
        static_z, static_t, static_out, graph = entry
        static_z.copy_(z)
        static_t.fill_(int(t))
        graph.replay()
        self.replays += 1
        return static_out.clone()
