"""Registry contract: every component declares its I/O and runs tiny on CPU."""

from __future__ import annotations

import pytest
import torch

from vpure.runtime import registry
from vpure.runtime.backends import create_backend
from vpure.runtime.errors import BackendUnavailable, InputError, UnknownComponent
from vpure.runtime.runconfig import ComponentChoice

SPECS = list(registry.components())


def test_registry_covers_the_core_roles():
    roles = {s.role for s in SPECS}
    for role in (registry.Role.EPS, registry.Role.VAE_ENCODER, registry.Role.VAE_DECODER,
                 registry.Role.FRAME_CLASSIFIER, registry.Role.COMDEFEND):
        assert role in roles, role


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_component_contract(spec: registry.ComponentSpec):
    assert spec.inputs and spec.outputs and spec.doc
    module = spec.build(seed=0)
    backend = create_backend(spec, ComponentChoice(), module=module)
    for which in ("min", "opt"):
        dims = spec.dims(which)
        inputs = spec.sample_inputs(dims, seed=1)
        out = backend(**inputs)
        assert tuple(out) == spec.output_names
        for t in spec.outputs:
            assert tuple(out[t.name].shape) == t.resolve(dims), (spec.name, t.name, which)
            assert out[t.name].dtype == getattr(torch, t.dtype)
            assert torch.isfinite(out[t.name]).all()
    # Deterministic by seed: the same tiny instance twice gives identical outputs.
    again = create_backend(spec, ComponentChoice(), module=spec.build(seed=0))(**spec.sample_inputs(seed=1))
    first = backend(**spec.sample_inputs(seed=1))
    for name in spec.output_names:
        assert torch.equal(first[name], again[name])


def test_backend_input_checks():
    spec = registry.get("frame_classifier")
    backend = create_backend(spec, ComponentChoice(), module=spec.build())
    good = spec.sample_inputs()["frames"]
    with pytest.raises(InputError, match="expected rank 5"):
        backend(frames=good[0])
    with pytest.raises(InputError, match="expected dtype float32"):
        backend(frames=good.double())
    with pytest.raises(InputError, match="NaN or Inf"):
        bad = good.clone()
        bad[0, 0, 0, 0, 0] = float("nan")
        backend(frames=bad)
    with pytest.raises(InputError, match="missing"):
        backend(images=good)
    with pytest.raises(InputError, match=r"expected shape \('B', 3"):
        backend(frames=good[:, :2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_finds_every_bad_element_and_survives_an_overflowing_sum(dtype):
    from vpure.runtime.backends.base import all_finite

    x = torch.rand(2, 3, 5, 7, 9).to(dtype).transpose(-1, -2)  # strided, as a view reaches a backend
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 2, 4, 8, 6] = bad
        assert not all_finite(y), bad
    both = x.clone()
    both[0, 0, 0, 0, 0], both[1, 1, 1, 1, 1] = float("inf"), float("-inf")  # a NaN sum, not an infinite one
    assert not all_finite(both)
    big = torch.full((4096,), torch.finfo(dtype).max, dtype=dtype)  # finite elements whose sum overflows
    assert all_finite(big) and not all_finite(torch.cat([big, torch.tensor([float("nan")], dtype=dtype)]))


def test_unknown_component_and_backend():
    with pytest.raises(UnknownComponent, match="no component named 'i3d_xl'"):
        registry.get("i3d_xl")
    spec = registry.get("comdefend")
    with pytest.raises(BackendUnavailable, match="runs int8 only for the frame classifier"):
        create_backend(spec, ComponentChoice(precision="int8"), module=spec.build())
