"""Fail closed: a network that returns NaN or Inf never makes a clip look clean."""

from __future__ import annotations

import io
import json

import pytest
import torch

from vpure.runtime.purifier import VideoPure
from vpure.runtime.errors import ConfigError, NonFiniteOutput
from vpure.runtime.flow import DISFlow
from vpure.runtime.models.comdefend import tiny_comdefend
from vpure.runtime.runner import Components, Runner, RunConfig, load_components
from vpure.runtime.shield import Shield, ShieldConfig

from test_shield import BrightnessClassifier, _clip
from tinyworld import tiny_world


class NaNFrames(torch.nn.Module):
    """The brightness gate with the logits of chosen frames (None: every frame) set to NaN."""

    def __init__(self, frames=None, value=float("nan")):
        super().__init__()
        self.gate, self.frames, self.value = BrightnessClassifier(), frames, value

    def forward(self, clip):
        out = self.gate(clip)
        out[:, slice(None) if self.frames is None else self.frames] = self.value
        return out


class NaNOnCalls(torch.nn.Module):
    """A recogniser whose first ``n`` calls return NaN logits."""

    def __init__(self, recognizer, n=1):
        super().__init__()
        self.recognizer, self.n = recognizer, n

    def forward(self, clip):
        out = self.recognizer(clip)
        if self.n > 0:
            self.n -= 1
            return torch.full_like(out, float("nan"))
        return out


@pytest.fixture(scope="module")
def tiny():
    return tiny_world(seed=2)


def _shield(tiny, gate, recognizer=None, **cfg):
    recognizer = recognizer or tiny.recognizer
    vp = VideoPure(tiny.eps_fn, tiny.encoder, tiny.decoder, recognizer, DISFlow("ultrafast"))
    return Shield(gate, recognizer, videopure=vp, comdefend=tiny_comdefend().eval(), config=ShieldConfig(**cfg))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_gate_is_purified_by_default_and_says_so(tiny, value):
    (rec,) = _shield(tiny, NaNFrames(value=value))(_clip([]))
    assert rec.route == "dense" and len(rec.votes) == 7 and rec.alpha is None
    assert rec.failure.component == "frame_classifier"
    d = json.loads(json.dumps(rec.to_dict(), allow_nan=False))
    assert d["failed_component"] == "frame_classifier" and "NaN or Inf" in d["error"]


def test_report_gives_no_decision_and_names_the_frames(tiny):
    with pytest.raises(NonFiniteOutput, match=r"frame_classifier returned NaN or Inf for frames \[\[3\]\]") as e:
        _shield(tiny, NaNFrames([3]), on_nonfinite="report")(_clip([]))
    assert e.value.component == "frame_classifier" and e.value.frames == [[3]]


def test_repair_rebuilds_the_frames_the_gate_could_not_label(tiny):
    (rec,) = _shield(tiny, NaNFrames([2, 5]), on_nonfinite="repair")(_clip([]))
    assert rec.route == "sparse" and rec.exception_frames == [2, 5] and rec.failure.component == "frame_classifier"
    with pytest.raises(NonFiniteOutput):  # nothing finite to rebuild from
        _shield(tiny, NaNFrames(), on_nonfinite="repair")(_clip([]))


def test_in_a_batch_only_the_clip_with_nan_frames_fails(tiny):
    class NaNForBrightFirstFrame(BrightnessClassifier):
        def forward(self, clip):
            out = super().forward(clip)
            out[clip[:, :, 0].mean(dim=(1, 2, 3)) > 0.5] = float("nan")
            return out

    recs = _shield(tiny, NaNForBrightFirstFrame())(torch.cat([_clip([]), _clip([0]), _clip([2, 5])]))
    assert [r.route for r in recs] == ["clean", "dense", "sparse"]
    assert [r.failure is not None for r in recs] == [False, True, False]
    assert recs[0].alpha == 0.0 and recs[2].alpha == 0.25


def test_a_nan_recogniser_on_the_clean_route_sends_the_clip_to_purification(tiny):
    (rec,) = _shield(tiny, BrightnessClassifier(), NaNOnCalls(tiny.recognizer, 1))(_clip([]))
    assert rec.route == "dense" and rec.failure.component == "recognizer" and len(rec.votes) == 7
    with pytest.raises(NonFiniteOutput, match="recognizer returned NaN or Inf on the purified members"):
        _shield(tiny, BrightnessClassifier(), NaNOnCalls(tiny.recognizer, 2))(_clip([]))
    with pytest.raises(NonFiniteOutput, match="recognizer"):
        _shield(tiny, BrightnessClassifier(), NaNOnCalls(tiny.recognizer, 1), on_nonfinite="report")(_clip([]))


def test_the_policy_is_checked():
    with pytest.raises(ConfigError, match="on_nonfinite 'ignore' is not one of"):
        ShieldConfig(on_nonfinite="ignore")
    assert RunConfig.from_dict({"shield": {"on_nonfinite": "report"}}).shield.on_nonfinite == "report"


class NaNModel(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x) * float("nan")


def test_nan_gate_and_recogniser_on_real_footage_write_no_clean_record(data_dir):
    """The hostile case: NaN in the last layers of both the gate and the recogniser."""
    cfg = RunConfig(models="tiny", flow="dis", window=8, stride=4, max_consecutive_failures=3)
    comps = load_components(cfg)
    comps = Components(**{**comps.__dict__, "frame_classifier": NaNModel(comps.frame_classifier),
                          "recognizer": NaNModel(comps.recognizer)})
    out = io.StringIO()
    summary = Runner(cfg, comps).run(data_dir / "vtest.avi", out, progress=False)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == 3 and summary.clips == 0 and summary.failed == 3
    assert all(r.get("route") != "clean" and r["failed_component"] == "recognizer" for r in records)
    assert summary.to_dict()["nonfinite"] == {"recognizer": 3}
    assert "NaN/Inf from recognizer 3" in summary.text()


def test_an_engine_that_returns_inf_fails_closed(tmp_path, monkeypatch):
    """A real ONNX Runtime gate whose outputs overflow (as an fp16 engine can) never routes clean."""
    from vpure.export.exporter import export_component
    from vpure.runtime import deployment, registry
    from vpure.runtime.backends.ort_backend import OrtBackend
    from vpure.runtime.runconfig import ComponentChoice, RuntimeConfig

    spec = deployment.plan(deployment.ModelsConfig.from_name("tiny")).spec("frame_classifier")
    export_component(spec, registry.get("frame_classifier").build(seed=0), tmp_path, "fp32")
    real_call = OrtBackend.__call__

    def overflowing(self, **inputs):
        return {k: v * float("inf") for k, v in real_call(self, **inputs).items()}

    monkeypatch.setattr(OrtBackend, "__call__", overflowing)
    cfg = RunConfig(models="tiny", flow="dis", window=8, stride=4, shield=ShieldConfig(on_nonfinite="report"),
                    runtime=RuntimeConfig(engines_dir=tmp_path,
                                          components={"frame_classifier": ComponentChoice(backend="onnxruntime")}))
    comps = load_components(cfg)
    with pytest.raises(NonFiniteOutput, match="frame_classifier"):
        Runner(cfg, comps).process(torch.rand(1, 3, 8, 64, 64), list(range(8)))
