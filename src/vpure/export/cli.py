"""``vpure export``: components -> ONNX artefacts (and TensorRT engines) with sidecars, and a parity table."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--components", default="all",
                   help="comma-separated networks (recognizer, frame_classifier, unet, encoder, decoder, comdefend, "
                        "raft) or registry names, or 'all' (default: every network the deployment serves)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,fp16,int8")
    p.add_argument("--out", type=Path, default=Path("engines"), help="artefact folder (default ./engines)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--deployment", metavar="NAME|FILE",
                     help="export every network of a deployment: 'miniworld', 'tiny', or a run-configuration TOML "
                          "with a [models] table; writes the folder's engines manifest for `vpure run --engines`")
    src.add_argument("--tiny", action="store_true", help="same as --deployment tiny")
    src.add_argument("--miniworld", action="store_true", help="same as --deployment miniworld")
    src.add_argument("--model-dir", type=Path,
                     help="registry components one by one: a ModelScope folder for unet/vae_encoder/vae_decoder "
                          "(registry profiles; no manifest)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="with --model-dir: checkpoint for a non-diffusion component (repeatable)")
    p.add_argument("--calibration", default=None, metavar="SOURCE",
                   help="int8 calibration samples: 'clips:DIR' (videos in DIR), 'miniworld' (the mini-world's "
                        "training clips; the default for the shipped deployments) or 'random' (declared input "
                        "ranges; only when asked for)")
    p.add_argument("--calib-count", type=int, default=16, help="int8 calibration sample count (default 16)")
    p.add_argument("--calib-method", default="minmax", choices=("minmax", "entropy", "percentile"))
    p.add_argument("--int8-full-range", action="store_true",
                   help="8-bit int8 weights (default 7-bit: x86 CPUs without VNNI saturate with 8-bit weights); "
                        "only for boxes known to have VNNI, ARM or TensorRT")
    p.add_argument("--check-clips", type=int, default=4,
                   help="held-out clips an fp16/int8 UNet, VAE or gate is judged on (default 4)")
    p.add_argument("--allow-degraded", action="store_true",
                   help="keep an artefact below the defence floors (it is reported, not removed)")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT engines (needs tensorrt and a CUDA GPU; skipped with the reason otherwise)")
    p.add_argument("--clip", type=Path, help="with --model-dir: video for the UNet's effect on the VideoPure members")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching artefact exists")
    p.add_argument("--key-file", type=Path, default=None,
                   help="sign every sidecar with the key in this file (default: VPURE_ENGINES_KEY if set); "
                        "the runtime then refuses unsigned or edited artefacts")


# The floors an fp16/int8 artefact must meet on held-out clips, or it is not served.
MEMBER_FLOOR = 6  # of 7 VideoPure members agreeing with the fp32 torch defence, with the same label ...
CLIP_FLOOR = 0.9  # ... on at least this fraction of the clips; and the gate's route on this fraction


def _modules(args, specs, ckpts) -> dict:
    from vpure.runtime.registry import Role

    modules = {}
    for spec in specs:
        if spec.role in (Role.EPS, Role.VAE_ENCODER, Role.VAE_DECODER):  # one ModelScope folder
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
    enc, dec = registry.get("vae_encoder").load(args.model_dir), registry.get("vae_decoder").load(args.model_dir)
    # The recogniser only has to be fixed for both runs: a tiny per-frame one is enough to compare labels.
    rec = MeanOverTime(registry.get("frame_classifier").build(seed=0)).eval()
    clip = load_clip(args.clip, frames, size) if args.clip else synthetic_clip(frames, size)
    backend = create_backend(unet_spec, ComponentChoice(backend="onnxruntime", precision=precision,
                                                        calibration=recipe), engines_dir=engines_dir)
    e = unet_member_effect(unet, backend, enc, dec, rec, clip)
    line = (f"unet {precision.value}: {e['members_agree']}/{e['members']} VideoPure members agree with torch, "
            f"label {e['label_engine']} vs {e['label_torch']}, max |d logit| {e['max_logit_diff']:.3g}, "
            f"purified frames SQNR {e['frames_sqnr_db']:.1f} dB")
    return line, e["label_engine"] == e["label_torch"]


def run(args: argparse.Namespace) -> int:
    from vpure.runtime.extras import require

    require("onnx", "export", "vpure export")
    if args.model_dir is not None:
        return _export_components(args)
    return _export_deployment(args, "tiny" if args.tiny else "miniworld" if args.miniworld else args.deployment)


def _networks(plan, components: str) -> list[str]:
    from vpure.runtime import deployment
    from vpure.runtime.errors import ConfigError

    served = [n for n in deployment.NETWORKS if plan.has(n) and (n != "raft" or plan.flow == "raft")]
    if components == "all":
        return served
    by_name = {n: n for n in served} | {deployment.registry_name(n, plan.recognizer_component): n for n in served}
    out = []
    for name in (c.strip() for c in components.split(",")):
        if name not in by_name:
            raise ConfigError(f"--components: {name!r} is not a network of this deployment; it serves "
                              f"{', '.join(served)}")
        out.append(by_name[name])
    return out


def _export_deployment(args: argparse.Namespace, ref: str) -> int:
    """Every network of a deployment at the shapes the runtime calls, an engines manifest,
    and the defence checks of reduced-precision artefacts."""
    import json
    import traceback

    from vpure.export.exporter import export_component
    from vpure.runtime import artifacts, deployment, manifest
    from vpure.runtime.errors import ConfigError, VpureError
    from vpure.runtime.log import get_logger
    from vpure.runtime.precision import CalibrationRecipe, Precision

    log = get_logger("vpure.export")
    if args.checkpoint:
        raise ConfigError("--checkpoint applies to --model-dir exports; a deployment names its own weights")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file, not an artefact folder")
    models = deployment.read_deployment(ref)
    plan = deployment.plan(models)
    nets = _networks(plan, args.components)
    precisions = [Precision.parse(p.strip()) for p in args.precision.split(",")]
    source = args.calibration or ("miniworld" if models.builtin else None)
    if source is None and Precision.INT8 in precisions:
        raise ConfigError("int8 calibrates on the deployment's own data: give --calibration clips:DIR (videos like "
                          "the cameras'), or --calibration random to accept noise (not advised)")
    data = CalibrationRecipe(source=source or "random", count=args.calib_count, method=args.calib_method,
                             reduce_range=not args.int8_full_range)
    built: dict[str, object] = {}

    def module(net: str):
        if net not in built:
            built[net] = deployment.load_network(plan, net)
        return built[net]

    latent = {"unet", "decoder"} & set(nets)
    companions = {"vae_encoder": module("encoder")} if latent and data.source != "random" else {}
    info = {"id": plan.identity(), "name": models.name or str(ref), "frames": plan.frames, "size": plan.size,
            "num_classes": plan.num_classes, "class_names": list(plan.class_names), "flow": plan.flow}
    key = artifacts.engines_key(args.key_file)
    trt = None
    if args.tensorrt:
        from vpure.export.tensorrt_builder import build_engine, unavailable_reason

        why = unavailable_reason()
        print(f"skipping TensorRT engines: {why}" if why else "building TensorRT engines beside the ONNX artefacts")
        trt = None if why else build_engine
    rows, checks, failed = [], [], []
    for net in nets:
        spec = plan.spec(net)
        for precision in precisions:
            if precision.value not in spec.precisions:
                print(f"skipping {net} ({spec.name}) {precision.value}: {spec.precision_note}")
                continue
            rec = data if precision is Precision.INT8 else None
            shape = ", ".join(f"{d}={lo}..{hi}" if lo != hi else f"{d}={lo}" for d, (lo, _, hi) in spec.profile.items())
            try:
                path = export_component(spec, module(net), args.out, precision, calibration=rec, force=args.force,
                                        source=f"deployment {info['name']}", companions=companions, key=key,
                                        source_id=plan.source_id(net))
            except (VpureError, RuntimeError, ValueError) as e:
                log.debug("export of %s %s failed:\n%s", net, precision.value, traceback.format_exc())
                failed.append(f"{net} ({spec.name}) {precision.value} at {shape}: {type(e).__name__}: {e} "
                              "(--log-level DEBUG prints the traceback)")
                continue
            side = json.loads(artifacts.sidecar_path(path).read_text())
            manifest.record(args.out, info, net, spec, precision.value, path, rec.to_dict() if rec else None)
            rows.append((net, precision.value, side["parity"], path.name, side["kept_fp32"]))
            if trt is not None:
                engine = trt(spec, args.out, precision, rec, force=args.force, key=key)
                rows.append((net, precision.value + " trt", side["parity"], engine.name, side["kept_fp32"]))
            if precision is Precision.FP32 or net not in ("unet", "encoder", "decoder", "frame_classifier"):
                continue
            line, ok = _defence_check(plan, net, spec, module, args.out, precision, rec, data, args.check_clips)
            checks.append(line)
            if ok:
                continue
            if args.allow_degraded:
                checks.append(f"DEGRADED: {path.name} is below the floor and kept (--allow-degraded)")
                continue
            for f in (path, artifacts.sidecar_path(path)):
                f.unlink(missing_ok=True)
            manifest.drop(args.out, net, precision.value)
            hint = (" (calibrated on random inputs: use --calibration miniworld or clips:DIR)"
                    if rec is not None and rec.source == "random" else "")
            failed.append(f"{path.name} is below the defence floor ({line}); removed{hint}; --allow-degraded keeps it")
    _table(rows)
    for line in checks:
        print(line)
    for line in failed:
        print(f"FAILED: {line}")
    if rows:
        print(f"engines manifest: {manifest.path(args.out)} (vpure run --deployment {ref} --engines {args.out} "
              f"--precision P)")
    return 1 if failed else 0


def _table(rows) -> None:
    print("\n| network | precision | max abs err | SQNR dB | kept in float | artefact |\n|---|---|---|---|---|---|")
    for name, prec, parity, fname, kept in rows:
        print(f"| {name} | {prec} | {parity['max_abs']:.3g} | {parity['sqnr_db']:.1f} | {', '.join(kept) or '-'} | {fname} |")


def _defence_check(plan, net, spec, module, engines_dir, precision, recipe, data, n_clips) -> tuple[str, bool]:
    """The artefact's effect on the defence over held-out clips, and whether it meets the floors:
    a UNet or VAE keeps VideoPure's label with >= MEMBER_FLOOR of 7 members agreeing, a gate
    keeps the route, each on >= CLIP_FLOOR of the clips."""
    import torch

    from vpure.export import report
    from vpure.runtime.backends import as_module_call, create_backend
    from vpure.runtime.detect import exception_index, route
    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.runtime.runconfig import ComponentChoice

    backend = create_backend(spec, ComponentChoice(backend="onnxruntime", precision=precision, calibration=recipe),
                             engines_dir=engines_dir)
    clips = report.held_out_clips(data if data.source != "random" else None, plan.frames, plan.size, n_clips)
    what = f"{net} {precision.value} on {len(clips)} held-out clips"
    if net == "frame_classifier":
        served = as_module_call(backend)
        same = 0
        with torch.inference_mode():
            for clip in clips:
                a = route(exception_index(module(net)(clip)[0].argmax(-1).tolist()))
                b = route(exception_index(served(clip)[0].argmax(-1).tolist()))
                same += a == b
        ok = same >= CLIP_FLOOR * len(clips)
        return f"{what}: the gate's route kept on {same}/{len(clips)} (floor {CLIP_FLOOR:.0%})", ok
    reference = (eps_fn_of(module("unet")), module("encoder"), module("decoder"))
    served = list(reference)
    served[("unet", "encoder", "decoder").index(net)] = (report.backend_eps_fn(backend) if net == "unet"
                                                         else as_module_call(backend))
    with torch.inference_mode():
        effects = [report.videopure_effect(reference, tuple(served), module("recognizer"), c) for c in clips]
    good = sum(e["label_engine"] == e["label_torch"] and e["members_agree"] >= MEMBER_FLOOR for e in effects)
    flips = sum(e["label_engine"] != e["label_torch"] for e in effects)
    worst = min(effects, key=lambda e: e["members_agree"])
    line = (f"{what}: VideoPure's label and >= {MEMBER_FLOOR}/7 members kept on {good}/{len(clips)} (floor "
            f"{CLIP_FLOOR:.0%}); worst {worst['members_agree']}/{worst['members']} VideoPure members agree, "
            f"purified frames SQNR {worst['frames_sqnr_db']:.1f} dB"
            + (f"; flips VideoPure's label on {flips}" if flips else ""))
    return line, good >= CLIP_FLOOR * len(clips)


def _export_components(args: argparse.Namespace) -> int:
    """--model-dir: registry components one by one, at their registry profiles."""
    import json

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
    for name, path in ckpts.items():
        registry.get(name)  # an unknown name is named before any export
        if not path.exists():
            raise ConfigError(f"--checkpoint {name}={path}: no such file or folder")
    if args.calibration is None and Precision.INT8 in precisions:
        raise ConfigError("int8 needs calibration data: --calibration clips:DIR (videos like the cameras'), or "
                          "--calibration random to accept noise (not advised)")
    recipe = CalibrationRecipe(source=args.calibration or "random", count=args.calib_count,
                               method=args.calib_method, reduce_range=not args.int8_full_range)
    modules = _modules(args, specs, ckpts)
    companions = dict(modules)
    if "vae_encoder" not in companions and recipe.source != "random" and "int8" in args.precision:
        companions["vae_encoder"] = registry.get("vae_encoder").load(args.model_dir)
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
                                        force=args.force, source="checkpoint", companions=companions, key=key)
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
