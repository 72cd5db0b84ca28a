"""TensorRT backend: a verified serialized engine behind the one backend call.

Loads ``<component>...trt<version>-sm<XY>.engine`` (built by ``vpure export --tensorrt``),
checks its sidecar against the request, the installed TensorRT version and this GPU's
family, and binds every I/O tensor by name. Inputs are bound in place when already on
the GPU and contiguous; outputs land in buffers preallocated per input shape. With
``cuda_graph=True`` each input shape's execution is captured once (after a warm-up run)
into a CUDA graph over static input/output buffers and replayed afterwards.

Only the TensorRT runtime is imported here, never its builder (that lives in
``vpure.export``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..artifacts import device_tag, engine_name, find_artifact, verify
from ..errors import ArtifactError, BackendUnavailable, ConfigError
from ..log import get_logger
from ..precision import Precision
from ..registry import ComponentSpec
from ..runconfig import ComponentChoice
from ..versions import package_version
from .base import OutputBuffers, check_inputs, check_profile

log = get_logger(__name__)


def tensorrt_version() -> str | None:
    """The installed TensorRT version (metadata only; nothing is imported)."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs"):
        v = package_version(dist)
        if v:
            return v
    return None


def unavailable_reason(device: str = "cuda") -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can."""
    if tensorrt_version() is None:
        return "the tensorrt package is not installed (pip install 'vpure[tensorrt]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA device and torch sees none"
    if torch.device(device).type != "cuda":
        return f"TensorRT runs on CUDA devices, the runtime config says device={device!r}"
    return None


class TrtBackend:
    name = "tensorrt"

    def __init__(self, spec: ComponentSpec, path, precision: Precision, recipe=None, device: str = "cuda", *,
                 cuda_graph: bool = False, reuse_outputs: bool = False, trust=None):
        import tensorrt as trt

        self.spec, self.precision, self.path = spec, precision, path
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        tag = device_tag(torch.cuda.get_device_capability(self.device))
        self.sidecar = verify(path, spec, precision, recipe, expect={"tensorrt": trt.__version__, "device_tag": tag},
                              trust=trust)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{path.name}: TensorRT could not deserialize the engine")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != set(spec.input_names) | set(spec.output_names):
            raise ArtifactError(f"{path.name}: engine tensors {sorted(names)} do not match the registry's "
                                f"{sorted((*spec.input_names, *spec.output_names))}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graph, self.reuse_outputs = cuda_graph, reuse_outputs
        self._outputs = OutputBuffers(spec, self.device)
        self._graphs: dict[tuple, tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        log.info("%s: %s (TensorRT %s, %s)", spec.name, path.name, trt.__version__, tag)

    def _bind(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for name, x in inputs.items():
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        for name, b in outputs.items():
            self.context.set_tensor_address(name, b.data_ptr())

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendUnavailable(f"{self.spec.name}: TensorRT execution failed (see the TensorRT log above)")

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_inputs(self.spec, inputs)
        dims = check_profile(self.spec, inputs)
        xs = {t.name: inputs[t.name].detach().to(self.device, getattr(torch, t.dtype)).contiguous()
              for t in self.spec.inputs}
        outs = self._outputs.get(dims)
        if outs is None:
            raise ConfigError(f"{self.spec.name}: an output has a dimension no input determines; the TensorRT "
                              f"backend needs every output shape fixed by the inputs or the profile")
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        key = tuple(sorted(dims.items()))
        with torch.cuda.stream(self.stream):
            if not self.cuda_graph:
                for v in xs.values():  # the caller may free its inputs before this stream is done with them
                    v.record_stream(self.stream)
                self._bind(xs, outs)
                self._execute()
            elif key in self._graphs:
                graph, static_in, outs = self._graphs[key]  # the graph owns the buffers it writes
                for k, v in xs.items():
                    static_in[k].copy_(v)
                graph.replay()
            else:
                static_in = {k: v.clone() for k, v in xs.items()}
                self._bind(static_in, outs)
                self._execute()  # warm-up run: TensorRT allocates lazily on the first execution
                self.stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                outs = {k: v.clone() for k, v in outs.items()}  # private to the graph, never evicted under it
                self._bind(static_in, outs)
                with torch.cuda.graph(graph, stream=self.stream):
                    self._execute()
                self._graphs[key] = (graph, static_in, outs)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs if self.reuse_outputs else {k: v.clone() for k, v in outs.items()}


def create(spec: ComponentSpec, choice: ComponentChoice, *, module: Any = None, device: str = "cuda",
           engines_dir: Any = None, reuse_outputs: bool = False, trust=None) -> TrtBackend:
    why = unavailable_reason(device)
    if why:
        raise BackendUnavailable(f"component {spec.name!r}: the tensorrt backend is unavailable: {why}")
    if engines_dir is None:
        raise ConfigError(f"component {spec.name!r}: the tensorrt backend needs engines_dir")
    import tensorrt as trt

    dev = torch.device(device)
    tag = device_tag(torch.cuda.get_device_capability(dev))
    path = find_artifact(engines_dir, spec, choice.precision, choice.recipe,
                         name=engine_name(spec, choice.precision, choice.recipe, trt.__version__, tag))
    return TrtBackend(spec, path, choice.precision, choice.recipe, device, cuda_graph=choice.cuda_graph,
                      reuse_outputs=reuse_outputs, trust=trust)
