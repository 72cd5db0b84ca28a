"""``vpure export``: components -> ONNX artefacts with sidecars, and a parity table."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--components", default="all", help="comma-separated registry names, or 'all'")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,fp16,int8")
    p.add_argument("--out", type=Path, default=Path("engines"), help="artefact folder (default ./engines)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", type=Path, help="ModelScope folder for unet/vae_encoder/vae_decoder")
    src.add_argument("--tiny", action="store_true", help="export the tiny random-init test configurations")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="checkpoint for a non-diffusion component (repeatable)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching artefact exists")


def run(args: argparse.Namespace) -> int:
    import json

    from vpure.export.exporter import export_component
    from vpure.runtime import artifacts, registry
    from vpure.runtime.errors import ConfigError
    from vpure.runtime.precision import Precision
    from vpure.runtime.registry import Role

    names = [s.name for s in registry.components()] if args.components == "all" else args.components.split(",")
    specs = [registry.get(n.strip()) for n in names]
    precisions = [Precision.parse(p.strip()) for p in args.precision.split(",")]
    ckpts = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--checkpoint {item!r} must be NAME=PATH")
        ckpts[name] = Path(path)
    rows = []
    for spec in specs:
        if args.tiny:
            module = spec.build(seed=0)
        elif spec.role in (Role.EPS, Role.VAE_ENCODER, Role.VAE_DECODER):  # one ModelScope folder
            module = spec.load(args.model_dir)
        elif spec.name in ckpts:
            module = spec.load(ckpts[spec.name])
        else:
            print(f"skipping {spec.name}: no checkpoint given (--checkpoint {spec.name}=PATH)")
            continue
        for precision in precisions:
            if precision.value not in spec.precisions:
                print(f"skipping {spec.name} {precision.value}: {spec.precision_note}")
                continue
            path = export_component(spec, module, args.out, precision, force=args.force,
                                    source="tiny random-init" if args.tiny else "checkpoint")
            side = json.loads(artifacts.sidecar_path(path).read_text())
            rows.append((spec.name, precision.value, side["parity"], path.name, side["kept_fp32"]))
    print("\n| component | precision | max abs err | SQNR dB | kept in float | artefact |\n|---|---|---|---|---|---|")
    for name, prec, parity, fname, kept in rows:
        print(f"| {name} | {prec} | {parity['max_abs']:.3g} | {parity['sqnr_db']:.1f} | {', '.join(kept) or '-'} | {fname} |")
    return 0
