"""``vpure demo``: attack a mini-world clip and watch the Shield defend it; writes a PNG strip."""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=int, default=0, help="test-split clip index (default 0)")
    p.add_argument("--video", type=Path, default=None, help="use this video instead (16 frames at 64x64 are cut)")
    p.add_argument("--out", type=Path, default=Path("vpure-demo.png"), help="PNG strip path (default ./vpure-demo.png)")
    p.add_argument("--no-png", action="store_true", help="do not write the picture")
    p.add_argument("--eps", default="8/255", help="PGD L-inf budget, e.g. 8/255 (default)")
    p.add_argument("--iters", type=int, default=10, help="PGD iterations (default 10)")
    p.add_argument("--flow", choices=("raft", "dis"), default="raft", help="flow for VideoPure's STO (default: trained RAFT)")
    p.add_argument("--frames", type=int, default=None, help="use only the first N frames (default 16)")
    p.add_argument("--weights", type=Path, default=None, help="mini-world weights folder (default: shipped)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import json

    from vpure.runtime.errors import ConfigError
    from vpure.runtime.miniworld.dataset import CLASSES
    from vpure.lab.demo import run_demo

    try:
        eps = float(Fraction(args.eps))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"--eps {args.eps!r} is not a number or fraction like 8/255") from None
    r = run_demo(index=args.index, video=args.video, out=None if args.no_png else args.out, eps=eps,
                 iters=args.iters, flow=args.flow, frames=args.frames, weights_dir=args.weights, seed=args.seed)
    name = lambda k: CLASSES[k] if k is not None and 0 <= k < len(CLASSES) else str(k)  # noqa: E731
    print(f"clip: {'test #' + str(args.index) if args.video is None else args.video} (true class {name(r.true_label)})")
    print(f"recogniser on the clean clip:       {name(r.clean_label)}")
    print(f"recogniser under PGD eps={args.eps}: {name(r.adversarial_label)}")
    print(f"Shield on the clean clip:           {json.dumps(r.clean_record)}")
    print(f"Shield on the adversarial clip:     {json.dumps(r.adversarial_record)}")
    print(f"VideoPure on the adversarial clip:  {name(r.purified_label)} (member votes "
          f"{[name(v) for v in r.votes]})")
    if r.png is not None:
        print(f"picture: {r.png.resolve()}")
    print(f"done in {r.seconds:.1f} s")
    return 0
