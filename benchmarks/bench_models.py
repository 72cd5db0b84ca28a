"""Forward latency per registered component (tiny configs) and the real-size recognisers and
flow networks at one clip, torch eager fp32 on this machine; ``--conv3d`` times each 3-D
recogniser on one clip with PyTorch's own Conv3d kernel choice against BlockedConv3d (every
layer on oneDNN), ``--conv-layout`` the recognisers and frame classifiers with default against
channels-last convolution weights, ``--fused`` the frame classifiers and the I3D and SlowFast
recognisers as loaded before (eager) against their fused oneDNN plans, ``--subpixel`` the VAE
decoders (and the `small` UNet) with diffusers' upsample-then-convolve layers against
:class:`SubpixelUpsample`, ``--native-attention`` PyTorch's attention kernel against the native
small-head kernel at the `small` UNet's attention shapes, ``--int8`` the frame classifiers'
fused fp32 and bf16 plans against their int8 plan (:mod:`vpure.runtime.models.quantized`),
``--group-norm`` group norm + SiLU at the `small` VAE decoder's maps in PyTorch, Inductor and
the native kernel; all interleaved, outputs compared.

Run from the repository root:
  .venv/bin/python -m benchmarks.bench_models [--tiny-only] [--conv3d] [--conv-layout] [--fused] [--subpixel]
      [--native-attention] [--int8] [--group-norm] [--csv PATH]
"""

from __future__ import annotations

import argparse
import copy

import torch

from vpure.lab import timing as benchmark

from vpure.runtime import registry


def _real_size():
    from vpure.runtime.models.i3d import i3d_nl5_resnet50
    from vpure.runtime.models.raft import RAFTFlow, raft_large, raft_small
    from vpure.runtime.models.slowfast import slowfast_r50

    g = torch.Generator().manual_seed(0)
    clip32 = torch.rand(1, 3, 32, 224, 224, generator=g)
    clip16 = clip32[:, :, :16].contiguous()
    yield "raft_large (10 iters), 31 pairs 224x224", RAFTFlow(raft_large(10), pairs_per_call=8), clip32
    yield "raft_small (10 iters), 31 pairs 224x224", RAFTFlow(raft_small(10), pairs_per_call=8), clip32
    yield "i3d_nl5_r50, 32x224x224", i3d_nl5_resnet50(400).eval(), clip32
    yield "slowfast_r50, 32x224x224", slowfast_r50(400).eval(), clip32
    try:
        from transformers import VideoMAEConfig, VideoMAEForVideoClassification

        from vpure.runtime.models.videomae import VideoMAERecognizer

        vmae = VideoMAERecognizer(VideoMAEForVideoClassification(VideoMAEConfig(num_labels=400))).eval()
        yield "videomae_base, 16x224x224", vmae, clip16
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        print(f"videomae skipped: {e}")


def _recognisers_for_conv3d():
    from vpure.runtime.miniworld.models import load
    from vpure.runtime.models.i3d import i3d_nl5_resnet50
    from vpure.runtime.models.slowfast import slowfast_r50

    g = torch.Generator().manual_seed(0)
    yield "mini-world I3D (basic blocks), 16x64x64", load("recognizer").eval(), torch.rand(1, 3, 16, 64, 64, generator=g)
    yield "i3d_nl5_r50, 32x112x112", i3d_nl5_resnet50(400).eval(), torch.rand(1, 3, 32, 112, 112, generator=g)
    yield "i3d_nl5_r50, 32x224x224", i3d_nl5_resnet50(400).eval(), torch.rand(1, 3, 32, 224, 224, generator=g)
    yield "slowfast_r50, 32x224x224", slowfast_r50(400).eval(), torch.rand(1, 3, 32, 224, 224, generator=g)


def _call(fn, *args):
    with torch.inference_mode():
        return fn(*args)


def _same_logits(out, ref):
    d = (out - ref).abs().max().item()
    assert d < 1e-3 * max(1.0, ref.abs().max().item()), f"logits differ by {d}"
    return f"max|dlogit|={d:.1e}"


