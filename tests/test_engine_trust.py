"""Engines must come from the deployment's weights and, with a key, carry a valid signature."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vpure.export.exporter import export_component
from vpure.runtime import artifacts, presets, registry
from vpure.runtime.artifacts import Trust
from vpure.runtime.backends import create_backend
from vpure.runtime.errors import ArtifactError
from vpure.runtime.runconfig import ComponentChoice, RuntimeConfig
from vpure.runtime.runner import RunConfig, load_components

ORT = ComponentChoice(backend="onnxruntime")


@pytest.fixture()
def fc_engine(tmp_path):
    spec = registry.get("frame_classifier")
    module = spec.build(seed=0)
    return spec, module, export_component(spec, module, tmp_path / "engines", "fp32", key=None)


def _open(spec, folder, trust):
    return create_backend(spec, ORT, engines_dir=folder, trust=trust)


def test_an_engine_from_other_weights_is_refused_naming_both_hashes(fc_engine, caplog):
    spec, module, path = fc_engine
    ours, other = artifacts.state_hash(module), artifacts.state_hash(spec.build(seed=1))
    assert json.loads(artifacts.sidecar_path(path).read_text())["source_sha256"] == ours
    _open(spec, path.parent, Trust(ours))
    with pytest.raises(ArtifactError, match=f"hash {ours[:12]}.*hash to {other[:12]}.*--allow-stale"):
        _open(spec, path.parent, Trust(other))
    with caplog.at_level("WARNING"):
        _open(spec, path.parent, Trust(other, allow_stale=True))
    assert "serving it anyway" in caplog.text


def test_a_signed_folder_refuses_edited_unsigned_and_wrongly_signed_sidecars(tmp_path):
    spec = registry.get("frame_classifier")
    module, folder, key = spec.build(seed=0), tmp_path / "signed", b"site secret"
    path = export_component(spec, module, folder, "fp32", key=key)
    _open(spec, folder, Trust(key=key))
    with pytest.raises(ArtifactError, match="does not verify"):
        _open(spec, folder, Trust(key=b"another key"))
    side_path = artifacts.sidecar_path(path)
    side = json.loads(side_path.read_text())
    side_path.write_text(json.dumps(side | {"parity": {**side["parity"], "max_abs": 0.0}}))
    with pytest.raises(ArtifactError, match="does not verify"):
        _open(spec, folder, Trust(key=key))
    unsigned = export_component(spec, module, tmp_path / "plain", "fp32")
    with pytest.raises(ArtifactError, match="is unsigned and an engines key is set"):
        _open(spec, unsigned.parent, Trust(key=key))
    # Re-exporting with the key repairs the folder: the edited sidecar no longer verifies, so it is rebuilt.
    export_component(spec, module, folder, "fp32", key=key)
    _open(spec, folder, Trust(key=key))


def test_vpure_run_refuses_engines_after_the_weights_changed(tmp_path, monkeypatch):
    """The journey: export the mini-world gate, retrain (here: edit) the weights in place, run."""
    from safetensors.torch import load_file, save_file

    from vpure.runtime.miniworld.models import WEIGHTS_DIR, load_world

    monkeypatch.setenv("VPURE_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, weights)
    engines = tmp_path / "engines"
    export_component(presets.component_spec("mini", "frame_classifier"), load_world(weights).frame_classifier,
                     engines, "fp32")
    cfg = RunConfig(weights=weights, runtime=RuntimeConfig(engines_dir=engines,
                                                           components={"frame_classifier": ORT}))
    load_components(cfg)  # fresh engine: served
    assert len(json.loads((tmp_path / "cache" / "source-hashes.json").read_text())) == 1  # hashed once, cached

    f = weights / "frame_classifier.safetensors"
    state = load_file(str(f))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 0.01
    from safetensors import safe_open

    with safe_open(str(f), "pt") as g:
        meta = g.metadata()
    save_file(state, str(f), metadata=meta)
    with pytest.raises(ArtifactError, match="frame_classifier.*exported from weights with hash"):
        load_components(cfg)
    comps = load_components(cfg.replace(runtime=cfg.runtime.replace(allow_stale=True)))
    with torch.inference_mode():
        assert comps.frame_classifier(torch.rand(1, 3, 4, 64, 64)).shape[:2] == (1, 4)


def test_a_sidecar_that_is_not_a_json_object_is_a_one_line_error(fc_engine):
    spec, _, path = fc_engine
    artifacts.sidecar_path(path).write_text("[1, 2, 3]")
    with pytest.raises(ArtifactError, match="holds a JSON list, not an object"):
        _open(spec, path.parent, None)
