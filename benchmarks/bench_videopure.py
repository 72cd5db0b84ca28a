"""VideoPure end to end: the fast torch path vs the released-code-equivalent path.

Both paths use the same preset models (random init), the same DIS flow and the same
clip of real footage; parity is identical votes plus the largest member-logit gap.
Per-stage p50/p90 follow the summary table. Run from the repository root:

    .venv/bin/python -m benchmarks.bench_videopure --preset tiny small [--csv PATH]

``modelscope`` (the real 1.41B UNet3D and SD VAE configurations) runs only on CUDA.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vpure.lab import timing as benchmark

from vpure.runtime import presets
from vpure.runtime.purifier import VideoPure
from vpure.runtime.flow import DISFlow
from vpure.runtime.models.diffusion import eps_fn_of
from vpure.lab.released_reference import ReleasedVideoPure

from .footage import load_clip


def _clip(preset, device):
    frames = load_clip("vtest.avi", frames=preset.frames, size=preset.size)
    return torch.from_numpy(frames).float().div(255).permute(3, 0, 1, 2)[None].contiguous().to(device)


class Recorder:
    """Calls a defence and keeps its per-stage timings."""

    def __init__(self, defence, clip):
        self.defence, self.clip, self.stages = defence, clip, []

    def __call__(self):
        r = self.defence(self.clip)
        self.stages.append(r.timings_ms)
        return r


def _parity(out, ref):
    assert torch.equal(out.member_labels, ref.member_labels), "member votes differ"
    assert torch.equal(out.label, ref.label), "final vote differs"
    return f"same votes, max|dlogit|={(out.logits - ref.logits).abs().max().item():.1e}"


def _stage_table(name, rec):
    keys = [k for k in rec.stages[0] if k != "unet_calls"]
    print(f"  stages of {name} (ms, p50 / p90 over {len(rec.stages)} runs):")
    for k in keys:
        v = [s[k] for s in rec.stages if k in s]
        p90 = statistics.quantiles(v, n=10)[-1] if len(v) > 1 else v[0]
        print(f"    {k:<18} {statistics.median(v):>10.1f} {p90:>10.1f}")


def run_preset(name: str, csv: str, iters: int) -> None:
    device = "cuda" if presets.get(name).gpu_only else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"\n## videopure [{name}] skipped: needs a CUDA device (none here)")
        return
    m = presets.build(name, device=device, dtype=torch.float32)
    clip = _clip(m.preset, device)
    flow = DISFlow("medium")
    eps = eps_fn_of(m.unet)
    ref = Recorder(ReleasedVideoPure(eps, m.encoder, m.decoder, m.recognizer, flow), clip)
    fast = Recorder(VideoPure(eps, m.encoder, m.decoder, m.recognizer, flow), clip)
    cases = [benchmark.Case("fast fp32", fast, _parity)]
    if device == "cpu":  # bf16 compute as separate, labelled precision choices (STO stays fp32)
        m16 = presets.build(name, dtype=torch.bfloat16)
        eps16 = eps_fn_of(m16.unet)

        def dec16(z):
            return m16.decoder(z.bfloat16()).float()

        def unet16(z, t):
            return eps16(z.bfloat16(), t).float()

        fast16 = Recorder(VideoPure(eps, m.encoder, dec16, m.recognizer, flow), clip)
        cases.append(benchmark.Case("fast, bf16 VAE decoder", fast16, _parity))
        fast16u = Recorder(VideoPure(unet16, m.encoder, dec16, m.recognizer, flow), clip)
        cases.append(benchmark.Case("fast, bf16 UNet + VAE decoder", fast16u, _parity))
    cfg = f"{name}: T={m.preset.frames} {m.preset.size}x{m.preset.size}, t*=6, 12 UNet calls, 7 members"
    benchmark.run("videopure", cfg, benchmark.Case("released-equivalent", ref), cases, device=device, csv_path=csv,
                  warmup=1, min_iters=iters, min_time_s=0.0)
    _stage_table("released-equivalent", ref)
    for c in cases:
        _stage_table(c.name, c.fn)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", default=["tiny", "small", "modelscope"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--csv", default="benchmarks/results/results.csv", help="CSV to append rows to ('' for none)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    for name in args.preset:
        run_preset(name, args.csv, args.iters)


if __name__ == "__main__":
    main()
