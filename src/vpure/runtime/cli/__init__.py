"""The ``vpure`` command line (console script and ``python -m vpure``).

Argument parsing lives here only. Each subcommand is a module with
``add_arguments(parser)`` and ``run(args) -> int``; the table below names them, and a
subcommand's heavy imports happen inside its ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import VpureError

# name -> (module, one-line help). The runtime's own commands live beside this file;
# `export` is vpure.export's and the lab's commands (bench, eval, demo, train) vpure.lab's:
# the table names them, and only the command that runs is imported.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vpure.runtime.cli.info", "versions, backends, kernel implementations, devices and components"),
    "run": ("vpure.runtime.cli.run", "run the Shield over a video file, frame folder or stream (JSON lines)"),
    "calibrate": ("vpure.runtime.cli.calibrate", "choose the detection thresholds by F1 on labelled clips"),
    "export": ("vpure.export.cli", "export components to ONNX artefacts (fp32/fp16/int8) with sidecars"),
    "demo": ("vpure.lab.cli.demo", "attack a mini-world clip and watch the Shield defend it (PNG strip)"),
    "bench": ("vpure.lab.cli.bench", "end-to-end latency per stage vs the released-code reference (CSV + PNG)"),
    "eval": ("vpure.lab.cli.eval", "robustness evaluation: defences x attacks, cached per clip, paper tables"),
    "train": ("vpure.lab.cli.train", "train the mini-world networks on CPU (weights + model cards)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (for its arguments), so
    ``vpure run --help`` loads nothing of the lab or the exporter."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="vpure",
        description="Defend video recognisers against adversarial clips: detection gate, temporal "
                    "defence and VideoPure purification, on torch, ONNX Runtime or TensorRT.",
    )
    parser.add_argument("--version", action="version", version=f"vpure {__version__}")
    parser.add_argument("--log-level", default=None, metavar="LEVEL",
                        help="DEBUG, INFO, WARNING (default, or VPURE_LOG_LEVEL), ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..log import configure_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        configure_logging(args.log_level)
        if args.command != "info":  # info reports the process as it is
            from ..memory import retain_cpu_memory

            retain_cpu_memory()
        return int(importlib.import_module(args._module).run(args) or 0)
    except VpureError as e:
        print(f"vpure {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM where the command installs signals.stop_on_signals
        print(f"vpure {args.command}: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # the reader of standard output went away (`| head`): end quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
