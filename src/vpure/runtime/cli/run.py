"""``vpure run INPUT``: the Shield over a video file, a folder of frames or a stream; JSON lines per clip."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="video file (anything PyAV decodes), folder of frames, or stream URL")
    p.add_argument("--config", type=Path, default=None, help="RunConfig TOML (windows, stream, shield, backends)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--engines", type=Path, default=None,
                     help="run every component from ONNX Runtime fp32 artefacts in this folder")
    src.add_argument("--torch", action="store_true", help="run every component in torch (the default)")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here (default: stdout)")
    p.add_argument("--allow-stale", action="store_true",
                   help="serve engines exported from other weights than the ones loaded (refused otherwise)")
    p.add_argument("--window", type=int, default=None, help="frames per clip (default 16)")
    p.add_argument("--stride", type=int, default=None, help="frames between clip starts (default 8)")
    p.add_argument("--frame-step", type=int, default=None, help="keep every k-th decoded frame (default 1)")
    p.add_argument("--realtime", action="store_true",
                   help="hand frames over at the file's frame rate, as a live camera would")
    p.add_argument("--tiny", action="store_true", help="tiny random-init models instead of the mini-world ones")
    p.add_argument("--flow", choices=("raft", "dis"), default=None, help="flow for VideoPure (default raft)")


def config_from_args(args: argparse.Namespace):
    from ..errors import ConfigError
    from ..runconfig import ComponentChoice, RuntimeConfig
    from ..runner import REGISTRY_NAMES, RunConfig

    cfg = RunConfig.load(args.config) if args.config else RunConfig()
    changes = {k: v for k, v in (("window", args.window), ("stride", args.stride), ("flow", args.flow))
               if v is not None}  # an explicit 0 reaches the config's check instead of meaning "default"
    if args.tiny:
        changes["models"] = "tiny"
    stream = {"frame_step": args.frame_step} if args.frame_step is not None else {}
    if args.realtime:
        stream["realtime"] = True
    if stream:
        changes["stream"] = cfg.stream.replace(**stream)
    if args.engines:
        if not args.engines.is_dir():
            raise ConfigError(f"engines folder {args.engines} does not exist")
        changes["runtime"] = RuntimeConfig(device=cfg.runtime.device, engines_dir=args.engines, components={
            r: ComponentChoice(backend="onnxruntime") for r in REGISTRY_NAMES.values()})
    elif args.torch:
        changes["runtime"] = RuntimeConfig(device=cfg.runtime.device)
    if args.allow_stale:
        changes["runtime"] = changes.get("runtime", cfg.runtime).replace(allow_stale=True)
    return cfg.replace(**changes) if changes else cfg


# Exit statuses: 0 done, 1 nothing could be classified, 2 bad usage (the CLI's), 74 the
# records could not be written (sysexits' EX_IOERR), 130 Ctrl-C, 141 standard output closed,
# 143 SIGTERM.
EXIT_OUTPUT_ERROR, EXIT_PIPE_CLOSED = 74, 141


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from ..records import RecordSink
    from ..signals import stop_on_signals
    from ..runner import run_to

    cfg = config_from_args(args)
    sink = RecordSink.stdout() if args.out is None else RecordSink.append_to(args.out)  # before any model loads
    with stop_on_signals():  # SIGTERM (docker stop, systemd) ends the run as Ctrl-C does
        summary = run_to(args.input, cfg, sink)
    if summary.output_closed:
        return EXIT_PIPE_CLOSED  # quietly, as Unix tools end when their reader goes away
    print(f"vpure run: {summary.text()}", file=sys.stderr)
    if summary.output_error:
        print(f"vpure run: error: {summary.output_error}; the records written before it are whole", file=sys.stderr)
        return EXIT_OUTPUT_ERROR
    if args.out is not None:
        print(json.dumps({"summary": summary.to_dict()}, allow_nan=False))
    if summary.interrupted:
        return 128 + summary.signum
    return 1 if summary.stopped and summary.clips == 0 else 0
