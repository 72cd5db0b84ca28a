"""Inductor-compiled torch components (``ComponentChoice.compile``): same outputs as eager,
the eager rewrites left out for them, and a compiler failure named as a backend error."""

from __future__ import annotations

import pytest
import torch

from vpure.runtime import presets
from vpure.runtime.backends import create_backend
from vpure.runtime.errors import BackendUnavailable
from vpure.runtime.runconfig import ComponentChoice
from vpure.runtime.runner import RunConfig

pytestmark = pytest.mark.slow


def _tiny_unet_call():
    m = presets.build("tiny")
    spec = presets.component_spec("tiny", "unet")
    z = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    return m.unet, spec, z, torch.tensor([500])


def test_a_compiled_unet_gives_the_eager_outputs():
    unet, spec, z, t = _tiny_unet_call()
    with torch.inference_mode():
        want = unet(z, t)
    backend = create_backend(spec, ComponentChoice(compile=True), module=unet)
    got = backend(**dict(zip(spec.input_names, (z, t))))[spec.outputs[0].name]
    assert backend.compiled and not isinstance(backend.module, type(unet))  # the compiled wrapper, not the module
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_compiled_unet_is_one_graph_guarded_on_its_inputs_only():
    """compile_for_inference: no graph break at diffusers' upsample-size log line; guards
    rooted at the module dropped (freezing baked it in), the inputs' and global state's
    kept, so a new batch size recompiles and still gives the eager outputs."""
    from types import SimpleNamespace

    from vpure.runtime.models.inference import _frozen_module_guards, compile_for_inference, dynamo_settings

    names = ["self._modules['unet']._forward_hooks", "list(dict.keys(self._modules['unet'].__dict__))[0]",
             "self", "L['latents']", "latents", "G['torch']", "___check_global_state()"]
    assert _frozen_module_guards([SimpleNamespace(name=n) for n in names]) == [False, False, True, True, True,
                                                                               True, True]
    unet, _, z, t = _tiny_unet_call()
    z = z[..., :7, :7]  # not a multiple of the upsampling factor: diffusers logs (and forwards the size)
    with torch.inference_mode():
        want = unet(z, t)
        z2 = torch.cat([z, z.flip(0).mul(0.5)])
        want2 = unet(z2, t)
    torch._dynamo.reset()
    compiled = compile_for_inference(unet)
    with torch.inference_mode():
        with dynamo_settings():  # what every call of the compiled module runs under
            explained = torch._dynamo.explain(unet)(z, t)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        torch.testing.assert_close(compiled(z, t), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled(z2, t), want2, rtol=1e-4, atol=1e-4)  # recompiled for batch 2
    torch._dynamo.reset()


def test_a_compiler_failure_is_a_backend_error_naming_the_component(monkeypatch, tmp_path):
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing cached: the C++ compiler is needed
    torch._dynamo.reset()
    unet, spec, z, t = _tiny_unet_call()
    backend = create_backend(spec, ComponentChoice(compile=True), module=unet)
    # Inductor's own patch (monkeypatch's undo of its config left fx_graph_cache unset for later tests)
    with inductor_config.patch({"fx_graph_cache": False, "cpp.cxx": ("/nonexistent/c++",)}), \
            pytest.raises(BackendUnavailable, match=r"component 'unet': torch.compile could not compile it.*"
                                                    r"compile = false"):
        backend(**dict(zip(spec.input_names, (z, t))))
    torch._dynamo.reset()


def test_a_compiled_unet_keeps_diffusers_layers_where_an_eager_one_is_rewritten():
    from vpure.runtime.models.attention_processors import LeanSelfAttention
    from vpure.runtime.runner import load_components

    def lean_processors(unet) -> int:
        return sum(isinstance(getattr(m, "processor", None), LeanSelfAttention) for m in unet.modules())

    eager = load_components(RunConfig())
    assert isinstance(eager.unet, torch.nn.Module) and lean_processors(eager.unet) > 0
    compiled = load_components(RunConfig.from_dict({"runtime": {"components": {"unet": {"compile": True}}}}))
    backend = compiled.unet.backend  # a module call served by the torch backend; nothing compiled until called
    assert backend.compiled and lean_processors(backend.module._orig_mod) == 0
    assert isinstance(compiled.decoder, torch.nn.Module)  # the others stay the eager modules


def test_more_shapes_and_instances_than_dynamos_default_limit_all_compile():
    """Dynamo's entries are per code object, shared by every compiled instance of a class; past its
    default limit of 8 a call silently ran eagerly. compile_for_inference raises the limit."""
    from torch._dynamo.utils import counters

    from vpure.runtime.models.inference import compile_for_inference

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) * 2

    torch._dynamo.reset()
    limit, ignored = torch._dynamo.config.recompile_limit, set(torch._dynamo.config.ignore_logging_functions)
    compiled = [compile_for_inference(Small().eval()) for _ in range(10)]
    with torch.inference_mode():
        for i, c in enumerate(compiled):
            before = counters["stats"]["unique_graphs"]
            c(torch.ones(i + 1, 4))
            assert counters["stats"]["unique_graphs"] == before + 1, f"call {i} ran without compiling"
    # ... only inside its own calls: the process's Dynamo configuration is left as it was
    assert torch._dynamo.config.recompile_limit == limit
    assert set(torch._dynamo.config.ignore_logging_functions) == ignored
    torch._dynamo.reset()


def test_flat_linears_compute_the_same_and_keep_batched_products_out_of_the_graph():
    """FlatLinear: the same outputs, gradients and state dict as nn.Linear; in a traced graph
    a linear on permuted tokens is one matrix product, not a batched product against an
    expanded weight (what Inductor ran for diffusers' transformer input projections)."""
    from torch._dynamo.backends.common import aot_autograd
    from vpure.runtime.models.rewrites import FlatLinear, use_flat_linears

    class Tokens(torch.nn.Module):  # diffusers' permute-then-project, as in TransformerTemporalModel
        def __init__(self):
            super().__init__()
            self.proj_in = torch.nn.Linear(16, 24)
            self.head = torch.nn.Sequential(torch.nn.Linear(24, 8))

        def forward(self, x):  # (B, C, T, H, W) -> (B*H*W, T, C) tokens
            b, c, t, h, w = x.shape
            return self.head(self.proj_in(x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)))

    g = torch.Generator().manual_seed(0)
    plain = Tokens()
    flat = Tokens()
    flat.load_state_dict(plain.state_dict())
    assert use_flat_linears(flat) == 2 and isinstance(flat.proj_in, FlatLinear)
    assert list(flat.state_dict()) == list(plain.state_dict())
    x = torch.randn(1, 16, 5, 3, 3, generator=g)  # batch 1: the permuted tokens are a view, not contiguous
    for inp in (x, x[0, :, 0].flatten(1).T, x[0, :, 0, 0, 0]):  # 5-D via permute, 2-D, 1-D
        f = (lambda m, i: m(i)) if inp.ndim == 5 else (lambda m, i: m.proj_in(i))
        torch.testing.assert_close(f(flat, inp), f(plain, inp))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa).square().sum().backward()
    flat(xb).square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)

    def ops(module) -> set[str]:
        seen: set[str] = set()

        def capture(gm, _):
            seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(module, backend=aot_autograd(fw_compiler=capture))(x)
        torch._dynamo.reset()
        return seen

    plain.requires_grad_(False), flat.requires_grad_(False)  # frozen, as compile_for_inference leaves them
    assert "aten.bmm.default" in ops(plain)  # the pattern FlatLinear exists for
    assert "aten.bmm.default" not in ops(flat)
