"""The Shield: detection gate -> route -> {recogniser | temporal defence | dense defence}.

Most surveillance clips are clean and cost one frame-classifier pass plus the recogniser;
only suspicious clips pay for repair (sparse) or purification (dense: VideoPure by
default, ComDefend as the light option). One :class:`ShieldRecord` per clip.

Fail closed: a gate or recogniser that returns NaN or Inf never lets a clip through as
clean. ``ShieldConfig.on_nonfinite`` says what happens instead: ``"purify"`` (the default)
treats the clip as densely attacked, ``"repair"`` rebuilds the frames the gate could not
label from their neighbours (a recogniser failure is then reported), ``"report"`` gives no
decision. Either way the record names the component that failed; a clip with no decision
raises :class:`~vpure.runtime.errors.NonFiniteOutput`, which the runner writes as an
error record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backends.base import require_finite
from .config import ConfigBase, check
from .purifier import Stopwatch, check_clip
from .detect import DetectionConfig, Detector
from .errors import ConfigError, NonFiniteOutput
from .temporal_defence import TemporalDefenceConfig, repair_clip

DENSE = ("videopure", "comdefend")
ON_NONFINITE = ("purify", "repair", "report")


@dataclass(frozen=True)
class ShieldConfig(ConfigBase):
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    temporal: TemporalDefenceConfig = field(default_factory=TemporalDefenceConfig)
    dense: str = "videopure"
    on_nonfinite: str = "purify"  # what a NaN/Inf from the gate or recogniser leads to

    def validate(self) -> None:
        check(self.dense in DENSE, f"ShieldConfig.dense {self.dense!r} is not one of {DENSE}")
        check(self.on_nonfinite in ON_NONFINITE,
              f"ShieldConfig.on_nonfinite {self.on_nonfinite!r} is not one of {ON_NONFINITE}")


@dataclass
class ShieldRecord:
    alpha: float | None  # None when the gate's output was not finite
    route: str
    exception_frames: list[int]
    label: int
    votes: list[int] | None  # member labels when purified by VideoPure
    timings_ms: dict[str, float]
    failure: NonFiniteOutput | None = None  # a component whose NaN/Inf the route above answered

    def to_dict(self) -> dict:
        d = {"alpha": self.alpha, "route": self.route, "exception_frames": self.exception_frames,
             "label": self.label, "votes": self.votes, "ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}
        if self.failure is not None:
            d |= {"error": f"{type(self.failure).__name__}: {self.failure}",
                  "failed_component": self.failure.component}
        return d


class Shield:
    """``frame_classifier(clip) -> (B, T, K)``, ``recognizer(clip) -> (B, K)``; ``videopure``
    (a :class:`~vpure.runtime.purifier.VideoPure`) and ``comdefend`` (clip -> clip) as configured."""

    def __init__(self, frame_classifier, recognizer, *, videopure=None, comdefend=None,
                 config: ShieldConfig | None = None):
        self.config = config or ShieldConfig()
        self.detector = Detector(frame_classifier, self.config.detection)
        self.recognizer, self.videopure, self.comdefend = recognizer, videopure, comdefend
        dense = {"videopure": videopure, "comdefend": comdefend}[self.config.dense]
        if dense is None:
            raise ConfigError(f"Shield: the dense route is {self.config.dense!r} but no such defence was given")

    @torch.inference_mode()
    def _recognize(self, clip: torch.Tensor, sw: Stopwatch) -> int:
        with sw("recognize"):
            logits = self.recognizer(clip)
        return int(require_finite(logits, "recognizer").argmax(-1)[0])

    def _defend(self, route: str, one: torch.Tensor, exceptions: list[int], sw: Stopwatch):
        """The route table for one clip (1, 3, T, H, W) -> (label, member votes or None)."""
        if route == "sparse":
            with sw("temporal_defence"):
                one = repair_clip(one[0], exceptions, self.config.temporal)[None]
        elif route == "dense" and self.config.dense == "videopure":
            result = self.videopure(one)
            sw.ms.update({f"videopure.{k}": v for k, v in result.timings_ms.items() if k != "unet_calls"})
            return int(result.label[0]), result.member_labels[:, 0].tolist()
        elif route == "dense":
            with sw("comdefend"), torch.inference_mode():
                one = require_finite(self.comdefend(one), "comdefend")
        return self._recognize(one, sw), None

    def _gate_failed(self, e: NonFiniteOutput, b: int, t: int) -> tuple[str, list[int]]:
        """(route, exception frames) for clip ``b`` when the gate's output was not finite."""
        bad = e.frames[b] if e.frames else list(range(t))
        if self.config.on_nonfinite == "purify":
            return "dense", []
        if self.config.on_nonfinite == "repair" and len(bad) < t:
            return "sparse", bad
        raise e  # "report", or nothing finite to repair from

    def _detect_one(self, one: torch.Tensor, b: int, gate_error: NonFiniteOutput):
        """(alpha, route, exception frames, failure) for clip ``b`` of a batch whose gate call
        returned NaN/Inf: the clip's own frames at fault, or a clean clip detected alone."""
        if not gate_error.frames or gate_error.frames[b]:
            return (None, *self._gate_failed(gate_error, b, one.shape[2]), gate_error)
        det = self.detector(one)
        return det.alpha[0], det.route[0], det.exception_frames[0], None

    def __call__(self, clip: torch.Tensor) -> list[ShieldRecord]:
        clip = check_clip(clip, like=self.recognizer)
        sw_all = Stopwatch(clip.device)
        det, gate_error = None, None
        try:
            with sw_all("detect"):
                det = self.detector(clip)
        except NonFiniteOutput as e:
            gate_error = e
        per_clip_detect = sw_all.ms["detect"] / clip.shape[0]
        records = []
        for b in range(clip.shape[0]):
            sw = Stopwatch(clip.device)
            one = clip[b:b + 1]
            if det is not None:
                alpha, route, exceptions, failure = det.alpha[b], det.route[b], det.exception_frames[b], None
            else:
                alpha, route, exceptions, failure = self._detect_one(one, b, gate_error)
            try:
                label, votes = self._defend(route, one, exceptions, sw)
            except NonFiniteOutput as e:
                # The recogniser on a clean or repaired clip: purify instead, if so configured.
                if e.component != "recognizer" or route == "dense" or self.config.on_nonfinite != "purify":
                    raise
                failure, route, exceptions = e, "dense", []
                label, votes = self._defend(route, one, exceptions, sw)
            records.append(ShieldRecord(alpha, route, exceptions, label, votes,
                                        {"detect": per_clip_detect, **sw.ms}, failure))
        return records
