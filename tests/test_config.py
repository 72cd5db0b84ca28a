"""Config round trips, coercion, versioning and validation errors."""

from __future__ import annotations

import pytest

from vpure.runtime.config import ConfigBase
from vpure.runtime.errors import ConfigError
from vpure.runtime.precision import CalibrationRecipe, Precision
from vpure.runtime.runconfig import ComponentChoice, RuntimeConfig


def _full_config() -> RuntimeConfig:
    return RuntimeConfig(
        device="cuda:1", engines_dir="engines",
        components={
            "unet": ComponentChoice(backend="onnxruntime", precision="int8",
                                    calibration=CalibrationRecipe(count=32, method="percentile")),
            "vae_decoder": ComponentChoice(backend="tensorrt", precision=Precision.FP16),
            "frame_classifier": ComponentChoice(),
        })


def test_coercion_on_construction():
    cfg = _full_config()
    assert cfg.components["unet"].precision is Precision.INT8
    assert cfg.engines_dir.name == "engines"
    assert cfg.choice("comdefend") == ComponentChoice()  # unlisted -> default torch fp32


@pytest.mark.parametrize("cfg", [RuntimeConfig(), _full_config(), CalibrationRecipe(), ComponentChoice(precision="bf16")])
def test_dict_and_toml_round_trip(cfg: ConfigBase, tmp_path):
    cls = type(cfg)
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert cls.from_toml(cfg.to_toml()) == cfg
    path = cfg.save(tmp_path / "sub" / "cfg.toml")
    assert cls.load(path) == cfg
    assert cfg.to_dict()["version"] == cls.VERSION


def test_frozen():
    with pytest.raises(Exception):
        RuntimeConfig().device = "cuda"  # type: ignore[misc]


@pytest.mark.parametrize("data, needle", [
    ({"device": "gpu"}, "RuntimeConfig.device"),
    ({"devcie": "cpu"}, "unknown field(s) devcie"),
    ({"components": {"unet": {"precision": "fp8"}}}, "'fp8' is not one of"),
    ({"components": {"nope": {}}}, "unknown component(s) nope"),
    ({"components": {"unet": {"backend": "onnxruntime"}}}, "needs engines_dir"),
    ({"components": {"unet": {"calibration": {"count": 4}}}}, "only meaningful for int8"),
    ({"engines_dir": "e", "components": {"unet": {"backend": "onnxruntime", "compile": True}}},
     "ComponentChoice.compile is a torch option"),
    ({"components": {"unet": {"precision": "int8", "calibration": {"count": 0}}}}, "count must be >= 1"),
    ({"version": 99}, "version 99 is not supported"),
    ({"device": 3}, "expected a string"),
])
def test_validation_errors_name_the_field(data, needle):
    with pytest.raises(ConfigError) as e:
        RuntimeConfig.from_dict(data)
    assert needle in str(e.value)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        RuntimeConfig.from_toml("device = ")
    with pytest.raises(ConfigError, match="does not exist"):
        RuntimeConfig.load(tmp_path / "missing.toml")


def test_precision_enum_and_recipe_id():
    assert Precision.parse("FP16") is Precision.FP16
    with pytest.raises(ConfigError, match="precision 'half'"):
        Precision.parse("half")
    a, b = CalibrationRecipe(), CalibrationRecipe(count=17)
    assert a.id != b.id and a.id == CalibrationRecipe().id and a.id.startswith("minmax16-")
    assert ComponentChoice(precision="int8").recipe == CalibrationRecipe()
    assert ComponentChoice(precision="fp16").recipe is None


def test_environment_read_in_one_place(tmp_path):
    from vpure.runtime.env import read_environment

    env = read_environment({"VPURE_DATA": str(tmp_path), "VPURE_LOG_LEVEL": "debug", "VPURE_PROGRESS": "0",
                            "VPURE_NUM_THREADS": "3"})
    assert env.data_dir == tmp_path and env.log_level == "DEBUG" and env.progress is False and env.num_threads == 3
    with pytest.raises(ConfigError, match="VPURE_NUM_THREADS"):
        read_environment({"VPURE_NUM_THREADS": "many"})
    with pytest.raises(ConfigError, match="VPURE_LOG_LEVEL"):
        read_environment({"VPURE_LOG_LEVEL": "loud"})
