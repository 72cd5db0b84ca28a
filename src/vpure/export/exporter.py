"""One exporter for every registered component: the registry description drives it.

torch -> ONNX (the exporter the component declares), ``onnx.checker``, shape inference,
then parity against the torch module on sample inputs at the profile's min and opt shapes
before anything is written as final. fp16 keeps fp32 inputs/outputs and the component's
fragile ops in fp32; int8 is ONNX Runtime static QDQ quantisation with a recorded
calibration recipe. Idempotent: a matching artefact with a valid sidecar is reused.
"""

from __future__ import annotations

import hashlib
import io
import logging
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch

from vpure.runtime.int8_calibration import calibration_batches, parity_batches
from vpure.runtime import artifacts, atomic
from vpure.runtime.errors import ArtifactError
from vpure.runtime.log import get_logger
from vpure.runtime.metrics import sqnr_db
from vpure.runtime.precision import CalibrationRecipe, Precision
from vpure.runtime.registry import ComponentSpec

log = get_logger(__name__)


def _torch_to_onnx(spec: ComponentSpec, module: torch.nn.Module) -> onnx.ModelProto:
    inputs = spec.sample_inputs(seed=0)
    dyn = spec.dynamic_dims()
    axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str) and d in dyn}
            for t in (*spec.inputs, *spec.outputs)}
    buf = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(module.eval(), tuple(inputs.values()), buf, input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes={k: v for k, v in axes.items() if v},
                          opset_version=spec.opset, dynamo=(spec.exporter == "dynamo"))
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


def _to_fp16(spec: ComponentSpec, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(spec.fp32_ops))
    kept = sorted({n.op_type for n in model.graph.node if n.op_type in block})
    return _drop_duplicate_casts(convert_float_to_float16(model, keep_io_types=True, op_block_list=block)), kept


def _drop_duplicate_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 converter can emit the same Cast (same input, output, target) twice when a
    blocked op's input is shared; keep one. Anything else defined twice is an error."""
    seen: dict[str, onnx.NodeProto] = {}
    keep = []
    for node in model.graph.node:
        dup = next((o for o in node.output if o in seen), None)
        if dup is None:
            keep.append(node)
            seen.update({o: node for o in node.output})
            continue
        first = seen[dup]
        if node.op_type != "Cast" or first.SerializeToString() != node.SerializeToString():
            raise ArtifactError(f"fp16 conversion defined {dup!r} twice with different nodes")
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _int8_float(spec: ComponentSpec, node) -> bool:
    return node.op_type in spec.fp32_ops or node.op_type in spec.int8_float_ops


def _to_int8(spec: ComponentSpec, model: onnx.ModelProto, recipe: CalibrationRecipe, work: Path,
             companions: Mapping[str, Any] | None) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration_batches(spec, recipe, companions))

        def get_next(self):
            return next(self.it, None)

    src, dst = work / "fp32.onnx", work / "int8.onnx"
    onnx.save(model, str(src))
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[recipe.method]
    extra = {"CalibPercentile": recipe.percentile} if recipe.method == "percentile" else {}
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # ORT's quantizer chats on the root logger: quiet it for this call
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method, reduce_range=recipe.reduce_range,
                        nodes_to_exclude=[n.name for n in model.graph.node if _int8_float(spec, n)],
                        extra_options=extra)
    finally:
        root.setLevel(level)
    return onnx.load(str(dst))


