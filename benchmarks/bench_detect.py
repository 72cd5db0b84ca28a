"""Detection gate and temporal defence per 32-frame 224x224 clip of real footage.

- detect: the gate (frame labels, alpha, route) with a tiny and a ResNet-18-sized frame
  classifier; reference: the ResNet-18 forward alone.
- finite_checks: what failing closed costs: the NaN/Inf check on the gate's logits, the
  recogniser's logits and a clip's flow; reference: the ResNet-18 gate forward it follows.
- temporal_defence: 4 exception frames rebuilt (block match radius 7, MC, int-DCT at the
  default QP); reference: the same with torch block matching.
- shield_clean: a clean clip through the Shield (ResNet-18 gate at 224 and at 112, then
  I3D-NL5-R50); reference: I3D-NL5-R50 alone. Random weights: the route is forced clean by
  the gate's constant labels, which is the path a clean clip takes.

Run from the repository root:  .venv/bin/python -m benchmarks.bench_detect [--csv PATH]
"""

from __future__ import annotations

import argparse

import torch

from vpure.lab import timing as benchmark
from vpure.runtime.backends.base import require_finite
from vpure.runtime.detect import DetectionConfig, Detector
from vpure.runtime.models.comdefend import tiny_comdefend
from vpure.runtime.models.i3d import i3d_nl5_resnet50
from vpure.runtime.shield import Shield, ShieldConfig
from vpure.runtime.models.frame_classifier import FrameClassifier, tiny_frame_classifier
from vpure.runtime.temporal_defence import TemporalDefenceConfig, repair_clip

from .footage import load_clip


GROUPS = ("detect", "finite_checks", "temporal_defence", "shield_clean")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default="benchmarks/results/results.csv", help="CSV to append rows to ('' for none)")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    args = p.parse_args(argv)
    groups = set(args.groups.split(","))
    if groups - set(GROUPS):
        p.error(f"unknown groups {sorted(groups - set(GROUPS))}; known: {','.join(GROUPS)}")
    frames = load_clip("vtest.avi", frames=32, size=224)
    u8 = torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous()  # (3, T, H, W)
    clip = (u8.float() / 255)[None]
    torch.manual_seed(0)
    r18 = FrameClassifier(num_classes=10).eval()
    tiny = tiny_frame_classifier().eval()

    def forward_r18():
        with torch.inference_mode():
            return r18(clip)

    same_shape = lambda out, ref: f"routes {out.route}"  # noqa: E731
    if "detect" in groups:
        benchmark.run("detect", "vtest.avi 32x224x224, 1 clip", benchmark.Case("resnet18 forward alone", forward_r18),
                      [benchmark.Case("gate, tiny frame classifier", lambda: Detector(tiny)(clip), same_shape),
                       benchmark.Case("gate, resnet18 frame classifier", lambda: Detector(r18)(clip), same_shape)],
                      csv_path=args.csv, min_iters=5, min_time_s=2.0)

    gate_logits, rec_logits = forward_r18(), torch.randn(1, 400)
    flow = torch.randn(1, 31, 2, 224, 224)
    if "finite_checks" in groups:
        benchmark.run("finite_checks", "vtest.avi 32x224x224; logits (1, 32, 10) / (1, 400), flow (1, 31, 2, 224, 224)",
                      benchmark.Case("resnet18 gate forward", forward_r18),
                      [benchmark.Case("check gate logits", lambda: require_finite(gate_logits, "gate")),
                       benchmark.Case("check recogniser logits", lambda: require_finite(rec_logits, "recognizer")),
                       benchmark.Case("check flow", lambda: require_finite(flow, "flow"))],
                      csv_path=args.csv, min_iters=20, min_time_s=1.0)

    g = torch.Generator().manual_seed(0)
    exc = [4, 11, 19, 26]
    adv = u8.clone().to(torch.int16)
    for k in exc:
        adv[:, k] = (adv[:, k] + torch.randint(-8, 9, adv[:, k].shape, generator=g)).clamp(0, 255)
    adv = adv.to(torch.uint8)

    def same(out, ref):
        assert torch.equal(out, ref), "repaired clips differ"
        return "exact"

    if "temporal_defence" in groups:
        benchmark.run("temporal_defence", "vtest.avi 32x224x224 u8, 4 exception frames, QP 32",
                      benchmark.Case("torch block matching", lambda: repair_clip(adv, exc, TemporalDefenceConfig(impl="torch"))),
                      [benchmark.Case("native", lambda: repair_clip(adv, exc, TemporalDefenceConfig(impl="native")), same)],
                      csv_path=args.csv, min_iters=3, min_time_s=1.0, warmup=1)
    if "shield_clean" not in groups:
        return
    i3d = i3d_nl5_resnet50(400).eval()

    def i3d_alone():
        with torch.inference_mode():
            return int(i3d(clip).argmax(-1)[0])

    def same_label(records, ref):
        assert records[0].route == "clean" and records[0].label == ref, "shield changed the clean label"
        return "clean route, same label"

    shields = {size: Shield(r18, i3d, comdefend=tiny_comdefend().eval(),
                            config=ShieldConfig(dense="comdefend", detection=DetectionConfig(frame_size=size)))
               for size in (0, 112, 96)}
    benchmark.run("shield_clean", "vtest.avi 32x224x224, I3D-NL5-R50 recogniser",
                  benchmark.Case("i3d_nl5_r50 alone", i3d_alone),
                  [benchmark.Case("shield, resnet18 gate at 224", lambda: shields[0](clip), same_label),
                   benchmark.Case("shield, resnet18 gate at 112", lambda: shields[112](clip), same_label),
                   benchmark.Case("shield, resnet18 gate at 96", lambda: shields[96](clip), same_label)],
                  csv_path=args.csv, min_iters=5, min_time_s=2.0, warmup=1)


if __name__ == "__main__":
    main()
