"""`vpure bench` end to end on `tiny`, and the per-stage arithmetic it reports."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from vpure.runtime import presets
from vpure.runtime.cli import main
from vpure.runtime.errors import ConfigError
from vpure.lab.flops import achieved_rates, clip_flops, count_flops, purify_calls
from vpure.runtime.videopure import VideoPureConfig


def test_vpure_bench_tiny_writes_rows_a_chart_and_stage_rates(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # by default, results go to a folder it names, never ./benchmarks/results
    out_csv, png = tmp_path / "vpure-bench-results" / "results.csv", tmp_path / "vpure-bench-results" / "stages.png"
    assert main(["bench", "--configs", "tiny", "--precisions", "fp32", "--iters", "1"]) == 0
    text = capsys.readouterr().out
    assert f"results folder: {out_csv.parent}" in text and not (tmp_path / "benchmarks").exists()
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["case"] for r in rows] == ["released-equivalent (ref)", "torch fp32"]
    assert rows[1]["parity"].startswith("same votes") and float(rows[1]["speedup_vs_ref"]) > 0
    assert png.stat().st_size > 1000
    rates = text[text.index("GFLOP/s (p50)"):].splitlines()
    # every counted stage has a finite positive rate for the runtime case; the reference
    # times its UNet as one stage, so its split rows are '-'
    by_stage = {line.split()[0]: line.split()[1:] for line in rates[1:9]}
    assert set(by_stage) == {"detect", "vae_encode", "unet_invert", "unet_denoise", "unet", "vae_decode",
                             "recognize", "clip"}
    assert by_stage["unet_invert"][0] == "-" and float(by_stage["unet_invert"][1]) > 0
    assert all(float(v[-1]) > 0 for v in by_stage.values())


def test_purify_calls_follow_the_config():
    assert purify_calls(8) == (6, 6, 7)  # the paper's t* = 6: six steps each way, seven members
    cfg = VideoPureConfig(t_star=3)
    assert purify_calls(4, cfg) == (len(cfg.timesteps), len(cfg.timesteps), len(cfg.timesteps) + 1)


def test_count_flops_matches_the_formulas_on_meta_and_cpu():
    x, w = torch.empty(5, 16), torch.empty(32, 16)
    assert count_flops(F.linear, x, w) == 2 * 5 * 16 * 32
    conv = count_flops(F.conv2d, torch.empty(2, 3, 10, 10, device="meta"), torch.empty(8, 3, 3, 3, device="meta"))
    assert conv == 2 * 2 * 8 * 8 * 8 * 3 * 3 * 3
    # attention: the math decomposition on meta and the CPU flash kernel count the same
    b, h, L, s, d = 2, 3, 40, 24, 16
    want = 2 * b * h * L * s * d * 2
    for dev in ("meta", "cpu"):
        q, k, v = (torch.randn(b, h, n, d, device=dev) for n in (L, s, s))
        assert count_flops(F.scaled_dot_product_attention, q, k, v) == want, dev


def test_clip_flops_on_meta_equal_a_real_tiny_run_and_count_modelscope_anywhere():
    rows = {r.stage: r for r in clip_flops("tiny")}
    p, m = presets.get("tiny"), presets.build("tiny")
    z = torch.randn(1, 4, p.frames, p.size // 8, p.size // 8)
    assert rows["unet_invert"].flops_per_call == count_flops(m.unet, z, 101)
    assert rows["vae_decode"].flops_per_call == count_flops(m.decoder, z)
    assert rows["vae_decode"].calls == 7 and rows["unet_denoise"].calls == 6
    big = clip_flops("modelscope")  # 1.41B-parameter UNet: shapes only, nothing allocated
    assert sum(r.flops for r in big) > 1e14
    with pytest.raises(ConfigError, match="GPU only"):
        presets.build("modelscope", device="cpu")
    rates = achieved_rates(list(rows.values()), {"unet": 1000.0, "vae_decode": 0.0})
    assert set(rates) == {"unet"}
    assert rates["unet"] == pytest.approx((rows["unet_invert"].flops + rows["unet_denoise"].flops) / 1e9)


def test_bench_flops_prints_the_table_and_the_rate_a_target_needs(capsys):
    assert main(["bench", "--configs", "modelscope", "--flops", "--target-s", "2"]) == 0
    out = capsys.readouterr().out
    total = float(next(line for line in out.splitlines() if line.strip().startswith("total")).split()[-1])
    needed = float(out.split("needs ")[1].split()[0])
    assert needed == pytest.approx(total / 2 / 1000, rel=1e-2)
