"""The lean runtime behind ``vpure run``: stream -> windows -> Shield -> one JSON line per clip.

Latency by design:

- every component is loaded once (torch modules, or engine backends chosen per component
  by the :class:`~vpure.runtime.runconfig.RuntimeConfig`) and reused for every clip;
- decoding runs on its own thread into a bounded queue (:mod:`vpure.runtime.stream`);
- the window clip is one preallocated tensor rewritten in place;
- clean clips cost the frame classifier and the recogniser only: flow, the VAE and the
  UNet are touched on the dense route alone;
- the frame classifier labels each frame once and optical flow is computed once per frame
  pair; both are reused by every overlapping window (:class:`CachedFrameLogits`,
  :class:`CachedFlow`), so with the default stride of half a window the gate costs half a
  window of frame classifications per clip; VideoPure decodes its members in batches;
- on a live source the gate labels each frame while the runner waits for the next one
  (``gate_ahead``): a clean window then costs the recogniser and its last frame's label.

Robustness: a clip whose processing fails (an engine error, a NaN) produces an error
record and the run goes on; ``max_consecutive_failures`` failures in a row stop it with a
clear message. Every record is flushed as soon as it is written. Ctrl-C stops decoding,
finishes the summary and returns.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from .config import ConfigBase, check
from .errors import InputError, NonFiniteOutput, VpureError
from .frame_caches import CachedFlow, CachedFrameLogits
from .log import get_logger
from .records import OutputClosed, OutputError, RecordSink
from .runconfig import RuntimeConfig
from .shield import ShieldConfig
from .stream import DecodeThread, StreamConfig, Windows
from .videopure import VideoPureConfig

log = get_logger(__name__)

MODEL_SETS = ("miniworld", "tiny")
MAX_WINDOW = 512  # frames per clip: recognisers take 8-64; the bound keeps a typo from allocating gigabytes
FLOWS = ("raft", "dis")


@dataclass(frozen=True)
class RunConfig(ConfigBase):
    """Everything ``vpure run`` does, in one TOML-able object."""

    window: int = 16  # frames per clip (the models' T)
    stride: int = 8  # kept frames between clip starts
    stream: StreamConfig = field(default_factory=StreamConfig)
    shield: ShieldConfig = field(default_factory=ShieldConfig)
    videopure: VideoPureConfig = field(default_factory=lambda: VideoPureConfig(rescale_to_size=True))
    flow: str = "raft"  # raft (the model set's trained RAFT) or dis (OpenCV DIS medium)
    models: str = "miniworld"  # the shipped mini-world models, or tiny random-init ones (tests)
    weights: Path | None = None  # mini-world weights folder (default: shipped)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # backend + precision per component
    max_consecutive_failures: int = 5
    # Label frames for the gate while waiting for the next one (see Runner.run).
    gate_ahead: bool = True

    def validate(self) -> None:
        check(2 <= self.window <= MAX_WINDOW, f"RunConfig.window must be in [2, {MAX_WINDOW}], got {self.window}")
        check(1 <= self.stride <= MAX_WINDOW, f"RunConfig.stride must be in [1, {MAX_WINDOW}], got {self.stride}")
        check(self.flow in FLOWS, f"RunConfig.flow {self.flow!r} is not one of {FLOWS}")
        check(self.models in MODEL_SETS, f"RunConfig.models {self.models!r} is not one of {MODEL_SETS}")
        check(self.max_consecutive_failures >= 1, "RunConfig.max_consecutive_failures must be >= 1")


@dataclass
class Components:
    """The networks of one deployment, each with its torch module's call signature."""

    frame_classifier: Callable  # (B, 3, T, H, W) -> (B, T, K)
    recognizer: Callable  # (B, 3, T, H, W) -> (B, K)
    unet: Callable  # (latents, timestep tensor) -> eps
    encoder: Callable
    decoder: Callable
    comdefend: Callable
    raft: Callable | None  # (image1, image2) -> flow, or None (DIS)
    class_names: tuple[str, ...] = ()
    specs: dict[str, Any] = field(default_factory=dict)  # registry name -> spec with this set's profile


