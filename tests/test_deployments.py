"""Deployments: the user's own networks, from checkpoints in their original formats, through
`vpure run --config` on real footage; manifest errors; the engines journey export -> run -> swap."""

from __future__ import annotations

import json

import pytest
import torch

from vpure.runtime.cli import main
from vpure.runtime.deployment import ModelsConfig, plan
from vpure.runtime.errors import CheckpointError, ConfigError
from vpure.runtime.runner import RunConfig
from vpure.runtime.stream import Windows, frames

LABELS = ["walk", "run", "wave", "sit", "stand", "jump", "fall"]


@pytest.fixture(scope="module")
def diffusion_folder(tmp_path_factory):
    from test_modelscope_loading import _make_folder

    root = tmp_path_factory.mktemp("deploy") / "t2v"
    root.mkdir()
    return _make_folder(root)


def _write(folder, arch, weights, *, frames, size, flow="", gate="", extra=""):
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    toml = folder / "box.toml"
    toml.write_text(f'''
[models]
labels = "labels.txt"
[models.recognizer]
arch = "{arch}"
weights = "{weights}"
frames = {frames}
size = {size}
{gate}
[models.diffusion]
folder = "../t2v"
{flow}
[videopure]
rescale_to_size = true
{extra}
''')
    return toml


def _i3d_nl(folder):
    from vpure.runtime.models.i3d import i3d_nl5_resnet50

    torch.manual_seed(0)
    model = i3d_nl5_resnet50(len(LABELS)).eval()  # GluonCV: a training checkpoint, DataParallel keys
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               folder / "i3d_nl5.pth")
    return model, "i3d_nl5.pth"


def _slowfast(folder):
    from vpure.runtime.models.slowfast import slowfast_r50

    torch.manual_seed(0)
    model = slowfast_r50(len(LABELS)).eval()  # pytorchvideo's layout, as its .pyth checkpoints hold it
    torch.save({"model_state": model.state_dict()}, folder / "slowfast.pyth")
    return model, "slowfast.pyth"


def _videomae(folder):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    from vpure.runtime.models.videomae import TINY, VideoMAERecognizer

    torch.manual_seed(0)
    hf = VideoMAEForVideoClassification(VideoMAEConfig(**{**TINY, "num_labels": len(LABELS), "image_size": 64,
                                                          "num_frames": 8}))
    hf.save_pretrained(folder / "videomae")
    return VideoMAERecognizer(hf).eval(), "videomae"


def _raft(folder):
    from vpure.runtime.models.raft import raft_large

    torch.manual_seed(0)
    torch.save({f"module.{k}": v for k, v in raft_large().state_dict().items()}, folder / "raft-things.pth")
    return '[models.flow]\narch = "raft"\nweights = "raft-things.pth"\niters = 2'


def _frame_classifier(folder):
    from vpure.runtime.models.frame_classifier import FrameClassifier

    torch.manual_seed(1)
    torch.save(FrameClassifier(10).state_dict(), folder / "resnet.pth")  # an ImageNet-layout ResNet-18
    return '[models.gate]\narch = "frame_classifier"\nweights = "resnet.pth"'


