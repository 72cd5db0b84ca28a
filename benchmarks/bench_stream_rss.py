"""Memory over a long stream: 10 minutes of vtest.avi-like footage through the tiny configuration.

vtest.avi (a street scene, 10 fps) is re-encoded back to back into one long MPEG-4 file
until it lasts ``--minutes``; ``vpure run``'s runner streams it (decode thread, windows,
Shield with every route) and the process RSS is sampled after every clip. Target: peak RSS
after warm-up (the first 10% of clips) grows by at most 5% to the end.

Run from the repository root:  .venv/bin/python -m benchmarks.bench_stream_rss [--minutes 10]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import av

from vpure.lab import timing as benchmark
from vpure.runtime.runner import Runner, RunConfig
from vpure.runtime.stream import StreamConfig

from .footage import data_path


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def long_footage(minutes: float, out: Path, size=(192, 144)) -> tuple[Path, int]:
    """vtest.avi repeated into ``out`` at ``size`` until ``minutes`` long; returns (path, frames)."""
    src = data_path("vtest.avi")
    frames = []
    with av.open(str(src)) as c:
        fps = int(round(float(c.streams.video[0].average_rate or 10)))
        for f in c.decode(video=0):
            frames.append(f.reformat(width=size[0], height=size[1], format="yuv420p"))
    need = int(minutes * 60 * fps)
    with av.open(str(out), "w") as o:
        s = o.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(need):
            f = frames[i % len(frames)]
            f.pts = None
            for p in s.encode(f):
                o.mux(p)
        for p in s.encode():
            o.mux(p)
    return out, need


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--csv", default="benchmarks/results/results.csv", help="CSV to append rows to ('' for none)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vpure-rss-"))
    video, n = long_footage(args.minutes, work / "long.mp4")
    cfg = RunConfig(models="tiny", flow="dis", window=16, stride=args.stride, stream=StreamConfig(size=64))
    runner = Runner(cfg)
    samples: list[float] = []
    t0 = time.perf_counter()
    summary = runner.run(video, io.StringIO(), progress=None, on_record=lambda r: samples.append(rss_mib()))
    wall = time.perf_counter() - t0
    warm = max(1, len(samples) // 10)
    base, late = max(samples[:warm]), max(samples[warm:] or samples)
    growth = 100.0 * (late - base) / base
    print(f"\n## stream RSS [{args.minutes:g} min of vtest.avi-like footage, {n} frames, tiny, stride {args.stride}]")
    print(f"clips {summary.clips} (routes {dict(summary.routes)}), wall {wall:.0f} s, "
          f"latency p50 {summary.percentile(50):.1f} ms p99 {summary.percentile(99):.1f} ms")
    print(f"RSS after warm-up (max of first {warm} clips): {base:.1f} MiB; max afterwards: {late:.1f} MiB; "
          f"growth {growth:+.2f}% (target <= 5%); final {samples[-1]:.1f} MiB")
    row = benchmark.Row("peak RSS growth after warm-up", late, base, samples[-1], len(samples), base / late,
                        f"{growth:+.2f}% ({'ok' if growth <= 5 else 'MISS'})", "p50=max RSS after warm-up MiB, "
                        "p90=max during warm-up MiB, p99=final MiB")
    if args.csv:
        benchmark.append_csv(args.csv, "stream_rss", f"{args.minutes:g} min vtest-like, tiny", "RSS after warm-up",
                             [row], "cpu")


if __name__ == "__main__":
    main()
