"""Threshold sweep and `vpure calibrate` end to end on real footage."""

from __future__ import annotations

import shutil

import pytest

from vpure.runtime.thresholds import best, calibrate, sweep
from vpure.runtime.errors import InputError


def test_sweep_metrics():
    rows = {r.threshold: r for r in sweep([0.0, 0.1, 0.2, 0.4], [False, False, True, True])}
    r = rows[0.2]
    assert (r.precision, r.recall, r.f1, r.fpr) == (1.0, 1.0, 1.0, 0.0)
    assert rows[0.1].precision == pytest.approx(2 / 3) and rows[0.1].fpr == 0.5
    assert best(list(rows.values())).threshold == 0.2


def test_calibrate_separates_the_three_kinds():
    alphas = [0.0, 0.05, 0.1, 0.2, 0.25, 0.22, 0.4, 0.5, 0.45]
    kinds = ["clean"] * 3 + ["sparse"] * 3 + ["dense"] * 3
    cal = calibrate(alphas, kinds)
    assert 0.1 < cal.gamma1 <= 0.2 and 0.25 < cal.gamma2 <= 0.4
    assert best(cal.stage1).f1 == 1.0 and best(cal.stage2).f1 == 1.0
    with pytest.raises(InputError, match="needs clean and adversarial"):
        calibrate([0.1], ["clean"])
    with pytest.raises(InputError, match="unknown clip kinds"):
        calibrate([0.1], ["weird"])


def test_cli_end_to_end(tmp_path, data_dir, capsys):
    import cv2
    import torch

    from vpure.runtime.checkpoint import save_safetensors
    from vpure.runtime.cli import main
    from vpure.runtime.detect import DetectionConfig
    from vpure.runtime.models.frame_classifier import FrameClassifier, frame_classifier_config

    torch.manual_seed(0)
    fc = FrameClassifier(num_classes=3, widths=(8, 16), depths=(1, 1), stem_width=8)
    ckpt = save_safetensors(fc, tmp_path / "fc.safetensors", frame_classifier_config(fc))
    clips = tmp_path / "clips"
    for kind, names in {"clean": ["vtest.avi", "carphone.mp4"], "sparse": ["tree.avi"], "dense": ["bikes.mp4"]}.items():
        (clips / kind).mkdir(parents=True)
        for n in names:
            shutil.copy(data_dir / n, clips / kind / n)
    (clips / "clean" / "broken.mp4").write_bytes(b"\x00" * 4096)  # counted and skipped
    out, roc = tmp_path / "det.toml", tmp_path / "roc.png"
    code = main(["calibrate", "--clips", str(clips), "--frame-classifier", str(ckpt), "--frames", "8",
                 "--size", "64", "--out", str(out), "--roc", str(roc)])
    assert code == 0
    text = capsys.readouterr().out
    assert "clean vs adversarial (gamma1)" in text and "skipped 1" in text
    cfg = DetectionConfig.load(out)
    assert 0 <= cfg.gamma1 <= cfg.gamma2 <= 1
    assert cv2.imread(str(roc)).shape == (480, 480, 3)
    assert main(["calibrate", "--clips", str(tmp_path / "nothing"), "--frame-classifier", str(ckpt)]) == 2


def test_manifest_rows_are_checked_before_any_clip_is_decoded(tmp_path, capsys):
    from vpure.runtime.cli import main

    fc = tmp_path / "fc.safetensors"  # never read: every manifest below fails first
    cases = {"header,then a bad kind": ("path,kind\nclip.mp4,clean\nclip.mp4,bogus\n", "line 3"),
             "a row without its kind": ("clip.mp4\n", "line 1: expected 'path,kind'"),
             "binary": (None, "not a CSV text file")}
    for name, (text, needle) in cases.items():
        manifest = tmp_path / f"{len(name)}.csv"
        if text is None:
            manifest.write_bytes(b"\x00\xff\xfe\x80")
        else:
            manifest.write_text(text)
        assert main(["calibrate", "--manifest", str(manifest), "--frame-classifier", str(fc)]) == 2, name
        assert needle in capsys.readouterr().err, name