def _compare(group: str, networks, variant, names: tuple[str, str], csv_path, iters: int, small_iters: int,
             small) -> list:
    """Each (name, module, clip) of ``networks`` against a copy changed in place by ``variant``
    (-> number of layers changed), timed in interleaved rounds, logits compared; clips for
    which ``small(clip)`` holds get ``small_iters`` rounds and two warm-ups."""
    import copy

    rows = []
    for name, module, clip in networks:
        changed = copy.deepcopy(module)
        n = variant(changed)
        fast = small(clip)
        rows += benchmark.run(group, f"{name}, {n} layers changed",
                              benchmark.Case(names[0], lambda m=module, x=clip: _call(m, x)),
                              [benchmark.Case(names[1], lambda m=changed, x=clip: _call(m, x), _same_logits)],
                              csv_path=csv_path, interleave=True, warmup=2 if fast else 1,
                              min_iters=small_iters if fast else iters, min_time_s=0.0)
    return rows


def bench_conv3d(csv_path=None, iters: int = 5) -> list:
    """Each recogniser on one clip: PyTorch's kernel choice (slow_conv3d below its size
    threshold) against :class:`BlockedConv3d`, timed in interleaved rounds."""
    from vpure.runtime.models.conv import use_blocked_conv3d

    return _compare("conv3d_backend", _recognisers_for_conv3d(), use_blocked_conv3d,
                    ("nn.Conv3d (PyTorch's choice)", "BlockedConv3d (oneDNN)"), csv_path, iters, 20,
                    lambda clip: clip.shape[-1] <= 112)


def _networks_for_layout():
    from vpure.runtime.miniworld.models import load
    from vpure.runtime.models.conv import use_blocked_conv3d
    from vpure.runtime.models.frame_classifier import FrameClassifier
    from vpure.runtime.models.i3d import i3d_nl5_resnet50

    g = torch.Generator().manual_seed(0)
    rec = load("recognizer").eval()
    use_blocked_conv3d(rec)
    yield "mini-world I3D, 16x64x64", rec, torch.rand(1, 3, 16, 64, 64, generator=g)
    gate = load("frame_classifier").eval()
    for t in (1, 8, 16):
        yield f"mini-world frame classifier, {t} frame(s) 64x64", gate, torch.rand(1, 3, t, 64, 64, generator=g)
    for size in (112, 224):
        rec = i3d_nl5_resnet50(400).eval()
        use_blocked_conv3d(rec)
        yield f"i3d_nl5_r50, 32x{size}x{size}", rec, torch.rand(1, 3, 32, size, size, generator=g)
    gate = FrameClassifier(num_classes=400).eval()
    for t in (1, 16):
        yield f"ResNet-18 frame classifier, {t} frame(s) 112x112", gate, torch.rand(1, 3, t, 112, 112, generator=g)


def bench_conv_layout(csv_path=None, iters: int = 5) -> list:
    """Each recogniser and frame classifier as ``vpure run`` loads it on CPU, with its
    convolution weights in PyTorch's default layout against channels-last
    (:func:`use_channels_last`), timed in interleaved rounds."""
    from vpure.runtime.models.conv import use_channels_last

    return _compare("conv_layout", _networks_for_layout(), use_channels_last,
                    ("default layout", "channels-last weights"), csv_path, iters, 40,
                    lambda clip: clip.shape[-1] <= 112 and clip.shape[2] <= 16)


def _fusable_networks():
    from vpure.runtime.miniworld.models import load
    from vpure.runtime.models.conv import use_blocked_conv3d, use_channels_last
    from vpure.runtime.models.frame_classifier import FrameClassifier
    from vpure.runtime.models.i3d import i3d_resnet50
    from vpure.runtime.models.slowfast import slowfast_r50

    g = torch.Generator().manual_seed(0)
    gate = load("frame_classifier").eval()
    use_channels_last(gate)
    for t in (1, 8, 16):
        yield f"mini-world frame classifier, {t} frame(s) 64x64", gate, torch.rand(1, 3, t, 64, 64, generator=g)
    gate = FrameClassifier(num_classes=400).eval()
    use_channels_last(gate)
    for t in (1, 32):
        yield f"ResNet-18 frame classifier, {t} frame(s) 112x112", gate, torch.rand(1, 3, t, 112, 112, generator=g)
    rec = load("recognizer").eval()
    use_blocked_conv3d(rec)
    yield "mini-world I3D, 16x64x64", rec, torch.rand(1, 3, 16, 64, 64, generator=g)
    rec = i3d_resnet50(num_classes=400).eval()
    use_blocked_conv3d(rec)
    for size in (112, 224):
        yield f"I3D-R50, 32x{size}x{size}", rec, torch.rand(1, 3, 32, size, size, generator=g)
    rec = slowfast_r50(400).eval()
    use_blocked_conv3d(rec)
    yield "SlowFast-R50, 32x224x224", rec, torch.rand(1, 3, 32, 224, 224, generator=g)


