"""``vpure run INPUT``: the Shield over a video file, a folder of frames or a stream; JSON lines per clip."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="video file (anything PyAV decodes), folder of frames, or stream URL")
    p.add_argument("--config", type=Path, default=None, help="RunConfig TOML (windows, stream, shield, backends)")
    dep = p.add_mutually_exclusive_group()
    dep.add_argument("--deployment", default=None, metavar="NAME|FILE",
                     help="the networks: 'miniworld' (default), 'tiny' (test models), or a TOML file whose "
                          "[models] table names your own (with no --config, the file is the configuration too)")
    dep.add_argument("--tiny", action="store_true", help="same as --deployment tiny")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--engines", type=Path, default=None,
                     help="serve every network from the artefacts in this folder (ONNX Runtime), except those "
                          "[runtime.components.*] of --config chooses otherwise")
    src.add_argument("--torch", action="store_true", help="run every component in torch (the default)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="with --engines: the artefacts' precision (default fp32); a network exported without it "
                        "is named, or served at fp32 when its component offers no such precision")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here (default: stdout)")
    p.add_argument("--allow-stale", action="store_true",
                   help="serve engines exported from other weights than the ones loaded (refused otherwise)")
    p.add_argument("--window", type=int, default=None, help="frames per clip (default: the recogniser's)")
    p.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: half a window)")
    p.add_argument("--frame-step", type=int, default=None, help="keep every k-th decoded frame (default 1)")
    p.add_argument("--realtime", action="store_true",
                   help="hand frames over at the file's frame rate, as a live camera would")
    p.add_argument("--flow", choices=("raft", "dis"), default=None, help="flow for VideoPure (default: the deployment's)")


def config_from_args(args: argparse.Namespace):
    from ..deployment import read_deployment
    from ..errors import ConfigError
    from ..runconfig import RuntimeConfig
    from ..runner import RunConfig, serve_from_engines

    ref = "tiny" if args.tiny else args.deployment
    if args.config:
        cfg = RunConfig.load(args.config)
    elif ref is not None and Path(ref).is_file():
        cfg = RunConfig.load(ref)  # a deployment file is a run configuration
    else:
        cfg = RunConfig()
    changes = {k: v for k, v in (("window", args.window), ("stride", args.stride), ("flow", args.flow))
               if v is not None}  # an explicit 0 reaches the config's check instead of meaning "default"
    if ref is not None:
        changes["models"] = read_deployment(ref)
    stream = {"frame_step": args.frame_step} if args.frame_step is not None else {}
    if args.realtime:
        stream["realtime"] = True
    if stream:
        changes["stream"] = cfg.stream.replace(**stream)
    if args.precision and not args.engines:
        raise ConfigError("--precision chooses the artefacts of --engines DIR; give the folder too "
                          "(torch precisions are set per component in [runtime.components.*])")
    if args.torch:
        changes["runtime"] = RuntimeConfig(device=cfg.runtime.device)
    if args.allow_stale:
        changes["runtime"] = changes.get("runtime", cfg.runtime).replace(allow_stale=True)
    cfg = cfg.replace(**changes) if changes else cfg
    if args.engines:
        cfg = serve_from_engines(cfg, args.engines, args.precision or "fp32")
    return cfg


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
