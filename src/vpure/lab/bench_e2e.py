"""End-to-end latency (``vpure bench``): per-stage tables, the released-code reference beside
the runtime in the same invocation, CSV rows and a PNG of the stage breakdown. (Past ~400
lines: the VideoPure, clean-route and chart cases share one set of case builders.)

One clip of the configuration's size is encoded to a video file once; every timed run
decodes it (PyAV, the ``decode`` stage), runs the detection gate, then VideoPure with the
configuration's models (random init: latency does not depend on the weights) and DIS flow.
The reference is :class:`~vpure.lab.released_reference.ReleasedVideoPure` on the same
models, decoded clip and flow; parity is identical votes. Cases are backends x precisions:
torch fp32 (the runtime path), torch bf16 on CPU / fp16 on CUDA (UNet and VAE decoder),
ONNX Runtime artefacts (exported on first use into ``engines_dir``) and, asked for with
``compile``, each torch precision's UNet and VAE compiled by Inductor (compiled during the
untimed parity call).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vpure.lab import timing as benchmark
from vpure.runtime import presets
from vpure.runtime.errors import ConfigError
from vpure.runtime.log import get_logger
from vpure.runtime.precision import EMULATED_BF16, native_bf16

STAGES = ("decode", "detect", "flow", "vae_encode", "unet_invert", "unet_denoise", "unet", "sto_and_schedule",
          "vae_decode", "recognize", "vote")

log = get_logger(__name__)


def encode_clip(clip: torch.Tensor, path: Path, fps: int = 25) -> Path:
    """(3, T, H, W) in [0, 1] -> a lossless-ish MPEG-4 file (the decode stage's input)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = clip.shape[-1], clip.shape[-2]
        stream.pix_fmt, stream.bit_rate = "yuv420p", 20_000_000
        for t in range(clip.shape[1]):
            rgb = (clip[:, t].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def default_clip(frames: int, size: int) -> torch.Tensor:
    """A mini-world test clip at the requested size (real photographs, moving object)."""
    from vpure.runtime.miniworld.dataset import WorldConfig, make_clip

    cfg = WorldConfig(frames=frames, size=size, background_short_side=max(160, 2 * size + 8),
                      object_radius=(size * 11 / 64, size * 17 / 64))
    return make_clip("test", 0, cfg).clip


@dataclass
class Pipeline:
    """decode -> detect -> defence, timed per stage; called by the benchmark harness."""

    video: Path
    frames: int
    size: int
    detector: Any
    defence: Any
    device: str
    stages: list[dict[str, float]] = field(default_factory=list)

    def __call__(self):
        from vpure.runtime.purifier import Stopwatch
        from vpure.runtime.stream import StreamConfig, frames as read

        sw = Stopwatch(self.device)
        with sw("decode"):
            rgb = np.stack([f.rgb for _, f in zip(range(self.frames), read(self.video, StreamConfig(size=self.size)))])
            clip = torch.from_numpy(rgb).permute(3, 0, 1, 2)[None].float().div_(255).to(self.device)
        with sw("detect"):
            self.detector(clip)
        r = self.defence(clip)
        self.stages.append(dict(sw.ms) | {k: v for k, v in r.timings_ms.items() if k != "unet_calls"})
        return r


def _same_votes(out, ref) -> str:
    assert torch.equal(out.member_labels, ref.member_labels), "member votes differ"
    assert torch.equal(out.label, ref.label), "final vote differs"
    return f"same votes, max|dlogit|={(out.logits - ref.logits).abs().max().item():.1e}"


def _low_precision_parity(out, ref) -> str:
    agree = int((out.member_labels == ref.member_labels).sum())
    return f"{agree}/{ref.member_labels.numel()} member votes as fp32"  # low precision may move a vote


def _ort_wrap(name: str, comp: str, module, precision: str, engines_dir: Path) -> Callable:
    from vpure.export import export_component  # benchmarks may export; the runtime proper never does

    from vpure.runtime.backends import as_module_call, create_backend
    from vpure.runtime.runconfig import ComponentChoice

    spec = presets.component_spec(name, comp)
    export_component(spec, module, engines_dir, precision, source=f"{name} random-init")
    return as_module_call(create_backend(spec, ComponentChoice(backend="onnxruntime", precision=precision),
                                         engines_dir=engines_dir))


def _cast(fn: Callable, dtype: torch.dtype) -> Callable:
    """``fn`` with its first input cast to ``dtype`` and its output back in float32 (a
    low-precision module behind the fp32 interface VideoPure calls)."""
    return lambda x, *rest: fn(x.to(dtype), *rest).float()


def cases_for(name: str, m, backends: list[str], precisions: list[str], device: str, engines_dir: Path,
              compile: bool = False):
    """(case name, eps_fn, encoder, decoder, parity) for each backend x precision asked;
    ``compile`` adds each torch precision's UNet and VAE compiled by Inductor
    (:func:`~.models.inference.compile_for_inference`, diffusers' own layers)."""
    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.runtime.models.graphed import GraphedEps
    from vpure.runtime.models.rewrites import optimise_for_inference
    from vpure.runtime.models.inference import compile_for_inference, prepare_decoder, prepare_encoder

    out = []
    for backend in backends:
        for p in precisions:
            if backend == "torch" and p == "fp32":
                # the reference keeps diffusers' modules
                unet, enc, dec = (copy.deepcopy(x) for x in (m.unet, m.encoder, m.decoder))
                optimise_for_inference(unet)
                prepare_encoder(enc)
                prepare_decoder(dec)
                out.append(("torch fp32", eps_fn_of(unet), enc, dec, _same_votes))
                if compile:
                    unet, enc, dec = (compile_for_inference(copy.deepcopy(x)) for x in (m.unet, m.encoder, m.decoder))
                    out.append(("torch fp32, Inductor", eps_fn_of(unet), enc, dec, _same_votes))
            elif backend == "torch" and p in ("bf16", "fp16"):
                if (p == "fp16") != (device == "cuda"):
                    continue  # bf16 is the CPU's low precision, fp16 the GPU's
                if p == "bf16" and not native_bf16():
                    log.warning("bench %s: torch bf16 skipped: %s", name, EMULATED_BF16)
                    continue
                dt = torch.bfloat16 if p == "bf16" else torch.float16
                m16 = presets.build(name, device=device, dtype=dt)
                optimise_for_inference(m16.unet)
                prepare_encoder(m16.encoder)
                prepare_decoder(m16.decoder)
                enc16, dec16 = _cast(m16.encoder, dt), _cast(m16.decoder, dt)
                out.append((f"torch {p} UNet+VAE", _cast(eps_fn_of(m16.unet), dt), enc16, dec16,
                            _low_precision_parity))
                if compile:  # diffusers' layers at this precision, the encoder too, compiled
                    mc = presets.build(name, device=device, dtype=dt)
                    unet, enc, dec = (compile_for_inference(x) for x in (mc.unet, mc.encoder, mc.decoder))
                    out.append((f"torch {p} UNet+VAE, Inductor", _cast(eps_fn_of(unet), dt), _cast(enc, dt),
                                _cast(dec, dt), _low_precision_parity))
                if device == "cuda":  # the same fp16 modules, each UNet shape replayed from a CUDA graph
                    out.append((f"torch {p} UNet+VAE, CUDA graphs", _cast(GraphedEps(m16.unet), dt), enc16, dec16,
                                _low_precision_parity))
            elif backend == "onnxruntime" and p in ("fp32", "fp16", "int8"):
                if device != "cpu":
                    continue  # onnxruntime-gpu is not part of this benchmark's machines
                unet = _ort_wrap(name, "unet", m.unet, p, engines_dir)
                enc = _ort_wrap(name, "vae_encoder", m.encoder, "fp32" if p == "int8" else p, engines_dir)
                dec = _ort_wrap(name, "vae_decoder", m.decoder, "fp32" if p == "int8" else p, engines_dir)
                out.append((f"onnxruntime {p}", eps_fn_of(unet), enc, dec,
                            _same_votes if p == "fp32" else _low_precision_parity))
    return out


def bench_config(name: str, *, backends: list[str], precisions: list[str], iters: int = 3,
                 csv_path: str | Path | None = None, engines_dir: Path | None = None,
                 video: Path | None = None, compile: bool = False) -> list[tuple[str, benchmark.Row, Pipeline]]:
    from vpure.runtime.purifier import VideoPure
    from vpure.runtime.detect import Detector
    from vpure.runtime.flow import DISFlow
    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.lab.released_reference import ReleasedVideoPure

    preset = presets.get(name)
    device = "cuda" if preset.gpu_only or torch.cuda.is_available() else "cpu"
    if preset.gpu_only and not torch.cuda.is_available():
        raise ConfigError(f"configuration {name!r} needs a CUDA device (none here)")
    m = presets.build(name, device=device)
    det = Detector(m.recognizer.frame_classifier)
    flow = DISFlow("medium")
    work = Path(tempfile.mkdtemp(prefix="vpure-bench-"))
    src = video or encode_clip(default_clip(preset.frames, preset.size), work / f"{name}.mp4")
    engines_dir = engines_dir or work / "engines"
    ref = Pipeline(src, preset.frames, preset.size, det,
                   ReleasedVideoPure(eps_fn_of(m.unet), m.encoder, m.decoder, m.recognizer, flow), device)
    cases, pipes = [], {"released-equivalent": ref}
    for cname, eps, enc, dec, parity in cases_for(name, m, backends, precisions, device, engines_dir, compile):
        p = Pipeline(src, preset.frames, preset.size, det, VideoPure(eps, enc, dec, m.recognizer, flow), device)
        pipes[cname] = p
        cases.append(benchmark.Case(cname, p, parity))
    cfg = f"{name}: T={preset.frames} {preset.size}x{preset.size}, decode+detect+VideoPure (t*=6, 7 members), {device}"
    rows = benchmark.run("e2e", cfg, benchmark.Case("released-equivalent", ref), cases, device=device,
                         csv_path=csv_path, interleave=True, warmup=1, min_iters=iters, min_time_s=0.0)
    out = []
    for row in rows:
        key = row.case.removesuffix(" (ref)")
        out.append((key, row, pipes[key]))
    print_stages(out)
    print_rates(name, out)
    return out


def stage_p50(p: Pipeline) -> dict[str, float]:
    keys = [k for k in STAGES if any(k in s for s in p.stages)]
    return {k: statistics.median([s.get(k, 0.0) for s in p.stages]) for k in keys}


def print_stages(results) -> None:
    names = [n for n, _, _ in results]
    stages = [k for k in STAGES if any(k in s for _, _, p in results for s in p.stages)]
    print(f"\n  {'stage (ms, p50)':<20}" + "".join(f"{n[:22]:>24}" for n in names))
    for k in stages:
        vals = []
        for _, _, p in results:
            v = [s[k] for s in p.stages if k in s]
            vals.append(f"{statistics.median(v):>24.1f}" if v else f"{'-':>24}")
        print(f"  {k:<20}" + "".join(vals))
    print(f"  {'clips/s':<20}" + "".join(f"{1000.0 / r.p50_ms:>24.3f}" if r.p50_ms == r.p50_ms else f"{'-':>24}"
                                         for _, r, _ in results))


def print_rates(name: str, results) -> None:
    """GFLOP/s each case's counted stages reached (p50 times; :mod:`.flops` counts the work)."""
    from vpure.lab.flops import achieved_rates, clip_flops

    rows = clip_flops(name)
    rates = [achieved_rates(rows, stage_p50(p)) for _, _, p in results]
    print(f"\n  {'GFLOP/s (p50)':<20}" + "".join(f"{n[:22]:>24}" for n, _, _ in results))
    counted = {r.stage for r in rows} | {"unet"}
    for stage in [k for k in STAGES if k in counted]:
        print(f"  {stage:<20}" + "".join(f"{x[stage]:>24.1f}" if stage in x else f"{'-':>24}" for x in rates))
    total = sum(r.flops for r in rows) / 1e9
    print(f"  {'clip total':<20}" + "".join(f"{total * 1000.0 / r.p50_ms:>24.1f}" if r.p50_ms == r.p50_ms
                                            else f"{'-':>24}" for _, r, _ in results))


def stage_chart(path: Path, results_by_config: dict[str, list]) -> Path:
    """Horizontal stacked bars of stage p50 per case, one block per configuration."""
    import cv2

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (90, 90, 200)]
    bars = [(cfg, name, stage_p50(p)) for cfg, res in results_by_config.items() for name, _, p in res if p.stages]
    width, left, bar_h = 1100, 330, 26
    height = 60 + len(bars) * (bar_h + 8) + 64
    img = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(img, "vpure bench: stage breakdown (p50, ms)", (10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
                cv2.LINE_AA)
    def total(st: dict[str, float]) -> float:  # "unet" is the sum of the two phases when they are split
        return sum(v for k, v in st.items() if not (k == "unet" and "unet_invert" in st)) or 1.0

    scale = (width - left - 110) / max((total(st) for _, _, st in bars), default=1.0)
    y = 50
    for cfg, name, st in bars:
        cv2.putText(img, f"{cfg} | {name}"[:42], (10, y + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1,
                    cv2.LINE_AA)
        x = left
        for i, k in enumerate(STAGES):
            if k not in st or (k == "unet" and ("unet_invert" in st)):
                continue
            w = int(round(st[k] * scale))
            cv2.rectangle(img, (x, y), (x + max(w, 1), y + bar_h), colours[i % len(colours)], -1)
            x += w
        cv2.putText(img, f"{total(st):.0f} ms", (x + 6, y + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        y += bar_h + 8
    x = 10
    for i, k in enumerate(STAGES):
        if x + 18 + 9 * len(k) > width:
            x, y = 10, y + 22
        cv2.rectangle(img, (x, y + 8), (x + 14, y + 22), colours[i % len(colours)], -1)
        cv2.putText(img, k, (x + 18, y + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        x += 18 + 9 * len(k) + 12
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img[:, :, ::-1])
    return path


def bench_clean_route(iters: int = 20, csv_path: str | Path | None = None, weights_dir: Path | None = None,
                      precisions: tuple[str, ...] | None = None):
    """The Shield's clean route against the recogniser alone, on the mini-world models: one
    isolated clip, and streams of windows of 16 every 8 frames as ``vpure run`` cuts them (the
    frame classifier's logits of the 8 overlapping frames reused, :class:`CachedFrameLogits`),
    from a file and from a live source, at each of ``precisions`` (:func:`_time_clean_route`)."""
    from vpure.runtime.miniworld.dataset import make_clip
    from vpure.lab.demo import build_shield
    from vpure.runtime.miniworld.models import load_world
    from vpure.runtime.runner import REGISTRY_NAMES
    from vpure.runtime.shield import Shield

    world = load_world(weights_dir)
    shield, _ = build_shield(world, "dis")
    clips = [make_clip("test", i).clip[None] for i in range(8)]
    clean = next((c for c in clips if shield.detector(c).route[0] == "clean"), None)
    if clean is None:
        raise ConfigError("none of the first 8 test clips takes the clean route")

    def make_shield(gate, recognizer):
        return Shield(gate, recognizer, videopure=shield.videopure, comdefend=shield.comdefend, config=shield.config)

    return _time_clean_route("mini-world, 16x64x64, clean test clip", clean,
                             (world.recognizer, REGISTRY_NAMES["recognizer"]),
                             (world.frame_classifier, REGISTRY_NAMES["frame_classifier"]), make_shield, precisions,
                             csv_path=csv_path, warmup=3, min_iters=iters, min_time_s=1.0)


def clean_route_precisions(precisions: tuple[str, ...] | None) -> tuple[str, ...]:
    """The torch CPU precisions of ``precisions`` (default fp32 and bf16) that the clean-route
    benchmarks time: bf16 only where this CPU runs it natively, int8 (the gate's oneDNN plan,
    :mod:`vpure.runtime.models.quantized`) where PyTorch has those operators (else skipped,
    with a warning)."""
    from vpure.runtime.models.quantized import int8_ops_available

    wanted = [p for p in (precisions or ("fp32", "bf16")) if p in ("fp32", "bf16", "int8")]
    if "bf16" in wanted and not native_bf16():
        log.warning("clean route in bf16 skipped: %s", EMULATED_BF16)
        wanted.remove("bf16")
    if "int8" in wanted and not int8_ops_available():
        log.warning("clean route with an int8 gate skipped: this PyTorch lacks oneDNN's quantised convolutions")
        wanted.remove("int8")
    return tuple(wanted)


def _time_clean_route(config: str, x: torch.Tensor, recognizer, gate, make_shield, precisions, csv_path=None,
                      **timing):
    """The recogniser alone on ``x`` against the Shield (``make_shield(gate, recognizer)``) on
    it, and against Shields gating through a :class:`CachedFrameLogits` fed windows that
    overlap the previous one by half, as ``vpure run`` cuts a stream: a file decoded faster
    than the defence runs (each window labels its new frames), and a live source (the
    window's new frames but the last labelled while waiting for it, untimed: ``Runner``'s
    gate_ahead). ``recognizer`` and ``gate`` are (fp32 module, registry name). One interleaved
    run per recogniser precision of :func:`clean_route_precisions` (int8 is the gate's
    alone), the gate at that precision and int8, and in front of an fp32 recogniser at every
    other one too (a gate only labels frames, so a bf16 or int8 gate may well serve an fp32
    recogniser); rows of all runs."""
    from vpure.runtime.frame_caches import CachedFrameLogits

    precisions = clean_route_precisions(precisions)
    t = x.shape[2]
    stride = t // 2

    def parity(out, ref):
        assert torch.equal(out, ref), "labels differ"
        return "same label"

    def cases(gate_net, rec_net, suffix):
        shield = make_shield(gate_net, rec_net)
        cached, live_cached = CachedFrameLogits(gate_net), CachedFrameLogits(gate_net)
        stream_shield, live_shield = make_shield(cached, rec_net), make_shield(live_cached, rec_net)
        window, live = {"k": 0}, {"k": 0}

        def gated():
            r = shield(x)[0]
            assert r.route == "clean", r.route
            return torch.tensor([r.label])

        def streamed():  # the next window: its first half was classified by the previous one
            k = window["k"] = window["k"] + 1
            cached.set_window(list(range(k * stride, k * stride + t)))
            return torch.tensor([stream_shield(x)[0].label])

        def live_arrivals():  # frames of the next window that came before its last one
            k = live["k"] = live["k"] + 1
            live["ids"] = list(range(k * stride, k * stride + t))
            with torch.inference_mode():
                live_cached.prefill(live["ids"][t - stride:t - 1],
                                    live_shield.detector.prepare(x[:, :, t - stride:t - 1]))

        def live_window():
            live_cached.set_window(live["ids"])
            return torch.tensor([live_shield(x)[0].label])

        return [benchmark.Case(f"Shield, clean route{suffix}", gated, parity),
                benchmark.Case(f"Shield, clean route, stream (stride {stride}){suffix}", streamed, parity),
                benchmark.Case(f"Shield, clean route, live stream (stride {stride}){suffix}", live_window, parity,
                               note="frames labelled as they arrive", setup=live_arrivals)]

    rows = []
    gate_at = {p: _torch_at(*gate, p) for p in precisions}  # each precision's gate built once
    for rec_precision in (p for p in precisions if p != "int8"):  # int8: the gate's only
        rec_net = _torch_at(*recognizer, rec_precision)

        def alone():
            with torch.inference_mode():
                return rec_net(x).argmax(-1)

        gates = [p for p in precisions if p in (rec_precision, "int8") or rec_precision == "fp32"]
        runs = [cases(gate_at[p], rec_net, "" if p == "fp32" else f", gate {p}") for p in gates]
        name = "recogniser alone" if rec_precision == "fp32" else f"recogniser alone, {rec_precision}"
        rows += benchmark.run("e2e-clean-route", config, benchmark.Case(name, alone), [c for r in runs for c in r],
                              csv_path=csv_path, interleave=True, **timing)
    return rows


def _torch_at(module: torch.nn.Module, registry_name: str, precision: str):
    """``module`` itself for fp32, else a copy served at ``precision`` by the torch backend
    (as ``vpure run`` serves a component whose config names that precision; int8 calibrated
    on mini-world training clips, image-like whatever the model)."""
    if precision == "fp32":
        return module
    from vpure.runtime import registry
    from vpure.runtime.backends import as_module_call, create_backend
    from vpure.runtime.precision import CalibrationRecipe, Precision
    from vpure.runtime.runconfig import ComponentChoice

    choice = ComponentChoice(precision=Precision(precision),
                             calibration=CalibrationRecipe(source="miniworld") if precision == "int8" else None)
    return as_module_call(create_backend(registry.get(registry_name), choice, module=copy.deepcopy(module)))


def bench_clean_route_deploy(iters: int = 5, frames: int = 32, size: int = 224, gate_size: int = 112,
                             csv_path: str | Path | None = None, precisions: tuple[str, ...] | None = None):
    """The clean route at deployment scale (random weights: latency does not depend on them):
    an I3D ResNet-50 on ``frames`` x ``size`` x ``size`` alone, against the Shield gating with a
    ResNet-18 frame classifier at ``gate_size`` (DetectionConfig.frame_size), isolated, as a
    file stream of windows overlapping by half (CachedFrameLogits) and as a live stream (all
    but each window's last frame labelled while waiting, :func:`_time_clean_route`), at each
    of ``precisions``. The thresholds are set to 1 so that every clip takes the clean route,
    whatever the random gate says."""
    from vpure.runtime.detect import DetectionConfig
    from vpure.runtime.models.frame_classifier import FrameClassifier
    from vpure.runtime.models.i3d import i3d_resnet50
    from vpure.runtime.models.inference import prepare_frame_classifier, prepare_recognizer
    from vpure.runtime.shield import Shield, ShieldConfig

    torch.manual_seed(0)
    rec = i3d_resnet50(num_classes=400).eval()
    gate = FrameClassifier(num_classes=400).eval()
    prepare_recognizer(rec)  # as vpure run's torch path loads them (runner.load_components)
    prepare_frame_classifier(gate)
    cfg = ShieldConfig(detection=DetectionConfig(gamma1=1.0, gamma2=1.0, frame_size=gate_size), dense="comdefend")
    identity = torch.nn.Identity()  # the dense route is never taken here

    def make_shield(gate_net, rec_net):
        return Shield(gate_net, rec_net, comdefend=identity, config=cfg)

    x = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(0))
    return _time_clean_route(f"I3D-R50 {frames}x{size}x{size} + ResNet-18 gate at {gate_size}, random weights", x,
                             (rec, "i3d_nl5_r50"), (gate, "frame_classifier"), make_shield, precisions,
                             csv_path=csv_path, warmup=1, min_iters=iters, min_time_s=0.0)
