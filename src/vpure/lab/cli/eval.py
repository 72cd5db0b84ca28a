"""``vpure eval``: defences x attacks on the mini-world, cached per clip, paper-style tables."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--defences", default="none,jpeg,wd,ts,diffpure_ddim,ddim_inversion,videopure",
                   help="comma-separated (see docs), or 'all'")
    p.add_argument("--attacks", default="clean,pgd,pgd_bpda", help="comma-separated, or 'all'")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--clips", type=int, default=20, help="clips of the split (default 20)")
    p.add_argument("--eps", default="8/255")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--fullgrad-iters", type=int, default=5)
    p.add_argument("--flow", choices=("dis", "raft"), default="dis")
    p.add_argument("--out", type=Path, default=Path("eval"), help="cache and tables folder (default ./eval)")
    p.add_argument("--workers", type=int, default=1, help="worker processes over clips (default 1)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the per-clip jobs on Ray (local by default, or a cluster address)")
    p.add_argument("--tables-only", action="store_true", help="regenerate the tables from the cache, run nothing")
    p.add_argument("--weights", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    from fractions import Fraction

    from vpure.runtime.errors import ConfigError
    from vpure.lab.tables import write_tables
    from vpure.lab.evaluation import ATTACKS, DEFENCES, EvalConfig, cache_dir, evaluate, load_results, weights_digests

    try:
        eps = float(Fraction(args.eps))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"--eps {args.eps!r} is not a number or fraction like 8/255") from None
    cfg = EvalConfig(split=args.split, clips=args.clips, eps=eps, step=eps / 4, iters=args.iters,
                     fullgrad_iters=args.fullgrad_iters, flow=args.flow)
    defences = list(DEFENCES) if args.defences == "all" else [d.strip() for d in args.defences.split(",")]
    attacks = list(ATTACKS) if args.attacks == "all" else [a.strip() for a in args.attacks.split(",")]
    if args.tables_only:
        cache = cache_dir(args.out, cfg, weights_digests(args.weights, cfg.flow))
        if not cache.is_dir():
            raise ConfigError(f"no cached results for this configuration in {cache}")
    else:
        cache = evaluate(cfg, defences, attacks, args.out, workers=args.workers, ray_address=args.ray,
                         weights_dir=args.weights)
    paths = write_tables(load_results(cache), args.out)
    print(paths["markdown"].read_text())
    for name, p in paths.items():
        print(f"{name}: {p.resolve()}")
    return 0