def bench_fused(csv_path=None, iters: int = 5) -> list:
    """Each frame classifier and I3D / SlowFast recogniser as ``vpure run`` loaded it before (eager;
    channels-last weights for the frame classifiers, BlockedConv3d for the recognisers)
    against its fused plan (:func:`vpure.runtime.models.fused.use_fused_inference`: batch norm
    folded, ReLU and residual add fused into the convolutions, weights prepacked), timed in
    interleaved rounds."""
    from vpure.runtime.models.fused import use_fused_inference

    def fuse(m):
        if not use_fused_inference(m):
            raise SystemExit("this PyTorch build lacks the oneDNN fused-convolution operators")
        return sum(1 for _ in m.modules() if isinstance(_, torch.nn.modules.batchnorm._BatchNorm))

    return _compare("fused", _fusable_networks(), fuse, ("eager", "fused oneDNN plan"),
                    csv_path, iters, 40, lambda clip: clip.shape[-1] <= 112 and clip.shape[2] <= 16)


def bench_int8_gate(csv_path=None, iters: int = 40) -> list:
    """Each frame classifier (the mini-world's, calibrated on its training clips; a ResNet-18 at
    112 px, random weights, calibrated on image-like noise) through its fused fp32 plan
    (the reference), its bf16 plan where this CPU has native bf16, and its int8 plan;
    interleaved rounds. Parity: the int8 logits' SQNR against fp32 and the share of frames
    whose label agrees."""
    import copy

    from vpure.runtime.miniworld.dataset import make_clip
    from vpure.runtime.miniworld.models import load
    from vpure.runtime.models.frame_classifier import FrameClassifier
    from vpure.runtime.models.fused import use_fused_inference
    from vpure.runtime.models.quantized import Int8FramePlan, int8_ops_available
    from vpure.runtime.precision import native_bf16

    if not int8_ops_available():
        raise SystemExit("this PyTorch build lacks oneDNN's quantised convolution operators")
    g = torch.Generator().manual_seed(0)
    mini = load("frame_classifier").eval()
    mini_cal = [make_clip("train", j).clip[None] for j in range(16)]
    big = FrameClassifier(num_classes=400).eval()
    big_cal = [torch.rand(1, 3, 8, 112, 112, generator=g) for _ in range(4)]
    rows = []
    for name, model, cal, clip in [
            ("mini-world frame classifier, 16 frames 64x64", mini, mini_cal, make_clip("test", 0).clip[None]),
            ("ResNet-18 frame classifier, 32 frames 112x112", big, big_cal,
             torch.rand(1, 3, 32, 112, 112, generator=g))]:
        int8 = Int8FramePlan(model, cal)
        use_fused_inference(model)
        ref = _call(model, clip)

        def agree(out, ref=ref):
            sqnr = 10 * torch.log10(ref.pow(2).mean() / (out.float() - ref).pow(2).mean())
            return f"SQNR {sqnr:.1f} dB, labels {(out.argmax(-1) == ref.argmax(-1)).float().mean():.0%}"

        cases = [benchmark.Case("int8 plan", lambda p=int8, x=clip: _call(p, x), agree)]
        if native_bf16():
            bf16 = copy.deepcopy(model).to(torch.bfloat16)
            use_fused_inference(bf16)
            xb = clip.to(torch.bfloat16)
            cases.insert(0, benchmark.Case("bf16 plan", lambda m=bf16, x=xb: _call(m, x), agree))
        rows += benchmark.run("int8_gate", name, benchmark.Case("fp32 plan", lambda m=model, x=clip: _call(m, x)),
                              cases, csv_path=csv_path, interleave=True, warmup=2, min_iters=iters, min_time_s=0.0)
    return rows


