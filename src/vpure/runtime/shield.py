"""The Shield: detection gate -> route -> {recogniser | temporal defence | dense defence}.

Most surveillance clips are clean and cost one frame-classifier pass plus the recogniser;
only suspicious clips pay for repair (sparse) or purification (dense: VideoPure by
default, ComDefend as the light option). One :class:`ShieldRecord` per clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ConfigBase, check
from .defence import Stopwatch, check_clip
from .detect import DetectionConfig, Detector
from .errors import ConfigError
from .temporal_defence import TemporalDefenceConfig, repair_clip

DENSE = ("videopure", "comdefend")


@dataclass(frozen=True)
class ShieldConfig(ConfigBase):
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    temporal: TemporalDefenceConfig = field(default_factory=TemporalDefenceConfig)
    dense: str = "videopure"

    def validate(self) -> None:
        check(self.dense in DENSE, f"ShieldConfig.dense {self.dense!r} is not one of {DENSE}")


@dataclass
class ShieldRecord:
    alpha: float
    route: str
    exception_frames: list[int]
    label: int
    votes: list[int] | None  # member labels when purified by VideoPure
    timings_ms: dict[str, float]

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "route": self.route, "exception_frames": self.exception_frames,
                "label": self.label, "votes": self.votes, "ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}


class Shield:
    """``frame_classifier(clip) -> (B, T, K)``, ``recognizer(clip) -> (B, K)``; ``videopure``
    (a :class:`~vpure.runtime.defence.VideoPure`) and ``comdefend`` (clip -> clip) as configured."""

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
            return int(self.recognizer(clip).argmax(-1)[0])

    def __call__(self, clip: torch.Tensor) -> list[ShieldRecord]:
        clip = check_clip(clip, like=self.recognizer)
        sw_all = Stopwatch(clip.device)
        with sw_all("detect"):
            det = self.detector(clip)
        per_clip_detect = sw_all.ms["detect"] / clip.shape[0]
        records = []
        for b in range(clip.shape[0]):
            sw = Stopwatch(clip.device)
            one, votes = clip[b:b + 1], None
            r = det.route[b]
            if r == "sparse":
                with sw("temporal_defence"):
                    one = repair_clip(one[0], det.exception_frames[b], self.config.temporal)[None]
                label = self._recognize(one, sw)
            elif r == "dense" and self.config.dense == "videopure":
                result = self.videopure(one)
                sw.ms.update({f"videopure.{k}": v for k, v in result.timings_ms.items() if k != "unet_calls"})
                label, votes = int(result.label[0]), result.member_labels[:, 0].tolist()
            elif r == "dense":
                with sw("comdefend"), torch.inference_mode():
                    one = self.comdefend(one)
                label = self._recognize(one, sw)
            else:
                label = self._recognize(one, sw)
            records.append(ShieldRecord(det.alpha[b], r, det.exception_frames[b], label, votes,
                                        {"detect": per_clip_detect, **sw.ms}))
        return records
