"""Arithmetic of one purified clip per stage (``vpure bench --flops``), counted, not timed.

Each network of a preset is built on PyTorch's meta device (no weights are allocated, so the
1.41B-parameter ``modelscope`` UNet counts on any laptop) and called once at the shapes
VideoPure gives it, under :class:`torch.utils.flop_counter.FlopCounterMode`: matrix products,
convolutions and attention, two operations per multiply-add; norms, activations, the STO's
warp-L1 gradient and DIS flow (OpenCV, not a tensor program) are left out. Attention on
meta tensors runs PyTorch's math decomposition (two batched products, counted); CPU tensors
take the flash kernel, which the counter does not know, so it is given the same formula
here (:func:`count_flops` on real CPU tensors agrees with meta). How often each
network runs comes from running :func:`~.videopure.purify_latents` itself with the same
config on a 2x2 latent, so the counts follow the config (t*, steps, members) rather than
being written down here. Beside a measured stage time this gives the rate a stage reaches;
beside a latency target, the rate a device must sustain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vpure.runtime import presets
from vpure.runtime.detect import Detector
from vpure.runtime.videopure import VideoPureConfig, purify_latents


@dataclass(frozen=True)
class StageFlops:
    stage: str  # the stage name of `vpure bench`'s table
    calls: int  # network calls per clip (the decoder and recogniser: clips of T frames)
    flops_per_call: int

    @property
    def flops(self) -> int:
        return self.calls * self.flops_per_call


def _cpu_flash_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes: the counter passes tensors' shapes


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention}


def count_flops(fn, *args) -> int:
    """Operations of one call of ``fn(*args)`` (meta tensors are enough)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def purify_calls(frames: int, config: VideoPureConfig | None = None) -> tuple[int, int, int]:
    """(inversion UNet calls, denoising UNet calls, members) of one clip under ``config``,
    from a run of purify_latents on a 2x2 latent with a zero noise prediction."""
    calls = {"invert": 0, "denoise": 0}

    def counting(kind):
        def eps(z, t):
            calls[kind] += 1
            return torch.zeros_like(z)
        return eps

    z0 = torch.zeros(1, 4, frames, 2, 2)
    flow = torch.zeros(1, frames - 1, 2, 2, 2)
    members = purify_latents(counting("denoise"), z0, flow, config, invert_eps_fn=counting("invert"))
    return calls["invert"], calls["denoise"], len(members)


def clip_flops(name: str, config: VideoPureConfig | None = None) -> list[StageFlops]:
    """Per-stage arithmetic of one clip of preset ``name`` through detect + VideoPure."""
    p = presets.get(name)
    m = presets.build(name, device="meta")
    config = config or VideoPureConfig()
    n_inv, n_den, members = purify_calls(p.frames, config)
    h = p.size // 8
    x = torch.empty(1, 3, p.frames, p.size, p.size, device="meta")
    z = torch.empty(1, 4, p.frames, h, h, device="meta")
    unet = count_flops(m.unet, z, config.timesteps[-1])
    return [
        StageFlops("detect", 1, count_flops(Detector(m.recognizer.frame_classifier).frame_labels, x)),
        StageFlops("vae_encode", 1, count_flops(m.encoder, x)),
        StageFlops("unet_invert", n_inv, unet),
        StageFlops("unet_denoise", n_den, unet),
        StageFlops("vae_decode", members, count_flops(m.decoder, z)),
        StageFlops("recognize", members, count_flops(m.recognizer, x)),
    ]


def print_clip_flops(name: str, target_s: float | None = None) -> list[StageFlops]:
    """The per-stage table; with ``target_s``, the sustained rate that latency needs."""
    p = presets.get(name)
    rows = clip_flops(name)
    total = sum(r.flops for r in rows)
    print(f"\n## {name}: arithmetic of one clip (T={p.frames} at {p.size}x{p.size}, detect + VideoPure, "
          f"counted on the meta device)")
    print(f"  {'stage':<14}{'calls':>6}{'GFLOP/call':>14}{'GFLOP':>12}{'share':>8}")
    for r in rows:
        print(f"  {r.stage:<14}{r.calls:>6}{r.flops_per_call / 1e9:>14.2f}{r.flops / 1e9:>12.1f}"
              f"{100 * r.flops / total:>7.1f}%")
    print(f"  {'total':<14}{'':>6}{'':>14}{total / 1e9:>12.1f}")
    if target_s:
        print(f"  {target_s:g} s per clip needs {total / target_s / 1e12:.3g} TFLOP/s sustained over these stages")
    return rows


def achieved_rates(rows: list[StageFlops], stage_ms: dict[str, float]) -> dict[str, float]:
    """GFLOP/s each counted stage reached, from a case's p50 stage times; ``unet`` is both
    UNet phases together (the released-code reference times them as one stage)."""
    work = {r.stage: r.flops for r in rows}
    work["unet"] = work.get("unet_invert", 0) + work.get("unet_denoise", 0)
    return {k: f / (stage_ms[k] * 1e6) for k, f in work.items() if stage_ms.get(k, 0) > 0}