# runner field -> registry component it deploys as
REGISTRY_NAMES = {"frame_classifier": "frame_classifier", "recognizer": "i3d_nl5_r50", "unet": "unet",
                  "encoder": "vae_encoder", "decoder": "vae_decoder", "comdefend": "comdefend", "raft": "raft"}


def load_components(cfg: RunConfig) -> Components:
    """The model set ``cfg.models`` as torch modules, then engine backends where the runtime config says so."""
    from . import presets, registry
    from .memory import retain_cpu_memory

    retain_cpu_memory()  # freed activations stay in the process: no fresh pages per call
    device = torch.device(cfg.runtime.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import BackendUnavailable

        raise BackendUnavailable(f"runtime.device is {cfg.runtime.device!r} but torch sees no CUDA device here "
                                 f"(torch {torch.__version__}); set device = \"cpu\" to run on the CPU")

    if cfg.models == "miniworld":
        from .miniworld.dataset import CLASSES
        from .miniworld.models import load_world

        w = load_world(cfg.weights, prepare=False)  # prepared below, per how each component is served
        comps = Components(w.frame_classifier, w.recognizer, w.unet, w.encoder, w.decoder, w.comdefend, w.raft,
                           CLASSES, {r: presets.component_spec("mini", r) for r in REGISTRY_NAMES.values()})
    else:
        comps = Components(*(registry.get(r).build(seed=0) for r in REGISTRY_NAMES.values()),
                           specs={r: registry.get(r) for r in REGISTRY_NAMES.values()})
    from .models.inference import prepare_decoder, prepare_encoder, prepare_frame_classifier, prepare_recognizer

    def torch_module(fld):  # served eagerly by torch: the eager rewrites apply (a compiled one keeps its layers)
        choice, module = cfg.runtime.components.get(REGISTRY_NAMES[fld]), getattr(comps, fld)
        return isinstance(module, torch.nn.Module) and (choice is None or choice.backend == "torch"
                                                        and not choice.compile)

    if torch_module("recognizer"):
        prepare_recognizer(comps.recognizer)
    if torch_module("frame_classifier"):
        prepare_frame_classifier(comps.frame_classifier)
    if torch_module("encoder"):
        prepare_encoder(comps.encoder)
    if torch_module("decoder"):
        prepare_decoder(comps.decoder)
    if torch_module("unet"):
        from .models.diffusion import EpsUNet
        from .models.rewrites import fold_temporal_convs, optimise_for_inference

        if isinstance(comps.unet, EpsUNet):  # torch inference only: exporters see diffusers' modules
            optimise_for_inference(comps.unet)
        else:
            fold_temporal_convs(comps.unet)
    if device.type != "cpu":  # torch-served modules run where the runtime says, not silently on the CPU
        for fld in REGISTRY_NAMES:
            if isinstance(getattr(comps, fld), torch.nn.Module):
                setattr(comps, fld, getattr(comps, fld).to(device))
    key = None
    for fld, reg in REGISTRY_NAMES.items():
        choice = cfg.runtime.components.get(reg)
        if choice is None or choice.backend == "torch" and choice.precision.value == "fp32" and not choice.compile:
            continue
        from .artifacts import Trust, engines_key, source_hash
        from .backends import as_module_call, create_backend

        spec, module, trust = comps.specs[reg], getattr(comps, fld), None
        if choice.backend != "torch":  # an engine: it must come from these weights (and be signed, with a key)
            key = key or engines_key(cfg.runtime.engines_key_file)
            trust = Trust(source_hash(module, _weight_files(cfg, fld)), key, cfg.runtime.allow_stale)
        backend = create_backend(spec, choice, module=module, device=cfg.runtime.device,
                                 engines_dir=cfg.runtime.engines_dir, reuse_outputs=False, trust=trust)
        setattr(comps, fld, as_module_call(backend))
    return comps


def _weight_files(cfg: RunConfig, fld: str) -> list[Path]:
    """The files component ``fld`` of the model set was loaded from (none for random-init ones)."""
    if cfg.models != "miniworld":
        return []
    from .miniworld.models import weights_path

    return [weights_path({"encoder": "vae", "decoder": "vae"}.get(fld, fld), cfg.weights)]


def build_shield(comps: Components, cfg: RunConfig):
    """(Shield, CachedFlow) over ``comps``."""
    from .purifier import VideoPure
    from .flow import DISFlow
    from .models.raft import RAFTFlow
    from .shield import Shield

    if cfg.flow == "raft" and comps.raft is not None:
        if isinstance(comps.raft, torch.nn.Module):
            base = RAFTFlow(comps.raft, pairs_per_call=16)
        else:  # an engine: call it pair-batched like RAFTFlow does, within its batch profile
            from .purifier import profile_max

            def base(frames, input_range="unit", f=comps.raft, k=profile_max(comps.raft, "B")):
                x = frames[0].transpose(0, 1)  # (T, 3, H, W)
                a, b = x[:-1], x[1:]
                step = k or len(a)
                return torch.cat([f(a[i:i + step].contiguous(), b[i:i + step].contiguous())
                                  for i in range(0, len(a), step)])[None]
    else:
        base = DISFlow("medium")
    flow = CachedFlow(base)
    vp = VideoPure(_eps_fn(comps.unet), comps.encoder, comps.decoder, comps.recognizer, flow, cfg.videopure)
    frames = CachedFrameLogits(comps.frame_classifier, cfg.shield.detection.frames_per_call)
    shield = Shield(frames, comps.recognizer, videopure=vp,
                    comdefend=comps.comdefend, config=cfg.shield)
    return shield, flow


def _eps_fn(unet: Callable) -> Callable:
    from .models.diffusion import eps_fn_of

    return eps_fn_of(unet)


def new_run_id() -> str:
    """12 hex digits naming one run: records of two runs appending to one file stay apart."""
    import uuid

    return uuid.uuid4().hex[:12]


@dataclass
class RunSummary:
    run_id: str = field(default_factory=new_run_id)
    clips: int = 0
    failed: int = 0
    routes: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    interrupted: bool = False
    stopped: str = ""
    stream: dict[str, Any] = field(default_factory=dict)
    flow_pairs: dict[str, int] = field(default_factory=dict)
    frame_labels: dict[str, int] = field(default_factory=dict)
    nonfinite: Counter = field(default_factory=Counter)  # component -> clips it returned NaN/Inf on
    output_error: str = ""  # records could not be written: the run stopped there
    output_closed: bool = False  # the reader of standard output went away
    signum: int = 0  # the signal that interrupted the run (SIGINT for Ctrl-C, SIGTERM)

    def percentile(self, q: float) -> float | None:
        """Latency percentile in ms; None when no clip ran (JSON ``null``, never NaN)."""
        v = sorted(self.latencies_ms)
        if not v:
            return None
        if len(v) == 1:
            return v[0]
        return statistics.quantiles(v, n=100, method="inclusive")[int(q) - 1]

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run_id, "clips": self.clips, "failed": self.failed, "routes": dict(self.routes),
                "latency_ms": {f"p{q}": None if (p := self.percentile(q)) is None else round(p, 2)
                               for q in (50, 90, 99)},
                "interrupted": self.interrupted, "stopped": self.stopped, "stream": self.stream,
                "flow_pairs": self.flow_pairs, "frame_labels": self.frame_labels, "nonfinite": dict(self.nonfinite),
                "output_error": self.output_error or None}

    def text(self) -> str:
        lat = self.to_dict()["latency_ms"]
        routes = ", ".join(f"{k} {v}" for k, v in sorted(self.routes.items())) or "none"
        s = self.stream
        latency = ("no latency (no clip ran)" if lat["p50"] is None else
                   f"latency p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms")
        bad = ", ".join(f"{k} {v}" for k, v in sorted(self.nonfinite.items()))
        return (f"{self.clips} clips ({routes}; {self.failed} failed{f'; NaN/Inf from {bad}' if bad else ''}), {latency}; {s.get('kept', 0)} frames kept of "
                f"{s.get('decoded', 0)} decoded, {s.get('decode_errors', 0)} decode errors, "
                f"{s.get('size_changes', 0)} size changes{f', {too} too small' if (too := s.get('too_small')) else ''}; ended by: "
                f"{self._interruption() if self.interrupted else self.stopped or s.get('ended_by', '?')}")

    def _interruption(self) -> str:
        return "SIGTERM" if self.signum == signal.SIGTERM else "Ctrl-C"


