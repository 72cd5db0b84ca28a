"""Warp-L1 temporal loss and its gradient (api.md ``warp_l1`` / ``warp_l1_grad``).

For x (B, C, T, h, w) and flow (B, T-1, 2, h, w) (channel 0 = dx, channel 1 = dy):

    L[b] = sum_{i=0}^{T-2} mean_{c,y,x} | Warp(x[b, :, i+1], flow[b, i])(y, x) - x[b, c, i, y, x] |

(spec/videopure.md, L_temp), where Warp samples bilinearly at (x + dx, y + dy) with zero
padding; this is grid_sample with align_corners=True and the grid 2 v / (size - 1) - 1.
``detach_warp=True`` (as released) treats the warped frame as a constant: the gradient
reaches only x[:, :, i]. ``detach_warp=False`` also differentiates through the bilinear
weights into x[:, :, i+1]. The flow is a constant input (no gradient w.r.t. flow).
At d = 0 the L1 subgradient is taken as 0.

Order: ``warp_l1_ref`` (float64 oracle), Triton launcher (kernels in
``_triton_warp_l1.py``), autograd wrapper, native and torch implementations, public API.
"""

from __future__ import annotations

import torch

from . import _dispatch
from ._checks import check_warp_args

_IMPLS = ("triton", "native", "torch", "ref")


# -- reference (float64, explicit bilinear sampling, gradient by autograd) ---------------
def _bilinear_ref(frames: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """frames (N, C, h, w), flow (N, 2, h, w) -> frames sampled at p + flow(p), zero padding."""
    n, c, h, w = frames.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=frames.dtype, device=frames.device),
                            torch.arange(w, dtype=frames.dtype, device=frames.device), indexing="ij")
    sx, sy = xs + flow[:, 0], ys + flow[:, 1]
    x0, y0 = sx.floor(), sy.floor()
    out = torch.zeros_like(frames)
    for oy in (0, 1):
        for ox in (0, 1):
            xi, yi = x0 + ox, y0 + oy
            wt = (1 - (sx - xi).abs()) * (1 - (sy - yi).abs())
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().view(n, 1, h * w).expand(n, c, h * w)
            vals = frames.reshape(n, c, h * w).gather(2, idx).view(n, c, h, w)
            out = out + vals * (wt * ok).unsqueeze(1)
    return out


