"""``vpure export``: components -> ONNX artefacts (and TensorRT engines) with sidecars, and a parity table."""

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
    src.add_argument("--miniworld", action="store_true",
                     help="export the shipped mini-world models (16x64x64 profiles) for `vpure run --engines`")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="checkpoint for a non-diffusion component (repeatable)")
    p.add_argument("--calibration", default="random", metavar="SOURCE",
                   help="int8 calibration samples: 'random' (declared input ranges), 'clips:DIR' (videos in DIR) "
                        "or 'miniworld' (the mini-world's training clips)")
    p.add_argument("--calib-count", type=int, default=16, help="int8 calibration sample count (default 16)")
    p.add_argument("--calib-method", default="minmax", choices=("minmax", "entropy", "percentile"))
    p.add_argument("--int8-full-range", action="store_true",
                   help="8-bit int8 weights (default 7-bit: x86 CPUs without VNNI saturate with 8-bit weights); "
                        "only for boxes known to have VNNI, ARM or TensorRT")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT engines (needs tensorrt and a CUDA GPU; skipped with the reason otherwise)")
    p.add_argument("--clip", type=Path, help="video for the UNet's effect on the VideoPure members (default: synthetic)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching artefact exists")
    p.add_argument("--key-file", type=Path, default=None,
                   help="sign every sidecar with the key in this file (default: VPURE_ENGINES_KEY if set); "
                        "the runtime then refuses unsigned or edited artefacts")


def _miniworld(names: list[str]) -> tuple[list, dict]:
    """Mini-world modules under the registry names they deploy as, with the mini profiles."""
    from vpure.runtime import presets
    from vpure.runtime.miniworld.models import load_world
    from vpure.runtime.runner import REGISTRY_NAMES

    world = load_world()
    by_name = {reg: getattr(world, f) for f, reg in REGISTRY_NAMES.items()}
    wanted = [n for n in names if n in by_name]
    for n in names:
        if n not in by_name:
            print(f"skipping {n}: not part of the mini-world")
    return [presets.component_spec("mini", n) for n in wanted], {n: by_name[n] for n in wanted}


def _modules(args, specs, ckpts) -> dict:
    from vpure.runtime.registry import Role

    modules = {}
    for spec in specs:
        if args.tiny:
            modules[spec.name] = spec.build(seed=0)
        elif spec.role in (Role.EPS, Role.VAE_ENCODER, Role.VAE_DECODER):  # one ModelScope folder
            modules[spec.name] = spec.load(args.model_dir)
        elif spec.name in ckpts:
            modules[spec.name] = spec.load(ckpts[spec.name])
        else:
            print(f"skipping {spec.name}: no checkpoint given (--checkpoint {spec.name}=PATH)")
    return modules


def _member_effect(args, unet_spec, unet, engines_dir, precision, recipe) -> tuple[str, bool]:
    """One line on the UNet artefact's effect on the seven VideoPure members, and whether the
    purified clip keeps the label torch gives it (an artefact that flips it is not served)."""
    from vpure.export.report import synthetic_clip, unet_member_effect
    from vpure.runtime import registry
    from vpure.runtime.backends import create_backend
    from vpure.runtime.presets import MeanOverTime
    from vpure.runtime.runconfig import ComponentChoice
    from vpure.runtime.video import load_clip

    dims = unet_spec.dims("opt")
    frames, size = int(dims["T"]), 8 * int(dims["h"])
    if args.tiny:
        enc, dec = registry.get("vae_encoder").build(seed=0), registry.get("vae_decoder").build(seed=0)
    elif args.miniworld:
        from vpure.runtime.miniworld.models import load_world

        world = load_world()
        enc, dec = world.encoder, world.decoder
    else:
        enc, dec = registry.get("vae_encoder").load(args.model_dir), registry.get("vae_decoder").load(args.model_dir)
    # The recogniser only has to be fixed for both runs: a tiny per-frame one is enough to
    # compare labels, the trained one (and a test clip) where the mini-world is exported.
    rec = world.recognizer if args.miniworld else MeanOverTime(registry.get("frame_classifier").build(seed=0)).eval()
    if args.clip:
        clip = load_clip(args.clip, frames, size)
    elif args.miniworld:
        from vpure.runtime.miniworld.dataset import make_clip

        clip = make_clip("test", 0).clip[:, :frames][None].contiguous()
    else:
        clip = synthetic_clip(frames, size)
    backend = create_backend(unet_spec, ComponentChoice(backend="onnxruntime", precision=precision,
                                                        calibration=recipe), engines_dir=engines_dir)
    e = unet_member_effect(unet, backend, enc, dec, rec, clip)
    line = (f"unet {precision.value}: {e['members_agree']}/{e['members']} VideoPure members agree with torch, "
            f"label {e['label_engine']} vs {e['label_torch']}, max |d logit| {e['max_logit_diff']:.3g}, "
            f"purified frames SQNR {e['frames_sqnr_db']:.1f} dB")
    return line, e["label_engine"] == e["label_torch"]


