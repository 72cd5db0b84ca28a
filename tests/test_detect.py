"""Exception index, routing and the temporal defence on real footage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vpure.runtime.detect import DetectionConfig, exception_frames, exception_index, route
from vpure.runtime.errors import ConfigError, InputError
from vpure.runtime.temporal_defence import TemporalDefenceConfig, reference_frame, repair_clip

from tinyworld import real_clip


@pytest.mark.parametrize("labels, alpha, frames", [
    ([3], 0.0, []),
    ([1, 2], 0.0, []),
    ([1, 2, 1], 1 / 3, [1]),
    ([1, 1, 1], 0.0, []),
    ([0, 1, 0, 1, 0, 1], 4 / 6, [1, 2, 3, 4]),
    ([0, 0, 5, 0, 0, 0, 0, 0], 1 / 8, [2]),
    ([2, 1, 1, 1], 0.0, []),  # boundary frames never count
    ([0, 1, 2, 3], 2 / 4, [1, 2]),  # differs from both neighbours, even if they differ too
    (torch.tensor([4, 4, 7, 4]), 1 / 4, [2]),
])
def test_exception_index(labels, alpha, frames):
    assert exception_index(labels) == pytest.approx(alpha)
    assert exception_frames(labels) == frames


def test_route_boundaries_are_exact():
    assert route(0.0) == "clean"
    assert route(0.175 - 1e-12) == "clean"
    assert route(0.175) == "sparse"
    assert route(0.3 - 1e-12) == "sparse"
    assert route(0.3) == "dense"
    assert route(1.0) == "dense"
    assert route(0.2, gamma1=0.2, gamma2=0.2) == "dense"
    with pytest.raises(InputError, match="gamma1 <= gamma2"):
        route(0.1, gamma1=0.4, gamma2=0.3)
    with pytest.raises(InputError, match="empty"):
        exception_index([])
    for alpha in (float("nan"), -0.1, 1.5, "0.2", None):
        with pytest.raises(InputError, match="alpha must be"):
            route(alpha)
    for labels in ([0, 0.5, 0], [[0, 1], [1, 0]], "abc", torch.zeros(2, 3)):
        with pytest.raises(InputError, match="labels must"):
            exception_index(labels)
    # Integral values of any common kind are labels.
    assert exception_index(np.array([0, 1, 0])) == exception_index(list(torch.tensor([0, 1, 0]))) == 1 / 3
    assert exception_index([0, 1.0, 0]) == 1 / 3 and route(np.float32(0.2)) == "sparse"
    with pytest.raises(ConfigError):
        DetectionConfig(gamma1=0.5, gamma2=0.2)


def test_reference_frame_choice():
    exc = {2, 3}
    assert reference_frame(2, exc, 8) == 1 and reference_frame(3, exc, 8) == 4
    assert reference_frame(3, exc, 8, "previous") == 1 and reference_frame(2, exc, 8, "next") == 4
    assert reference_frame(0, {0}, 3) == 1
    assert reference_frame(1, {0, 1, 2}, 3) is None


def _psnr(a, b):
    return 10 * math.log10(255.0 ** 2 / ((a.float() - b.float()) ** 2).mean().item())


@pytest.fixture(scope="module")
def attacked(data_dir):
    clip = (real_clip(data_dir, frames=32, size=224)[0] * 255).round().to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    exc = [5, 14, 27]
    adv = clip.clone().to(torch.int16)
    for k in exc:
        noise = torch.randint(-8, 9, clip[:, k].shape, generator=g)
        adv[:, k] = (adv[:, k] + noise).clamp(0, 255)
    return clip, adv.to(torch.uint8), exc


def test_temporal_defence_repairs_perturbed_frames(attacked):
    clean, adv, exc = attacked
    rep = repair_clip(adv, exc)
    gains = [_psnr(rep[:, k], clean[:, k]) - _psnr(adv[:, k], clean[:, k]) for k in exc]
    print("PSNR gains (dB):", [round(x, 2) for x in gains])
    assert all(g > 0 for g in gains), gains
    assert sum(gains) / len(gains) >= 3.0, gains
    untouched = [i for i in range(adv.shape[1]) if i not in exc]
    assert torch.equal(rep[:, untouched], adv[:, untouched])


def test_temporal_defence_deterministic_across_runs_and_impls(attacked):
    _, adv, exc = attacked
    a = repair_clip(adv, exc, TemporalDefenceConfig(impl="native"))
    b = repair_clip(adv, exc, TemporalDefenceConfig(impl="native"))
    c = repair_clip(adv[:, :, :64, :64].contiguous(), exc, TemporalDefenceConfig(impl="torch"))
    d = repair_clip(adv[:, :, :64, :64].contiguous(), exc, TemporalDefenceConfig(impl="native"))
    assert torch.equal(a, b) and torch.equal(c, d)


def test_float_clips_and_odd_sizes(attacked):
    _, adv, exc = attacked
    f = adv[:, :, :61, :75].float() / 255.0  # not a multiple of the block
    rep = repair_clip(f, exc)
    assert rep.shape == f.shape and rep.dtype == f.dtype
    untouched = [i for i in range(f.shape[1]) if i not in exc]
    assert torch.equal(rep[:, untouched], f[:, untouched])
    assert float(rep.min()) >= 0 and float(rep.max()) <= 1


@pytest.mark.parametrize("clip, exc, needle", [
    (torch.zeros(3, 0, 8, 8, dtype=torch.uint8), [], "empty"),
    (torch.zeros(4, 8, 8), [0], "(3, T, H, W)"),
    (torch.full((3, 4, 8, 8), float("nan")), [1], "NaN"),
    (torch.zeros(3, 4, 8, 8, dtype=torch.uint8), [4], "must lie in"),
])
def test_bad_input(clip, exc, needle):
    with pytest.raises(InputError) as e:
        repair_clip(clip, exc)
    assert needle in str(e.value)


def test_detector_frame_size_resizes_before_classifying():
    from vpure.runtime.detect import Detector

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, clip):
            seen.append(tuple(clip.shape))
            return torch.zeros(clip.shape[0], clip.shape[2], 2)

    det = Detector(Probe(), DetectionConfig(frame_size=32, frames_per_call=3))(torch.rand(1, 3, 7, 64, 48))
    assert seen == [(1, 3, 3, 32, 32), (1, 3, 3, 32, 32), (1, 3, 1, 32, 32)]
    assert det.route == ["clean"] and det.labels.shape == (1, 7)