def warp_l1_ref(x: torch.Tensor, flow: torch.Tensor, *, detach_warp: bool = True) -> torch.Tensor:
    """The loss (B,) in float64, straight from the definition; differentiable."""
    check_warp_args(x, flow)
    x, flow = x.double(), flow.double()
    b, c, t, h, w = x.shape
    nxt = x[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(b * (t - 1), c, h, w)
    cur = x[:, :, :-1].permute(0, 2, 1, 3, 4).reshape(b * (t - 1), c, h, w)
    if detach_warp:
        nxt = nxt.detach()
    warped = _bilinear_ref(nxt, flow.reshape(b * (t - 1), 2, h, w))
    per_pair = (warped - cur).abs().mean(dim=(1, 2, 3)).view(b, t - 1)
    return per_pair.sum(dim=1)


def warp_l1_grad_ref(x: torch.Tensor, flow: torch.Tensor, *, detach_warp: bool = True):
    """(loss (B,) float64, grad float64 like x) by autograd through ``warp_l1_ref``.

    Works under ``torch.inference_mode`` / ``no_grad`` too (the defence runs there)."""
    with torch.inference_mode(False), torch.enable_grad():
        xr = x.detach().clone().double().requires_grad_(True)
        loss = warp_l1_ref(xr, flow.detach().clone(), detach_warp=detach_warp)
        (grad,) = torch.autograd.grad(loss.sum(), xr)
    return loss.detach(), grad


# -- Triton ---------------------------------------------------------------------------
def warp_l1_grad_triton(x: torch.Tensor, flow: torch.Tensor, *, detach_warp: bool = True,
                        need_grad: bool = True, block_p: int = 256):
    """One kernel launch; the loss partials (one per program) are summed in a fixed order."""
    from ._triton_warp_l1 import FIXED_POINT_BITS, _warp_l1_kernel

    x = x.float().contiguous()
    flow = flow.float().contiguous()
    b, c, t, h, w = x.shape
    hw = h * w
    n_tiles = -(-hw // block_p)
    grad = torch.empty_like(x) if need_grad else x.new_empty(1)
    full = need_grad and not detach_warp
    scatter = torch.zeros(x.shape, dtype=torch.int64, device=x.device) if full else x.new_empty(1, dtype=torch.int64)
    partial = torch.empty(b * (t - 1) * n_tiles, dtype=torch.float32, device=x.device)
    inv_n = 1.0 / (c * hw)
    _warp_l1_kernel[(b * (t - 1), n_tiles)](x, flow, grad, scatter, partial, c, t, h, w, inv_n,
                                             NEED_GRAD=need_grad, FULL=full, BLOCK_P=block_p)
    loss = partial.view(b, -1).double().sum(dim=1).mul_(inv_n).float()
    if full:
        grad += scatter.double().mul_(inv_n * 2.0 ** -FIXED_POINT_BITS).float()
    return loss, (grad if need_grad else None)


# -- autograd wrapper -------------------------------------------------------------------
class _WarpL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, flow, detach_warp, impl):
        loss, grad = warp_l1_grad(x, flow, detach_warp=detach_warp, impl=impl, need_grad=x.requires_grad)
        ctx.save_for_backward(grad if grad is not None else x.new_empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        g = grad_loss.view(-1, 1, 1, 1, 1).to(grad.dtype) * grad
        return g, None, None, None


# -- native C++ (OpenMP over frame pairs) and torch implementations -------------------
def warp_l1_grad_native(x: torch.Tensor, flow: torch.Tensor, *, detach_warp: bool = True,
                        need_grad: bool = True):
    nat = _dispatch.native()
    loss, grad = nat.warp_l1_grad(x.detach().float().contiguous().numpy(),
                                  flow.detach().float().contiguous().numpy(), detach_warp, need_grad)
    return torch.from_numpy(loss), (torch.from_numpy(grad) if grad is not None else None)


def _bilinear_parts(flow: torch.Tensor, h: int, w: int):
    """Corner indices (4, N, hw) and weights (4, N, hw) (zero outside the frame)."""
    n = flow.shape[0]
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=torch.float32),
                            torch.arange(w, device=flow.device, dtype=torch.float32), indexing="ij")
    sx = (xs + flow[:, 0]).reshape(n, -1)
    sy = (ys + flow[:, 1]).reshape(n, -1)
    x0, y0 = sx.floor(), sy.floor()
    ax, ay = sx - x0, sy - y0
    idx, wts = [], []
    for oy, wy in ((0, 1 - ay), (1, ay)):
        for ox, wx in ((0, 1 - ax), (1, ax)):
            xi, yi = x0 + ox, y0 + oy
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            idx.append((yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long())
            wts.append(wy * wx * ok)
    return torch.stack(idx), torch.stack(wts)


def warp_l1_grad_torch(x: torch.Tensor, flow: torch.Tensor, *, detach_warp: bool = True,
                       need_grad: bool = True, max_elements: int = 1 << 24):
    """Closed form in torch ops, chunked over frame pairs so memory stays bounded."""
    x = x.detach().float()
    flow = flow.detach().float()
    b, c, t, h, w = x.shape
    hw, inv_n = h * w, 1.0 / (c * h * w)
    xp = x.permute(0, 2, 1, 3, 4).reshape(b, t, c, hw)  # (B, T, C, hw)
    loss = torch.zeros(b, t - 1, dtype=torch.float64, device=x.device)
    grad = torch.zeros_like(xp) if need_grad else None
    scatter = torch.zeros_like(xp) if need_grad and not detach_warp else None
    chunk = max(1, max_elements // max(1, 6 * c * hw * b))
    for i0 in range(0, t - 1, chunk):
        i1 = min(t - 1, i0 + chunk)
        p = i1 - i0
        fl = flow[:, i0:i1].reshape(b * p, 2, h, w)
        idx, wts = _bilinear_parts(fl, h, w)  # (4, B*p, hw)
        nxt = xp[:, i0 + 1:i1 + 1].reshape(b * p, c, hw)
        warped = sum(nxt.gather(2, idx[k].unsqueeze(1).expand(-1, c, -1)) * wts[k].unsqueeze(1) for k in range(4))
        d = warped - xp[:, i0:i1].reshape(b * p, c, hw)
        loss[:, i0:i1] = d.abs().double().sum(dim=(1, 2)).view(b, p)
        if need_grad:
            s = torch.sign(d) * inv_n
            grad[:, i0:i1] = -s.view(b, p, c, hw)
            if scatter is not None:
                tgt = torch.zeros(b * p, c, hw, dtype=s.dtype, device=s.device)
                for k in range(4):
                    tgt.scatter_add_(2, idx[k].unsqueeze(1).expand(-1, c, -1), s * wts[k].unsqueeze(1))
                scatter[:, i0 + 1:i1 + 1] += tgt.view(b, p, c, hw)
    out_loss = (loss.sum(dim=1) * inv_n).float()
    if not need_grad:
        return out_loss, None
    if scatter is not None:
        grad += scatter
    return out_loss, grad.view(b, t, c, h, w).permute(0, 2, 1, 3, 4).contiguous()


# -- public API -----------------------------------------------------------------------
def warp_l1_grad(x: torch.Tensor, flow: torch.Tensor, *, detach_warp: bool = True, impl: str = "auto",
                 need_grad: bool = True):
    """Fused loss and gradient: ``(loss (B,), grad like x)``, no autograd graph built.

    x (B, C, T, h, w) float, flow (B, T-1, 2, h, w) float, same device. Computed in float32
    and returned in x's dtype (impl="ref", the oracle, computes and returns float64).
    ``need_grad=False`` skips the gradient (returns None).
    """
    check_warp_args(x, flow)
    which = _dispatch.resolve(impl, x.device, _IMPLS)
    if which == "ref":
        loss, grad = warp_l1_grad_ref(x, flow, detach_warp=detach_warp)
        return loss, (grad if need_grad else None)
    fn = {"triton": warp_l1_grad_triton, "native": warp_l1_grad_native, "torch": warp_l1_grad_torch}[which]
    loss, grad = fn(x, flow, detach_warp=detach_warp, need_grad=need_grad)
    return loss.to(x.dtype), (grad.to(x.dtype) if grad is not None else None)


def warp_l1(x: torch.Tensor, flow: torch.Tensor, *, detach_warp: bool = True, impl: str = "auto") -> torch.Tensor:
    """The loss (B,), differentiable with autograd w.r.t. x (backward reuses the fused gradient)."""
    check_warp_args(x, flow)
    if impl == "ref":
        return warp_l1_ref(x, flow, detach_warp=detach_warp)
    return _WarpL1.apply(x, flow, detach_warp, impl)
