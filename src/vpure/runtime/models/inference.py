"""The torch inference path's CPU rewrites per component kind, in one place: ``vpure run``
(:func:`vpure.runtime.runner.load_components`), the mini-world
(:func:`vpure.runtime.miniworld.models.load_world`) and the deployment-scale clean-route
benchmark load their models through these, so they run the same layers. Each rewrite keeps
parameters, state dict and gradients, is idempotent, and leaves training, autograd for the
weights and graph capture (tracing, ONNX export) on the original layers.
"""

from __future__ import annotations

import re

from torch import nn


def prepare_recognizer(module: nn.Module) -> None:
    """Every ``Conv3d`` through oneDNN (:func:`~.conv.use_blocked_conv3d`: batch-1 clips would
    otherwise hit ``slow_conv3d``; ``bench_models --conv3d``), then the fused plan of I3D and
    SlowFast recognisers (:func:`~.fused.use_fused_inference`; ``bench_models --fused``)."""
    from .conv import use_blocked_conv3d
    from .fused import use_fused_inference

    use_blocked_conv3d(module)
    use_fused_inference(module)


def prepare_frame_classifier(module: nn.Module) -> None:
    """Channels-last convolution weights (:func:`~.conv.use_channels_last`; 1.1-1.2x,
    ``bench_models --conv-layout``), then the fused plan of ResNet-style gates
    (:func:`~.fused.use_fused_inference`; ``bench_models --fused``)."""
    from .conv import use_channels_last
    from .fused import use_fused_inference

    use_channels_last(module)
    use_fused_inference(module)


def prepare_decoder(module: nn.Module) -> None:
    """Sub-pixel upsampling in the VAE decoder (:func:`~.rewrites.use_subpixel_upsampling`;
    ``bench_models --subpixel``) and its group norms fused with their SiLUs in the native
    kernel (:func:`~.rewrites.use_native_group_norm`): one pass over each map instead of
    PyTorch's norm and activation."""
    from .rewrites import use_native_group_norm, use_subpixel_upsampling

    use_subpixel_upsampling(module)
    use_native_group_norm(module)


def prepare_encoder(module: nn.Module) -> None:
    """The VAE encoder's group norms fused with their SiLUs in the native kernel
    (:func:`~.rewrites.use_native_group_norm`), as in :func:`prepare_decoder`."""
    from .rewrites import use_native_group_norm

    use_native_group_norm(module)


def compile_for_inference(module: nn.Module) -> nn.Module:
    """``module`` compiled by Inductor for inference calls: static shapes, and the weights
    frozen into the graph as constants (Inductor's ``freezing``: folded, and on CPU prepacked
    for oneDNN's convolution and matmul kernels, AMX where the CPU has it). The eager
    rewrites above are for eager calls; a compiled module should get the original layers
    (Inductor fuses diffusers' own graph better than the rewritten one), with three exceptions
    on CPU: attention layers with 8-, 16- or 32-wide heads get the native small-head kernel
    where its AVX-512 copy runs (:func:`~.attention_processors.use_native_attention`, one custom op in
    the graph instead of PyTorch's flash kernel; ``bench_models --native-attention``), and
    the VAE's group norms and the SiLU after each become the native group-norm kernel
    (:func:`~.rewrites.use_native_group_norm`; Inductor's own kernel for them on
    channels-last maps was two thirds of a compiled `small` decode), and every linear layer
    flattens its input itself (:class:`~.rewrites.FlatLinear`: Inductor ran the
    transformers' input projections as batched products against a copied weight).

    Compilation happens on the first call of each input shape and takes minutes for a UNet
    on a small CPU (a C++ compiler is needed on CPU, Triton on CUDA); later calls reuse it.
    Freezing applies to calls without autograd (``torch.inference_mode``/``no_grad``) and
    snapshots the module: its weights, and (:func:`_frozen_module_guards`) its structure and
    attributes, which Dynamo stops re-checking on every call; a module changed afterwards
    must be compiled again. Input shapes, dtypes and devices and the global state (grad
    mode, autocast) are still checked: a new one recompiles (up to 64 entries per compiled
    class's forward, Dynamo's recompile limit raised from 8 for the process). The module's parameters are
    set not to require gradients (the compiled path is for inference) and its attention
    processors may change as said above; it is otherwise unchanged. Returns the compiled
    wrapper."""
    import torch

    from .attention_processors import use_native_attention
    from .rewrites import use_flat_linears, use_native_group_norm

    module.requires_grad_(False)
    if all(p.device.type == "cpu" for p in module.parameters()):
        use_native_attention(module)
        use_native_group_norm(module)
        use_flat_linears(module)
    compiled = torch.compile(module, dynamic=False,
                             options={"freezing": True, "guard_filter_fn": _frozen_module_guards})
    return _with_dynamo_settings(compiled)


_RECOMPILE_LIMIT = 64


def _with_dynamo_settings(compiled):
    """The compiled module with :func:`dynamo_settings` applied around each of its calls
    (where Dynamo reads them), so the process's configuration is left as it was."""
    inner = compiled.forward

    def forward(*args, **kwargs):
        with dynamo_settings():
            return inner(*args, **kwargs)

    compiled.forward = forward
    return compiled


def dynamo_settings():
    """A context with the Dynamo settings compiled inference needs:

    - Dynamo keeps compiled entries per code object, shared by every compiled instance of a
      class: past ``recompile_limit`` (8) input shapes, dtypes or instances of, say,
      ``EpsUNet.forward``, later calls ran eagerly with only a log line. Each entry here is a
      deliberate static-shape compile, so the limit is 64 during these calls.
    - UNet3DConditionModel logs at info level when the latent is not a multiple of its
      upsampling factor; under Dynamo that call breaks the graph in two, so that logger's
      info and debug are ignored inside these calls.
    """
    import logging

    import torch

    logger = logging.getLogger("diffusers.models.unets.unet_3d_condition")
    cfg = torch._dynamo.config
    return cfg.patch(recompile_limit=max(cfg.recompile_limit, _RECOMPILE_LIMIT),
                     ignore_logging_functions=cfg.ignore_logging_functions | {logger.info, logger.debug})


def _frozen_module_guards(entries) -> list[bool]:
    """Dynamo guard filter for :func:`compile_for_inference`: drop the guards rooted at the
    compiled module (``self...``: its submodules, hooks, attributes, parameters and
    buffers), which freezing has baked in; keep the inputs', the global state's and the
    shape environment's. A `small` UNet call carries ~30,000 module guards, each
    evaluated on every call."""
    return [_MODULE_GUARD.search(e.name) is None for e in entries]


_MODULE_GUARD = re.compile(r"(^|\()self[.\[]")
