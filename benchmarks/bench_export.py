"""Exported artefacts vs torch eager, per component and precision, on the tiny and small presets.

For each component the reference is its torch eager fp32 module; the cases are the ONNX
Runtime fp32, fp16 and int8 artefacts built by the one exporter (cached under --engines).
The parity column is the SQNR against the torch output on the same inputs, so int8's
speed and accuracy sit side by side. On a CUDA machine torch CUDA fp16 is timed as well
(TensorRT and onnxruntime-gpu are absent on the lent GPU machines).

Run from the repository root:  .venv/bin/python -m benchmarks.bench_export [--presets tiny,small]
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

from vpure.export import export_component
from vpure.lab import timing as benchmark
from vpure.runtime import presets
from vpure.runtime.backends import create_backend
from vpure.runtime.metrics import sqnr_db
from vpure.runtime.precision import CalibrationRecipe
from vpure.runtime.runconfig import ComponentChoice

COMPONENTS = ("unet", "vae_encoder", "vae_decoder", "frame_classifier")


def _sqnr_parity(floor: float):
    def check(out, ref) -> str:
        (name, o), r = next(iter(out.items())), ref
        q = sqnr_db(o, r)
        assert q >= floor, f"{name} SQNR {q:.1f} dB < {floor} dB"
        return f"SQNR {q:.1f} dB"
    return check


def bench_preset(preset: str, engines: str, precisions: list[str], csv: str | None, calib_count: int) -> None:
    models = presets.build(preset, seed=0)
    for comp in COMPONENTS:
        spec = presets.component_spec(preset, comp)
        module = presets.component_module(models, comp)
        x = spec.sample_inputs(seed=0)

        def ref_fn(m=module, x=x):
            with torch.inference_mode():
                return m(*x.values())

        cases = []
        for p in precisions:
            if p not in spec.precisions:
                continue
            recipe = CalibrationRecipe(count=calib_count) if p == "int8" else None
            export_component(spec, module, engines, p, calibration=recipe, source=f"{preset} random-init")
            backend = create_backend(spec, ComponentChoice(backend="onnxruntime", precision=p, calibration=recipe),
                                     engines_dir=engines, reuse_outputs=True)
            floor = {"fp32": 80.0, "fp16": spec.tolerance.fp16_sqnr_db, "int8": spec.tolerance.int8_sqnr_db}[p]
            cases.append(benchmark.Case(f"onnxruntime {p}", lambda b=backend, x=x: b(**x), _sqnr_parity(floor)))
        if torch.cuda.is_available():
            half = module.to("cuda", torch.float16)
            xh = {k: (v.to("cuda", torch.float16) if v.is_floating_point() else v.to("cuda")) for k, v in x.items()}

            def cuda_fn(m=half, x=xh):
                with torch.inference_mode():
                    return {"out": m(*x.values()).float().cpu()}

            cases.append(benchmark.Case("torch cuda fp16", cuda_fn, _sqnr_parity(spec.tolerance.fp16_sqnr_db)))
        dims = {d: v for d, v in spec.dims("opt").items() if d in "BTHWhw"}
        benchmark.run("export", f"{comp} {preset} {dims}", benchmark.Case("torch eager fp32", ref_fn), cases,
                      csv_path=csv, min_iters=5, min_time_s=1.0)
        module.to("cpu", torch.float32)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--precisions", default="fp32,fp16,int8")
    p.add_argument("--engines", default="engines/bench", help="artefact cache (reused when sidecars match)")
    p.add_argument("--calib-count", type=int, default=8)
    p.add_argument("--csv", default="benchmarks/results/results.csv", help="CSV to append rows to ('' for none)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for preset in args.presets.split(","):
        bench_preset(preset.strip(), args.engines, args.precisions.split(","), args.csv, args.calib_count)


if __name__ == "__main__":
    main()