class Runner:
    """Loaded once, then :meth:`run` over any number of inputs."""

    def __init__(self, cfg: RunConfig, components: Components | None = None):
        self.cfg = cfg
        self.components = components or load_components(cfg)
        self.shield, self.flow = build_shield(self.components, cfg)
        self.device = torch.device(cfg.runtime.device)
        self.frames = self.shield.detector.frame_classifier  # the CachedFrameLogits

    def process(self, clip: torch.Tensor, frame_ids: list[int]):
        """One window through the Shield -> its record (the Shield validates the clip)."""
        self.flow.set_window(frame_ids)
        self.frames.set_window(frame_ids)
        return self.shield(clip.to(self.device, non_blocking=True))[0]

    def _label_ahead(self, windows: Windows, n: int) -> bool:
        """Label the last ``n`` frames for the gate before their window is complete. Called
        while the decode queue is empty, i.e. while the runner would otherwise wait for a
        live source, so a clean window then costs the recogniser plus its last frame's
        label. On failure (an engine that refuses a few frames, say) it returns False and
        the run labels per window from then on; the window's own call reports any error."""
        ids, clip = windows.recent(n)
        try:
            with torch.inference_mode():
                self.frames.prefill(ids, self.shield.detector.prepare(clip))
            return True
        except (VpureError, RuntimeError, ValueError, FloatingPointError) as e:
            log.warning("labelling frames %d-%d for the gate ahead of their window failed (%s); "
                        "labelling per window for the rest of this input", ids[0], ids[-1], e)
            return False

    def run(self, source: str | Path, out: TextIO, *, progress: bool | None = None,
            on_record: Callable[[dict[str, Any]], None] | None = None) -> RunSummary:
        """Stream ``source`` through the Shield, one JSON line per clip to ``out``
        (``on_record`` sees each record too: monitoring, tests).

        Frames arrive from a :class:`DecodeThread`. Whenever its queue is empty (``gate_ahead``),
        the frames received since the last window are labelled for the gate at once: on a
        live stream that work fills the wait for the next frame; a file decoded faster than
        the defence keeps the queue full, and each window labels its new frames in one batch.
        """
        from .log import progress as bar

        cfg, summary = self.cfg, RunSummary()
        decoder = DecodeThread(source, cfg.stream)
        windows = Windows(cfg.window, cfg.stride, cfg.stream.size)
        failures_in_a_row = pending = 0
        ahead = cfg.gate_ahead
        names = self.components.class_names
        self.flow.reset()
        self.frames.reset()
        it = bar(iter(decoder), desc="vpure run", enable=progress)
        try:
            for frame in it:
                w = windows.push(frame)
                if w is None:
                    pending += 1
                    if ahead and decoder.waiting():
                        ahead = self._label_ahead(windows, pending)
                        pending = 0
                    continue
                pending = 0
                ids, t0, clip = w
                rec: dict[str, Any] = {"run": summary.run_id, "clip": summary.clips + summary.failed,
                                       "start_time_s": round(t0, 3), "frames": [ids[0], ids[-1]]}
                start = time.perf_counter()
                try:
                    r = self.process(clip, ids)
                except (VpureError, RuntimeError, ValueError, FloatingPointError) as e:
                    failures_in_a_row += 1
                    rec |= {"error": f"{type(e).__name__}: {e}"}
                    if isinstance(e, NonFiniteOutput):
                        rec["failed_component"] = e.component
                        summary.nonfinite[e.component] += 1
                    log.error("clip %d (frames %d-%d) failed: %s", rec["clip"], ids[0], ids[-1], e)
                    _write(out, rec, on_record)
                    summary.failed += 1
                    if failures_in_a_row >= cfg.max_consecutive_failures:
                        summary.stopped = f"{failures_in_a_row} consecutive clip failures (last: {e})"
                        break
                    continue
                failures_in_a_row = 0
                total = (time.perf_counter() - start) * 1000
                d = r.to_dict()
                rec |= {"route": d["route"], "alpha": None if d["alpha"] is None else round(d["alpha"], 4),
                        "label": d["label"], "label_name": names[d["label"]] if 0 <= d["label"] < len(names) else None,
                        "votes": d["votes"], "exception_frames": d["exception_frames"],
                        "ms": d["ms"] | {"total": round(total, 3)}}
                if r.failure is not None:  # a NaN/Inf answered by the on_nonfinite policy: said, counted
                    rec |= {"error": d["error"], "failed_component": d["failed_component"]}
                    summary.nonfinite[r.failure.component] += 1
                    log.error("clip %d (frames %d-%d): %s; routed %s", rec["clip"], ids[0], ids[-1], r.failure,
                              r.route)
                _write(out, rec, on_record)
                summary.clips += 1  # counted once its record is written
                summary.routes[r.route] += 1
                summary.latencies_ms.append(total)
        except KeyboardInterrupt as e:
            summary.interrupted = True
            summary.signum = getattr(e, "signum", signal.SIGINT)
        except OutputClosed:
            summary.output_closed, summary.stopped = True, "the reader of the records went away"
        except OutputError as e:  # the records' file, not the clip: stop with what was written intact
            summary.output_error = summary.stopped = str(e)
        except InputError as e:  # the input itself failed (cannot open, too many decode errors)
            if summary.clips + summary.failed == 0 and decoder.stats.decoded == 0:
                raise
            summary.stopped = str(e)
        finally:
            decoder.stop()
            st = decoder.stats
            summary.stream = {"decoded": st.decoded, "kept": st.kept, "decode_errors": st.decode_errors,
                              "size_changes": st.size_changes, "too_small": st.too_small, "ended_by": st.ended_by}
            summary.flow_pairs = {"computed": self.flow.computed, "reused": self.flow.reused}
            summary.frame_labels = {"computed": self.frames.computed, "reused": self.frames.reused,
                                    "ahead": self.frames.ahead}
        if summary.clips + summary.failed == 0 and not summary.interrupted and st.kept < cfg.window:
            log.warning("%s ended after %d kept frames, fewer than one window of %d: no clip to "
                        "classify (lower --window or --frame-step)", source, st.kept, cfg.window)
        return summary


def _write(out: TextIO, rec: dict[str, Any], hook=None) -> None:
    out.write(json.dumps(rec, allow_nan=False) + "\n")  # strict JSON: jq and browsers reject NaN
    out.flush()
    if hook is not None:
        hook(rec)


def run_to(source: str | Path, cfg: RunConfig, out: str | Path | RecordSink | None = None,
           components: Components | None = None, progress: bool | None = None) -> RunSummary:
    """Run ``source``; JSON lines appended to ``out`` (a path or an open :class:`RecordSink`),
    or standard output. A path is opened before any model loads, so an unwritable one costs
    nothing."""
    if out is None:
        out = RecordSink.stdout()
    elif not isinstance(out, RecordSink):
        out = RecordSink.append_to(out)
    with out:
        return Runner(cfg, components).run(source, out, progress=progress)