def run(args: argparse.Namespace) -> int:
    import json

    from vpure.runtime.extras import require

    require("onnx", "export", "vpure export")
    from vpure.export.exporter import export_component
    from vpure.runtime import artifacts, registry
    from vpure.runtime.errors import ArtifactError, ConfigError
    from vpure.runtime.precision import CalibrationRecipe, Precision

    names = [s.name for s in registry.components()] if args.components == "all" else args.components.split(",")
    specs = [registry.get(n.strip()) for n in names]
    precisions = [Precision.parse(p.strip()) for p in args.precision.split(",")]
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file, not an artefact folder")
    ckpts = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--checkpoint {item!r} must be NAME=PATH")
        ckpts[name] = Path(path)
    if ckpts and (args.tiny or args.miniworld):  # those export their own weights: a checkpoint would be ignored
        raise ConfigError(f"--checkpoint applies to --model-dir exports; --{'tiny' if args.tiny else 'miniworld'} "
                          "exports its own weights")
    for name, path in ckpts.items():
        registry.get(name)  # an unknown name is named before any export
        if not path.exists():
            raise ConfigError(f"--checkpoint {name}={path}: no such file or folder")
    recipe = CalibrationRecipe(source=args.calibration, count=args.calib_count, method=args.calib_method,
                               reduce_range=not args.int8_full_range)
    if args.miniworld:
        specs, modules = _miniworld([s.name for s in specs])
    else:
        modules = _modules(args, specs, ckpts)
    companions = dict(modules)
    if "vae_encoder" not in companions and args.calibration != "random" and "int8" in args.precision:
        vae = registry.get("vae_encoder")
        if args.miniworld:
            from vpure.runtime.miniworld.models import load_world

            companions["vae_encoder"] = load_world().encoder
        else:
            companions["vae_encoder"] = vae.build(seed=0) if args.tiny else vae.load(args.model_dir)
    key = artifacts.engines_key(args.key_file)
    trt_why = None
    if args.tensorrt:
        from vpure.export.tensorrt_builder import build_engine, unavailable_reason

        trt_why = unavailable_reason()
        if trt_why:
            print(f"skipping TensorRT engines: {trt_why}")
    rows, effects, failed = [], [], []
    for spec in specs:
        if spec.name not in modules:
            continue
        for precision in precisions:
            if precision.value not in spec.precisions:
                print(f"skipping {spec.name} {precision.value}: {spec.precision_note}")
                continue
            rec = recipe if precision is Precision.INT8 else None
            try:
                path = export_component(spec, modules[spec.name], args.out, precision, calibration=rec,
                                        force=args.force, source="tiny random-init" if args.tiny else
                                        "mini-world shipped weights" if args.miniworld else "checkpoint",
                                        companions=companions, key=key)
            except ArtifactError as e:  # one failed artefact does not cost the others
                failed.append(str(e))
                continue
            side = json.loads(artifacts.sidecar_path(path).read_text())
            rows.append((spec.name, precision.value, side["parity"], path.name, side["kept_fp32"]))
            built = [path]
            if args.tensorrt and not trt_why:
                engine = build_engine(spec, args.out, precision, rec, force=args.force, key=key)
                built.append(engine)
                rows.append((spec.name, precision.value + " trt", side["parity"], engine.name, side["kept_fp32"]))
            if spec.role == "eps":
                line, keeps_label = _member_effect(args, spec, modules[spec.name], args.out, precision, rec)
                effects.append(line)
                if not keeps_label:  # parity per call passed, the purified clip's label did not: not served
                    for f in built:  # the ONNX artefact and any engine built from it, with sidecars
                        f.unlink(missing_ok=True)
                        artifacts.sidecar_path(f).unlink(missing_ok=True)
                    hint = (" (calibrated on random inputs: use --calibration miniworld or clips:DIR)"
                            if rec is not None and rec.source == "random" else "")
                    failed.append(f"{path.name} flips VideoPure's label ({line}); removed{hint}")
    print("\n| component | precision | max abs err | SQNR dB | kept in float | artefact |\n|---|---|---|---|---|---|")
    for name, prec, parity, fname, kept in rows:
        print(f"| {name} | {prec} | {parity['max_abs']:.3g} | {parity['sqnr_db']:.1f} | {', '.join(kept) or '-'} | {fname} |")
    for line in effects:
        print(line)
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed else 0
