"""``vpure train COMPONENT|all``: train mini-world networks, write weights and model cards."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vpure.lab.miniworld_train import ORDER

    p.add_argument("component", choices=(*ORDER, "all"), help="network to train ('all': in dependency order)")
    p.add_argument("--out", type=Path, default=None, help="weights folder to write (required unless "
                                                               "--overwrite-shipped)")
    p.add_argument("--overwrite-shipped", action="store_true",
                   help="write into the package's shipped weights folder, replacing the default deployment")
    p.add_argument("--steps", type=int, default=None, help="override the component's step budget")
    p.add_argument("--train-clips", type=int, default=None, help="override the number of training clips")
    p.add_argument("--eval-clips", type=int, default=None, help="override the number of test clips measured")
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--lr", type=float, default=None, help="override the peak learning rate")
    p.add_argument("--crop", type=int, default=None, help="vae/comdefend: train on random crops of this size")
    p.add_argument("--object-weight", type=float, default=None,
                   help="vae: loss weight of object pixels relative to background (0: uniform)")
    p.add_argument("--feature-weight", type=float, default=None,
                   help="vae: weight of a perceptual loss on the trained frame classifier's features")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="vae: train the decoder only, so the latents (and the UNet trained on them) stay valid")
    p.add_argument("--resume", action="store_true",
                   help="continue from the weights in the folder (the card records the chain of runs)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="forward passes under bf16 autocast or in fp32 (default: each component's budget; "
                        "'auto' is bf16 where the CPU has native bf16)")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data seed is the world's)")
    p.add_argument("--world-seed", type=int, default=0, help="mini-world dataset seed")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from vpure.runtime.miniworld.dataset import WorldConfig
    from vpure.lab.miniworld_train import BUDGETS, ORDER, train

    from vpure.runtime.errors import ConfigError

    if args.out is None and not args.overwrite_shipped:
        raise ConfigError("give --out DIR for the new weights; --overwrite-shipped replaces the shipped "
                          "default deployment's weights in place")
    world = WorldConfig(seed=args.world_seed)
    names = ORDER if args.component == "all" else (args.component,)
    for name in names:
        changes = {k: v for k, v in (("steps", args.steps), ("train_clips", args.train_clips),
                                     ("eval_clips", args.eval_clips), ("batch", args.batch), ("lr", args.lr),
                                     ("crop", args.crop), ("object_weight", args.object_weight),
                                     ("feature_weight", args.feature_weight),
                                     ("precision", args.precision))
                   if v is not None}
        if args.resume:
            changes["resume"] = True
        if args.freeze_encoder:
            changes["freeze_encoder"] = True
        cfg = BUDGETS[name].replace(seed=args.seed, **changes)
        command = "vpure train " + " ".join(a for a in sys.argv[2:] if a) if len(sys.argv) > 2 else f"vpure train {name}"
        card = train(cfg, world, args.out, command=command.replace(" all", f" {name}") if args.component == "all"
                     else command)
        print(f"{name}: {json.dumps(card['metrics'])} ({card['train_seconds']:.0f} s, {card['parameters']} parameters)")
    return 0