CASES = {  # arch -> (writer, frames, size, flow, gate)
    "i3d_nl5_r50": (_i3d_nl, 8, 128, _raft, None),
    "slowfast_r50": (_slowfast, 8, 64, None, _frame_classifier),
    "videomae": (_videomae, 8, 64, None, _frame_classifier),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_own_checkpoints_run_on_real_footage_with_their_labels(arch, diffusion_folder, data_dir, tmp_path, capsys):
    folder = diffusion_folder.parent / arch
    folder.mkdir(exist_ok=True)
    writer, t, size, flow, gate = CASES[arch]
    model, weights = writer(folder)
    toml = _write(folder, arch, weights, frames=t, size=size, flow=flow(folder) if flow else "",
                  gate=gate(folder) if gate else "")
    out = tmp_path / "records.jsonl"
    video = data_dir / "vtest.avi"
    assert main(["run", str(video), "--config", str(toml), "--frame-step", "12", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and not [r for r in records if "error" in r]
    assert {r["label_name"] for r in records} <= set(LABELS)
    # Clean-route labels are the recogniser module's own on the same windows.
    cfg = RunConfig.load(toml)
    stream = cfg.stream.replace(size=size, frame_step=12)
    windows, clips = Windows(t, t // 2, size), []
    for f in frames(video, stream):
        w = windows.push(f)
        if w is not None:
            clips.append(w[2].clone())
    assert len(clips) == len(records)
    with torch.inference_mode():
        for r, clip in zip(records, clips):
            if r["route"] == "clean":
                assert r["label"] == int(model(clip).argmax()), r


def test_manifest_errors_name_the_problem(diffusion_folder, tmp_path):
    folder = diffusion_folder.parent / "errors"
    folder.mkdir(exist_ok=True)
    _, weights = _slowfast(folder)
    gate = _frame_classifier(folder)

    def planned(**kw):
        args = dict(arch="slowfast_r50", weights=weights, frames=8, size=64, gate=gate) | kw
        return plan(RunConfig.load(_write(folder, args.pop("arch"), args.pop("weights"), **args)).models)

    assert planned().num_classes == len(LABELS)
    with pytest.raises(CheckpointError, match="models.recognizer.weights .*missing.pth does not exist"):
        planned(weights="missing.pth")
    with pytest.raises(CheckpointError, match="no fc.weight, not a i3d_r50 checkpoint .*another arch"):
        planned(arch="i3d_r50")
    (folder / "labels.txt").write_text("a\nb\n")
    from vpure.runtime.deployment import read_labels

    with pytest.raises(ConfigError, match="names 2 classes, but the recogniser .* has 7"):
        plan(ModelsConfig.from_dict({"labels": str(folder / "labels.txt"),
                                     "recognizer": {"arch": "slowfast_r50", "weights": str(folder / weights)},
                                     "diffusion": {"folder": str(diffusion_folder)}}))
    assert read_labels(folder / "labels.txt") == ("a", "b")
    with pytest.raises(ConfigError, match="downsamples by 8, which does not divide the recogniser's size 60"):
        planned(size=60)
    with pytest.raises(ConfigError, match="recognizer_stem.* a slowfast_r50 recogniser has none"):
        planned(gate="")
    from vpure.runtime.models.i3d import i3d_resnet50

    torch.save(i3d_resnet50(len(LABELS)).state_dict(), folder / "plain.pth")
    toml = _write(folder, "i3d_nl5_r50", "plain.pth", frames=8, size=64)
    from vpure.runtime.deployment import load_network

    with pytest.raises(CheckpointError, match="arch = 'i3d_nl5_r50' does not fit its checkpoint.*missing keys.*nonlocal"):
        load_network(plan(RunConfig.load(toml).models), "recognizer")
    with pytest.raises(ConfigError, match="not a shipped deployment"):
        RunConfig(models="kinetics")


def test_engines_journey_export_swap_precision_run(tmp_path, data_dir, capsys):
    """Export the tiny deployment at three precisions, serve each with one flag, compare with torch."""
    eng = tmp_path / "engines"
    code = main(["export", "--deployment", "tiny", "--precision", "fp32,fp16,int8", "--check-clips", "2",
                 "--out", str(eng)])
    report = capsys.readouterr().out
    manifest = json.loads((eng / "engines.json").read_text())
    assert set(manifest["networks"]) == {"recognizer", "frame_classifier", "unet", "encoder", "decoder", "comdefend"}
    for net in manifest["networks"].values():
        assert {"fp32", "fp16"} <= set(net["artefacts"])
    refused = [line for line in report.splitlines() if line.startswith("FAILED")]
    assert code == (1 if refused else 0)
    for line in refused:  # what the checks refused is named and not served
        assert "below the defence floor" in line or "misses the declared SQNR" in line, line
    runs = {}
    video = str(data_dir / "vtest.avi")
    for precision in ("torch", "fp32", "fp16", "int8"):
        out = tmp_path / f"{precision}.jsonl"
        argv = ["run", video, "--deployment", "tiny", "--frame-step", "8", "--out", str(out)]
        if precision != "torch":
            argv += ["--engines", str(eng), "--precision", precision]
        assert main(argv) == 0, precision
        runs[precision] = [json.loads(line) for line in out.read_text().splitlines()]
        assert runs[precision] and not [r for r in runs[precision] if "error" in r], precision
    key = [(r["route"], r["label"]) for r in runs["torch"]]
    assert [(r["route"], r["label"]) for r in runs["fp32"]] == key
    for precision in ("fp16", "int8"):
        assert len(runs[precision]) == len(key)
    # A run whose config names a component's backend keeps it: --engines fills in the rest only.
    cfg_path = tmp_path / "box.toml"
    cfg_path.write_text('models = "tiny"\n[runtime.components.frame_classifier]\nbackend = "torch"\n')
    from vpure.runtime.cli.run import add_arguments, config_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args([video, "--config", str(cfg_path), "--engines", str(eng),
                                              "--precision", "fp16"]))
    assert cfg.runtime.components["frame_classifier"].backend == "torch"
    assert cfg.runtime.components["unet"].backend == "onnxruntime"
    assert cfg.runtime.components["unet"].precision.value == "fp16"


def test_the_shipped_example_deployment_parses_with_paths_beside_it():
    from pathlib import Path

    import vpure.runtime

    example = Path(vpure.runtime.__file__).parent / "examples" / "deployment.toml"
    cfg = RunConfig.load(example)
    assert cfg.models.recognizer.arch == "i3d_nl5_r50" and cfg.models.recognizer.frames == 32
    assert cfg.models.diffusion.folder == example.parent / "text-to-video-ms-1.7b"
    with pytest.raises(CheckpointError, match="does not exist"):  # the user's files, not shipped
        plan(cfg.models)