def _parity(module: torch.nn.Module, model_bytes: bytes, samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the optimiser's notes on unused initialisers are not the user's concern
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    worst_abs, worst_sqnr = 0.0, math.inf
    for inputs in samples:
        with torch.inference_mode():
            ref = module(*inputs.values())
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        outs = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        for r, o in zip(refs, outs):
            o = torch.from_numpy(np.asarray(o)).double()
            worst_abs = max(worst_abs, float((o - r.double()).abs().max()))
            worst_sqnr = min(worst_sqnr, sqnr_db(o, r))
    return {"max_abs": worst_abs, "sqnr_db": worst_sqnr}


def _check_parity(spec: ComponentSpec, precision: Precision, parity: dict[str, Any]) -> None:
    tol = spec.tolerance
    if precision is Precision.FP32:
        ok = parity["max_abs"] <= tol.fp32_atol + tol.fp32_rtol * 10  # outputs are O(1..10)
        need = f"max_abs <= {tol.fp32_atol} (+rtol)"
    else:
        floor = tol.fp16_sqnr_db if precision is Precision.FP16 else tol.int8_sqnr_db
        ok, need = parity["sqnr_db"] >= floor, f"SQNR >= {floor} dB"
    if not ok:
        raise ArtifactError(f"{spec.name} {precision.value}: parity {parity} misses the declared {need}; "
                            f"nothing was written")


def export_component(spec: ComponentSpec, module: torch.nn.Module, out_dir: str | Path,
                     precision: Precision | str = Precision.FP32, *, calibration: CalibrationRecipe | None = None,
                     source: str = "random-init", force: bool = False,
                     companions: Mapping[str, Any] | None = None, key: bytes | None = None,
                     source_id: str | None = None) -> Path:
    """Export ``module`` (the component's torch module) to ``out_dir``; returns the ONNX path.

    ``companions`` maps other component names to their torch modules, for int8 calibration
    from clips of latent-space components (the UNet and VAE decoder need the VAE encoder).
    ``key`` signs the sidecar (:mod:`vpure.runtime.artifacts`, signed folders). ``source_id``
    is the deployment's identity of the weights (:meth:`~vpure.runtime.deployment.Plan.source_id`),
    by which the runtime judges staleness without building the network.
    """
    precision = Precision.parse(precision)
    if precision.value not in spec.precisions:
        why = f"; {spec.precision_note}" if spec.precision_note else ""
        raise ArtifactError(f"{spec.name}: {precision.value} artefacts are not offered "
                            f"(supported: {', '.join(spec.precisions)}{why})")
    recipe = calibration or (CalibrationRecipe() if precision is Precision.INT8 else None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / artifacts.artifact_name(spec, precision, recipe)
    source_hash = artifacts.state_hash(module)
    if final.is_file() and not force:
        try:
            side = artifacts.verify(final, spec, precision, recipe, trust=artifacts.Trust(key=key))
            if side.get("source_sha256") == source_hash and side.get("source_id") == source_id:
                log.info("reusing %s", final.name)
                return final
        except ArtifactError as e:
            log.warning("rebuilding %s: %s", final.name, e)
    module = module.eval()
    model = _torch_to_onnx(spec, module)
    kept: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        if precision is Precision.FP16:
            model, kept = _to_fp16(spec, model)
        elif precision is Precision.INT8:
            model = _to_int8(spec, model, recipe, Path(work), companions)
            kept = sorted({n.op_type for n in model.graph.node if _int8_float(spec, n)})
    data = model.SerializeToString()
    parity = _parity(module, data, parity_batches(spec, recipe, companions))
    _check_parity(spec, precision, parity)
    sidecar = {
        "sidecar_version": artifacts.SIDECAR_VERSION, "component": spec.name, "precision": precision.value,
        "calibration_id": artifacts.calibration_id(precision, recipe),
        "calibration": recipe.to_dict() if recipe else None,
        "profile_id": artifacts.profile_id(spec), "profile": {k: list(v) for k, v in spec.profile.items()},
        "inputs": list(spec.input_names), "outputs": list(spec.output_names),
        "toolchain": artifacts.toolchain(), "exporter": spec.exporter, "exporter_reason": spec.exporter_reason,
        "opset": spec.opset, "source": source, "source_sha256": source_hash,
        "source_id": source_id,
        "onnx_sha256": hashlib.sha256(data).hexdigest(), "parity": parity, "kept_fp32": kept,
    }
    atomic.write_bytes(final, data)
    atomic.write_text(artifacts.sidecar_path(final), json.dumps(artifacts.sign(sidecar, key), indent=2, sort_keys=True))
    log.info("wrote %s (parity %s)", final.name, parity)
    return final
