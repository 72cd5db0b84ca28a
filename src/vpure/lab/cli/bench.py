"""``vpure bench``: end-to-end latency per stage, runtime vs the released-code reference."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default="tiny,small", help="tiny, small, modelscope (CUDA only); comma-separated")
    p.add_argument("--backends", default="torch", help="torch, onnxruntime; comma-separated")
    p.add_argument("--precisions", default="fp32,bf16,fp16,int8",
                   help="fp32, bf16 (CPU), fp16 (CUDA), int8 (the onnxruntime backend's; the clean route's gate in "
                   "torch); default all four, each where the backend and machine run it")
    p.add_argument("--iters", type=int, default=3, help="timed runs per case after one warm-up (default 3)")
    p.add_argument("--video", type=Path, default=None, help="clip to decode (default: a mini-world clip, encoded)")
    p.add_argument("--engines", type=Path, default=None, help="artefact cache for onnxruntime cases")
    p.add_argument("--results", type=Path, default=Path("vpure-bench-results"),
                   help="folder for the CSV and the chart when --csv/--png are not given (default "
                        "./vpure-bench-results; its path is printed)")
    p.add_argument("--csv", default=None, help="CSV to append rows to (default RESULTS/results.csv; '' for none)")
    p.add_argument("--png", type=Path, default=None, help="stage breakdown chart (default RESULTS/stages.png)")
    p.add_argument("--compile", action="store_true",
                   help="add the torch cases' UNet and VAE compiled by Inductor (weights frozen; compiles minutes first)")
    p.add_argument("--flops", action="store_true",
                   help="only print the arithmetic of one clip per stage for --configs (counted on PyTorch's meta "
                        "device: runs anywhere, modelscope included) and exit")
    p.add_argument("--target-s", type=float, default=None,
                   help="with --flops: print the sustained TFLOP/s this many seconds per clip needs")
    p.add_argument("--clean-route", action="store_true",
                   help="also time the Shield's clean route against the recogniser alone, for an isolated "
                        "clip, a file stream and a live stream (mini-world models, and I3D-R50 with a "
                        "ResNet-18 gate at deployment scale), at --precisions' fp32 and bf16 (a bf16 gate also "
                        "in front of the fp32 recogniser), and with an int8 gate (torch's oneDNN plan) in front "
                        "of the fp32 recogniser where --precisions names int8")


def run(args: argparse.Namespace) -> int:
    import torch

    from vpure.lab.bench_e2e import bench_clean_route, bench_clean_route_deploy, bench_config, stage_chart
    from vpure.runtime.errors import ConfigError
    from vpure.runtime.presets import PRESETS

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:  # a typo is an error, not a skipped case
        raise ConfigError(f"unknown configuration(s) {', '.join(map(repr, unknown))}; known: {', '.join(PRESETS)}")
    if args.flops:
        from vpure.lab.flops import print_clip_flops

        for name in names:
            print_clip_flops(name, args.target_s)
        return 0
    torch.set_grad_enabled(True)
    if args.csv is None or args.png is None:
        print(f"results folder: {args.results.resolve()}")
    csv_default, png = args.results / "results.csv", args.png or args.results / "stages.png"
    csv = csv_default if args.csv is None else args.csv or None
    results, skipped = {}, []
    for name in names:
        try:
            results[name] = bench_config(name, backends=args.backends.split(","),
                                         precisions=args.precisions.split(","), iters=args.iters, csv_path=csv,
                                         engines_dir=args.engines, video=args.video, compile=args.compile)
        except ConfigError as e:
            skipped.append(f"{name}: {e}")
    if args.clean_route:
        precisions = tuple(args.precisions.split(","))  # the torch CPU ones: fp32, bf16 where native, int8 gates
        bench_clean_route(csv_path=csv, precisions=precisions)
        bench_clean_route_deploy(csv_path=csv, precisions=precisions)
    if results:
        print(f"\nstage chart: {stage_chart(png, results).resolve()}")
    for line in skipped:
        print(f"skipped {line}")
    return 0 if results or args.clean_route else 1  # nothing measured: say so in the exit code