class _MemberDecode(torch.nn.Module):
    """VideoPure's decode of its members: latents (M, 4, T, h, w) through ``decode_frames``
    (on CPU a few frames per decoder call)."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from vpure.runtime.purifier import decode_frames

        return decode_frames(self.decoder, z)


def _upsampling_networks():
    from vpure.runtime import presets
    from vpure.runtime.miniworld.models import load
    from vpure.runtime.models.diffusion import VAEDecoder

    g = torch.Generator().manual_seed(0)
    yield ("small VAE decoder, 7 members x 16 frames at 112", _MemberDecode(presets.build("small").decoder),
           torch.randn(7, 4, 16, 14, 14, generator=g))
    yield ("mini-world VAE decoder, 7 members x 16 frames at 64", _MemberDecode(VAEDecoder(load("vae")).eval()),
           torch.randn(7, 4, 16, 8, 8, generator=g))


def bench_subpixel(csv_path=None, iters: int = 5) -> list:
    """The VAE decoders VideoPure runs (the `small` preset's, the mini-world's) with diffusers'
    ``Upsample2D`` layers (nearest 2x, then a 3x3 convolution) against
    :func:`~vpure.runtime.models.rewrites.use_subpixel_upsampling` (each output phase a 2x2
    convolution on the low-resolution input), timed in interleaved rounds."""
    from vpure.runtime.models.rewrites import use_subpixel_upsampling

    return _compare("subpixel", _upsampling_networks(), use_subpixel_upsampling,
                    ("Upsample2D (upsample, then 3x3)", "SubpixelUpsample (2x2 per phase)"),
                    csv_path, iters, 10, lambda z: z.shape[-1] <= 8)


# (batch, query length, key length, heads) of every attention call in one `small` UNet call
# (16 latent frames at 14x14; 8-channel heads), with how many calls of each shape it makes.
SMALL_UNET_ATTENTION = [((196, 16, 16, 8), 12), ((16, 196, 196, 8), 5), ((16, 196, 77, 8), 5), ((16, 49, 49, 16), 5),
                        ((16, 49, 77, 16), 5), ((49, 16, 16, 16), 10), ((16, 16, 16, 32), 15), ((16, 16, 77, 32), 5)]


def bench_native_attention(csv_path=None, iters: int = 20) -> list:
    """PyTorch's ``scaled_dot_product_attention`` (per-head transposes in and out, as diffusers'
    processor calls it) against :func:`vpure.kernels.attention.small_head_attention` on the
    projections' layout, at each attention shape of the `small` UNet, fp32 and bf16; interleaved
    rounds, outputs compared. Inference (compiled or eager) uses the native kernel only where
    its AVX-512 copy runs, so elsewhere this reports the portable copy and says so."""
    from vpure.kernels.attention import native_attention_available, small_head_attention

    if not native_attention_available():
        print("native attention: no AVX-512 on this CPU: timing the portable copy, which inference does not use")

    def sdpa(q, k, v, heads):
        b, lq, c = q.shape
        qh, kh, vh = (t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, lq, c)

    def close(out, ref):
        d = (out.float() - ref.float()).abs().max().item()
        assert d < (2e-2 if out.dtype == torch.bfloat16 else 1e-4), f"outputs differ by {d}"
        return f"max|d|={d:.1e}"

    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for (b, lq, lk, heads), calls in SMALL_UNET_ATTENTION:
            q, k, v = (torch.randn(b, n, heads * 8, generator=g).to(dtype) for n in (lq, lk, lk))
            name = f"{str(dtype)[6:]} B={b} Lq={lq} Lk={lk} heads={heads} (x{calls} per UNet call)"
            rows += benchmark.run("native attention", name,
                                  benchmark.Case("SDPA", lambda q=q, k=k, v=v, h=heads: _call(sdpa, q, k, v, h)),
                                  [benchmark.Case("small_head_attention",
                                                  lambda q=q, k=k, v=v, h=heads: _call(small_head_attention, q, k, v, h),
                                                  close)],
                                  csv_path=csv_path, interleave=True, warmup=2, min_iters=iters, min_time_s=0.0)
    return rows


# The `small` VAE decoder's group norms for 8 frames: (channels, side) per map, groups 32.
SMALL_DECODER_NORMS = ((128, 14), (128, 28), (128, 56), (64, 112), (32, 112))


def bench_group_norm(csv_path=None, iters: int = 20) -> list:
    """Group norm + SiLU as PyTorch runs it eagerly (the reference), as Inductor compiles it
    with frozen weights (:func:`~vpure.runtime.models.inference.compile_for_inference` on a
    ``GroupNorm`` + ``SiLU`` pair, as the compiled VAE had them) and as
    :func:`vpure.kernels.group_norm.group_norm` (native), at the `small` VAE decoder's maps for
    8 frames, fp32 and bf16, NCHW and channels-last; interleaved rounds, outputs compared."""
    from vpure.kernels.group_norm import group_norm_native
    from vpure.runtime.memory import retain_cpu_memory
    from vpure.runtime.models.inference import compile_for_inference

    retain_cpu_memory()  # as vpure's commands run: a fresh 25 MB output per call would time page faults

    def close(out, ref):
        d = (out.float() - ref.float()).abs().max().item()
        assert d < (0.07 if out.dtype == torch.bfloat16 else 1e-4), f"outputs differ by {d}"
        return f"max|d|={d:.1e}"

    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for fmt, layout in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "channels-last")):
            for c, side in SMALL_DECODER_NORMS:
                x = torch.randn(8, c, side, side, generator=g).to(dtype).contiguous(memory_format=fmt)
                eager = torch.nn.Sequential(torch.nn.GroupNorm(32, c, eps=1e-6), torch.nn.SiLU()).eval()
                with torch.no_grad():
                    eager[0].weight.copy_(torch.rand(c, generator=g) + 0.5)
                    eager[0].bias.copy_(torch.randn(c, generator=g) * 0.1)
                eager.to(dtype)
                torch._dynamo.reset()  # Sequential.forward is one code object: past Dynamo's cache limit it runs eagerly
                compiled = compile_for_inference(copy.deepcopy(eager))
                norm = eager[0]
                name = f"{str(dtype)[6:]} {layout} 8x{c}x{side}x{side}, 32 groups"
                rows += benchmark.run(
                    "group norm", name, benchmark.Case("PyTorch eager", lambda m=eager, x=x: _call(m, x)),
                    [benchmark.Case("Inductor, frozen", lambda m=compiled, x=x: _call(m, x), close),
                     benchmark.Case("native", lambda n=norm, x=x: _call(group_norm_native, x, 32, n.weight, n.bias,
                                                                          n.eps, True), close)],
                    csv_path=csv_path, interleave=True, warmup=2, min_iters=iters, min_time_s=0.0)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny-only", action="store_true")
    p.add_argument("--conv3d", action="store_true", help="only the Conv3d kernel comparison")
    p.add_argument("--conv-layout", action="store_true",
                   help="only the convolution weight layout comparison (default vs channels-last)")
    p.add_argument("--fused", action="store_true",
                   help="only the frame classifiers and I3D/SlowFast recognisers, eager against their fused plans")
    p.add_argument("--subpixel", action="store_true",
                   help="only the VAE decoders, diffusers' Upsample2D against SubpixelUpsample")
    p.add_argument("--native-attention", action="store_true",
                   help="only the `small` UNet's attention shapes, PyTorch's kernel against the native one")
    p.add_argument("--csv", default="benchmarks/results/results.csv", help="CSV to append rows to ('' for none)")
    p.add_argument("--group-norm", action="store_true",
                   help="only group norm + SiLU at the `small` decoder's maps: PyTorch eager, Inductor, native")
    p.add_argument("--int8", action="store_true",
                   help="only the frame classifiers' fused fp32 and bf16 plans against their int8 plan")
    args = p.parse_args(argv)
    args.csv = args.csv or None
    only = {"int8": bench_int8_gate, "group_norm": bench_group_norm, "native_attention": bench_native_attention,
            "subpixel": bench_subpixel, "fused": bench_fused, "conv3d": bench_conv3d, "conv_layout": bench_conv_layout}
    for flag, bench in only.items():  # the first flag given runs alone
        if getattr(args, flag):
            bench(args.csv)
            return
    for spec in registry.components():
        module = spec.build(seed=0)
        inputs = spec.sample_inputs(seed=0)

        def fwd(m=module, x=inputs):
            with torch.inference_mode():
                return m(*x.values())

        benchmark.run("model_forward", f"{spec.name} tiny {dict(spec.dims('opt'))}", benchmark.Case(spec.name, fwd),
                      [], csv_path=args.csv, min_iters=5, min_time_s=0.5)
    if args.tiny_only:
        return
    for name, module, clip in _real_size():
        def fwd(m=module, x=clip):
            with torch.inference_mode():
                return m(x)

        benchmark.run("model_forward", name, benchmark.Case(name.split(",")[0], fwd), [], csv_path=args.csv,
                      min_iters=3, min_time_s=0.0, warmup=1)


if __name__ == "__main__":
    main()
