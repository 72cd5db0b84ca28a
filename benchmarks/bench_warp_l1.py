"""warp_l1_grad (loss + gradient, detached warp as released) vs autograd through grid_sample.

Run from the repository root:  .venv/bin/python -m benchmarks.bench_warp_l1 [--csv PATH]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from vpure.kernels.warp_l1 import warp_l1_grad_native, warp_l1_grad_torch, warp_l1_grad_triton
from vpure.lab import timing as benchmark

SHAPES = [(1, 4, 32, 28, 28), (1, 4, 16, 64, 64)]


def autograd_grid_sample(x: torch.Tensor, flow: torch.Tensor):
    """What the released code does: grid_sample warp, L1 mean per pair, backward."""
    b, c, t, h, w = x.shape
    xr = x.detach().clone().requires_grad_(True)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=x.dtype, device=x.device),
                            torch.arange(w, dtype=x.dtype, device=x.device), indexing="ij")
    fl = flow.reshape(b * (t - 1), 2, h, w)
    grid = torch.stack([2 * (gx + fl[:, 0]) / (w - 1) - 1, 2 * (gy + fl[:, 1]) / (h - 1) - 1], -1)
    nxt = xr[:, :, 1:].transpose(1, 2).reshape(b * (t - 1), c, h, w).detach()
    cur = xr[:, :, :-1].transpose(1, 2).reshape(b * (t - 1), c, h, w)
    warped = F.grid_sample(nxt, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    loss = (warped - cur).abs().mean(dim=(1, 2, 3)).view(b, t - 1).sum(1)
    loss.sum().backward()
    return loss.detach(), xr.grad


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default="benchmarks/results/results.csv", help="CSV to append rows to ('' for none)")
    args = p.parse_args(argv)
    for shape in SHAPES:
        g = torch.Generator().manual_seed(0)
        b, c, t, h, w = shape
        x = torch.randn(shape, generator=g)
        flow = torch.randn(b, t - 1, 2, h, w, generator=g) * 2

        def parity(out, ref):
            dl = (out[0] - ref[0]).abs().max().item()
            dg = (out[1] - ref[1]).abs().max().item()
            assert dg < 1e-5 and dl < 1e-4 * max(1.0, ref[0].abs().max().item()), f"loss {dl:.2e} grad {dg:.2e}"
            return f"max|dloss|={dl:.1e} max|dgrad|={dg:.1e}"

        benchmark.run("warp_l1_grad", f"x{shape} detach_warp=True",
                      benchmark.Case("autograd-grid_sample", lambda: autograd_grid_sample(x, flow)),
                      [benchmark.Case("native", lambda: warp_l1_grad_native(x, flow), parity),
                       benchmark.Case("torch-fused", lambda: warp_l1_grad_torch(x, flow), parity)],
                      csv_path=args.csv, min_iters=20, min_time_s=1.0)
        if torch.cuda.is_available():  # one Triton launch per call: expect launch-bound figures
            xc, fc = x.cuda(), flow.cuda()
            benchmark.run("warp_l1_grad", f"x{shape} detach_warp=True cuda",
                          benchmark.Case("autograd-grid_sample-cuda", lambda: autograd_grid_sample(xc, fc)),
                          [benchmark.Case("triton-cuda", lambda: warp_l1_grad_triton(xc, fc),
                                          lambda o, r: parity(tuple(t.cpu() for t in o), tuple(t.cpu() for t in r)))],
                          device="cuda", csv_path=args.csv, min_iters=50, min_time_s=1.0)


if __name__ == "__main__":
    main()
