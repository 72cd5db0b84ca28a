"""Mini-world deployments served from engines: profiles that fit the networks and the runner."""

from __future__ import annotations

import pytest
import torch

from vpure.export.exporter import export_component
from vpure.runtime import presets
from vpure.runtime.runconfig import ComponentChoice, RuntimeConfig
from vpure.runtime.runner import Runner, RunConfig, load_components

ORT = ComponentChoice(backend="onnxruntime")


def test_the_mini_world_recogniser_exports_at_its_profile(tmp_path):
    """Its profile used to allow one frame, which the I3D refuses: the export failed."""
    from vpure.runtime.miniworld.models import load_world

    spec = presets.component_spec("mini", "i3d_nl5_r50")
    recognizer = load_world().recognizer
    assert spec.profile["T"][0] >= recognizer.min_frames
    path = export_component(spec, recognizer, tmp_path, "fp32")
    assert path.is_file()


class Alternating(torch.nn.Module):
    """A gate whose labels flip every frame: alpha = 1, the dense route."""

    def forward(self, frames):
        b, _, t = frames.shape[:3]
        return torch.nn.functional.one_hot(torch.arange(t) % 2, 5).float().expand(b, t, 5).clone()


def test_raft_served_from_onnx_runtime_takes_the_t_minus_1_pairs_of_a_window_in_its_profile(tmp_path):
    from vpure.runtime.miniworld.models import load_world

    spec = presets.component_spec("mini", "raft")
    assert spec.profile["B"] == (1, 15, 15)  # up to the 15 pairs of a 16-frame window in one call
    export_component(spec, load_world().raft, tmp_path, "fp32")
    cfg = RunConfig(window=16, gate_ahead=False, runtime=RuntimeConfig(engines_dir=tmp_path, components={"raft": ORT}))
    comps = load_components(cfg)
    comps.frame_classifier = Alternating()
    record = Runner(cfg, comps).process(torch.rand(1, 3, 16, 64, 64), list(range(16)))
    assert record.route == "dense" and len(record.votes) == 7
