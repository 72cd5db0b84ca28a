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
from .deployment import NETWORKS, ModelsConfig, Plan, registry_name
from .errors import ConfigError, InputError, NonFiniteOutput, VpureError
from .frame_caches import CachedFlow, CachedFrameLogits
from .log import get_logger
from .records import OutputClosed, OutputError, RecordSink
from .runconfig import RuntimeConfig
from .shield import ShieldConfig
from .stream import DecodeThread, StreamConfig, Windows
from .videopure import VideoPureConfig

log = get_logger(__name__)

PRECISION_ORDER = ("int8", "fp16", "fp32")  # an unavailable precision falls back to the next one
MAX_WINDOW = 512  # frames per clip: recognisers take 8-64; the bound keeps a typo from allocating gigabytes
FLOWS = ("raft", "dis")


@dataclass(frozen=True)
class RunConfig(ConfigBase):
    """Everything ``vpure run`` does, in one TOML-able object. Paths in a TOML file are
    relative to its folder (:meth:`load`)."""

    window: int | None = None  # frames per clip (default: the deployment's T)
    stride: int | None = None  # kept frames between clip starts (default: half a window)
    stream: StreamConfig = field(default_factory=StreamConfig)
    shield: ShieldConfig = field(default_factory=ShieldConfig)
    videopure: VideoPureConfig = field(default_factory=lambda: VideoPureConfig(rescale_to_size=True))
    flow: str | None = None  # raft or dis (OpenCV DIS medium); default: the deployment's
    # The deployment: "miniworld" (shipped, default), "tiny" (random-init test models) or a
    # [models] table naming the user's own files (vpure.runtime.deployment).
    models: ModelsConfig = field(default_factory=lambda: ModelsConfig(name="miniworld"))
    weights: Path | None = None  # mini-world weights folder (default: shipped)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # backend + precision per component
    max_consecutive_failures: int = 5
    # Label frames for the gate while waiting for the next one (see Runner.run).
    gate_ahead: bool = True

    def validate(self) -> None:
        check(self.window is None or 2 <= self.window <= MAX_WINDOW,
              f"RunConfig.window must be in [2, {MAX_WINDOW}], got {self.window}")
        check(self.stride is None or 1 <= self.stride <= MAX_WINDOW,
              f"RunConfig.stride must be in [1, {MAX_WINDOW}], got {self.stride}")
        check(self.flow is None or self.flow in FLOWS, f"RunConfig.flow {self.flow!r} is not one of {FLOWS}")
        check(self.max_consecutive_failures >= 1, "RunConfig.max_consecutive_failures must be >= 1")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """From a TOML file; its relative paths (models, weights, engines) are taken from its folder."""
        cfg = super().load(path)
        base = Path(path).resolve().parent

        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else base / p

        runtime = cfg.runtime.replace(engines_dir=fix(cfg.runtime.engines_dir),
                                      engines_key_file=fix(cfg.runtime.engines_key_file))
        return cfg.replace(models=cfg.models.resolved(base), weights=fix(cfg.weights), runtime=runtime)

    def resolved(self, plan: Plan) -> "RunConfig":
        """Window, stride, frame size and flow filled in from the deployment where unset."""
        window = self.window or plan.frames
        flow = self.flow or plan.flow
        if flow == "raft" and plan.flow != "raft":
            raise ConfigError("RunConfig.flow = \"raft\" but the deployment has no RAFT ([models.flow] arch = "
                              "\"raft\" with its weights)")
        return self.replace(window=window, stride=self.stride or max(window // 2, 1), flow=flow,
                            stream=self.stream if self.stream.size else self.stream.replace(size=plan.size))


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


# runner field -> registry component it deploys as (the shipped deployments' recogniser is an I3D)
REGISTRY_NAMES = {f: registry_name(f) for f in NETWORKS}


def load_components(cfg: RunConfig, plan: Plan | None = None) -> Components:
    """The deployment ``cfg.models``: engine backends where the runtime config says so (no
    torch module of theirs is built), torch modules for the rest."""
    from . import deployment
    from .memory import retain_cpu_memory

    retain_cpu_memory()  # freed activations stay in the process: no fresh pages per call
    device = torch.device(cfg.runtime.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import BackendUnavailable

        raise BackendUnavailable(f"runtime.device is {cfg.runtime.device!r} but torch sees no CUDA device here "
                                 f"(torch {torch.__version__}); set device = \"cpu\" to run on the CPU")
    plan = plan or deployment.plan(cfg.models, cfg.weights)
    specs = {registry_name(f, plan.recognizer_component): plan.spec(f) for f in NETWORKS}
    choices = {f: cfg.runtime.components.get(registry_name(f, plan.recognizer_component)) for f in NETWORKS}
    flow = cfg.flow or plan.flow
    built: dict[str, Any] = {}

    def module(fld: str):
        if fld not in built:
            built[fld] = deployment.load_network(plan, fld, cfg.weights)
        return built[fld]

    def engine(fld: str) -> bool:
        c = choices[fld]
        return c is not None and c.backend != "torch"

    nets: dict[str, Any] = {}
    for fld in NETWORKS:
        if fld == "raft" and flow != "raft":
            nets[fld] = None
        elif engine(fld):
            nets[fld] = None  # filled below, from its artefact
        else:
            nets[fld] = module(fld)
    from .models.inference import prepare_decoder, prepare_encoder, prepare_frame_classifier, prepare_recognizer

    def eager(fld):  # served eagerly by torch: the eager rewrites apply (a compiled one keeps its layers)
        c = choices[fld]
        return isinstance(nets[fld], torch.nn.Module) and (c is None or not c.compile)

    for fld, prepare in (("recognizer", prepare_recognizer), ("frame_classifier", prepare_frame_classifier),
                         ("encoder", prepare_encoder), ("decoder", prepare_decoder)):
        if eager(fld):
            prepare(nets[fld])
    if eager("unet"):
        from .models.diffusion import EpsUNet
        from .models.rewrites import fold_temporal_convs, optimise_for_inference

        if isinstance(nets["unet"], EpsUNet):  # torch inference only: exporters see diffusers' modules
            optimise_for_inference(nets["unet"])
        else:
            fold_temporal_convs(nets["unet"])
    if device.type != "cpu":  # torch-served modules run where the runtime says, not silently on the CPU
        for fld in NETWORKS:
            if isinstance(nets[fld], torch.nn.Module):
                nets[fld] = nets[fld].to(device)
    key = None
    for fld in NETWORKS:
        choice = choices[fld]
        if (fld == "raft" and flow != "raft") or choice is None or (
                choice.backend == "torch" and choice.precision.value == "fp32" and not choice.compile):
            continue
        from .artifacts import Trust, engines_key, source_hash
        from .backends import as_module_call, create_backend

        spec, trust = specs[registry_name(fld, plan.recognizer_component)], None
        if choice.backend != "torch":  # an engine: it must come from these weights (and be signed, with a key)
            key = key or engines_key(cfg.runtime.engines_key_file)
            files = plan.files.get(fld, [])
            trust = Trust(key=key, allow_stale=cfg.runtime.allow_stale, source_id=lambda fld=fld: plan.source_id(fld),
                          state_hash=lambda fld=fld, files=files: source_hash(module(fld), files))
        backend = create_backend(spec, choice, module=nets[fld], device=cfg.runtime.device,
                                 engines_dir=cfg.runtime.engines_dir, reuse_outputs=False, trust=trust)
        nets[fld] = as_module_call(backend)
    return Components(nets["frame_classifier"], nets["recognizer"], nets["unet"], nets["encoder"], nets["decoder"],
                      nets["comdefend"], nets["raft"], plan.class_names, specs)


def serve_from_engines(cfg: RunConfig, engines_dir: Path, precision: str = "fp32",
                       backend: str = "onnxruntime") -> RunConfig:
    """``cfg`` serving every network of its deployment from ``engines_dir`` at ``precision``,
    except the networks its ``runtime.components`` already choose (they are kept).

    With an engines manifest (``vpure export --deployment``), each network's artefact and
    its int8 calibration come from it; a network whose component offers no such precision
    (say RAFT in int8) is served at the best precision exported for it, with a log line.
    Without one, every network is asked for ``precision`` with the default recipe.
    """
    from . import deployment, manifest, registry
    from .precision import CalibrationRecipe
    from .runconfig import ComponentChoice

    engines_dir = Path(engines_dir)
    if not engines_dir.is_dir():
        raise ConfigError(f"engines folder {engines_dir} does not exist")
    plan = deployment.plan(cfg.models, cfg.weights)
    data = manifest.read(engines_dir)
    if data is not None and data["deployment"].get("id") != plan.identity():
        what = (f"the engines in {engines_dir} were exported for deployment {data['deployment'].get('name')!r} "
                f"({data['deployment'].get('frames')} frames at {data['deployment'].get('size')} px, id "
                f"{str(data['deployment'].get('id'))[:12]}...), not this run's ({plan.frames} frames at {plan.size} "
                f"px, id {plan.identity()[:12]}...)")
        if not cfg.runtime.allow_stale:
            raise ConfigError(f"{what}; export this deployment there, or pass --allow-stale")
        log.warning("%s; serving them anyway (allow_stale)", what)
    flow = cfg.flow or plan.flow
    comps = dict(cfg.runtime.components)
    for net in NETWORKS:
        reg = registry_name(net, plan.recognizer_component)
        if reg in comps or (net == "raft" and flow != "raft") or (net == "comdefend" and not plan.has(net)):
            continue
        if data is None:
            comps[reg] = ComponentChoice(backend=backend, precision=precision)
            continue
        arts = data["networks"].get(net, {}).get("artefacts", {})
        want = precision
        if want not in arts:  # not offered for this component, or refused by the export's checks
            best = next((p for p in PRECISION_ORDER[PRECISION_ORDER.index(want):] if p in arts), None)
            if best is None:
                raise ConfigError(f"{engines_dir} has no {precision} artefact for the {net} ({reg}); it has "
                                  f"{', '.join(sorted(arts)) or 'none'}: run vpure export --deployment ... "
                                  f"--precision {precision} --out {engines_dir}")
            why = ("offers no" if want not in registry.get(reg).precisions else
                   "has no exported (or no accepted: see the export's report)")
            log.warning("the %s (%s) %s %s artefact in %s; serving it at %s", net, reg, why, want, engines_dir, best)
            want = best
        cal = arts[want].get("calibration")
        comps[reg] = ComponentChoice(backend=backend, precision=want,
                                     calibration=CalibrationRecipe.from_dict(cal) if cal else None)
    runtime = cfg.runtime.replace(engines_dir=engines_dir, components=comps)
    return cfg.replace(runtime=runtime)


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
    if cfg.shield.dense == "comdefend" and comps.comdefend is None:
        raise ConfigError("shield.dense = \"comdefend\" but the deployment has no ComDefend ([models.comdefend] "
                          "weights = \"...\")")
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
        from .deployment import plan

        deployment = plan(cfg.models, cfg.weights)
        self.cfg = cfg = cfg.resolved(deployment)
        self.components = components or load_components(cfg, deployment)
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
