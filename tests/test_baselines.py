"""Baseline defences: shapes, ranges, reproducibility by seed."""

from __future__ import annotations

import pytest
import torch

from vpure.lab import baselines
from vpure.runtime.errors import InputError

from tinyworld import tiny_world


@pytest.fixture(scope="module")
def tiny():
    return tiny_world(seed=1)


def _clip(seed=0, shape=(2, 3, 4, 64, 64)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fn", [lambda c: baselines.jpeg_frames(c, 50), baselines.wavelet_denoise_frames,
                                lambda c: baselines.temporal_shuffle(c, 3)], ids=["jpeg", "wavelet", "shuffle"])
def test_frame_transforms_keep_shape_and_range(fn):
    clip = _clip()
    out = fn(clip)
    assert out.shape == clip.shape and out.dtype == clip.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, clip)


def test_jpeg_quality_orders_error_and_rejects_bad_quality():
    clip = _clip(1)
    e_hi = (baselines.jpeg_frames(clip, 95) - clip).abs().mean()
    e_lo = (baselines.jpeg_frames(clip, 10) - clip).abs().mean()
    assert e_lo > e_hi
    with pytest.raises(InputError, match="quality"):
        baselines.jpeg_frames(clip, 0)


def test_wavelet_denoising_reduces_noise():
    g = torch.Generator().manual_seed(2)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    clean = (0.25 + 0.5 * (yy * xx)).expand(1, 3, 2, 64, 64).contiguous()
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    den = baselines.wavelet_denoise_frames(noisy)
    assert (den - clean).pow(2).mean() < 0.5 * (noisy - clean).pow(2).mean()


def test_temporal_shuffle_is_a_seeded_permutation():
    clip = _clip(3)
    a, b, c = (baselines.temporal_shuffle(clip, s) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for bi in range(clip.shape[0]):  # every output frame is a distinct input frame
        src = [next(t for t in range(clip.shape[2]) if torch.equal(a[bi, :, j], clip[bi, :, t]))
               for j in range(clip.shape[2])]
        assert sorted(src) == list(range(clip.shape[2]))


@pytest.mark.parametrize("kind", ["ddim_inversion", "diffpure_ddim", "diffpure_ddpm"])
def test_latent_baselines_reproducible_by_seed(tiny, kind):
    clip = _clip(4, (1, 3, 2, 64, 64))
    make = lambda seed: baselines.LatentDiffusionDefence(kind, tiny.eps_fn, tiny.encoder, tiny.decoder,  # noqa: E731
                                                         tiny.recognizer, seed=seed)
    r1, r2 = make(0)(clip, keep_frames=True), make(0)(clip, keep_frames=True)
    assert torch.equal(r1.frames, r2.frames) and r1.logits.shape == (1, 1, 5)
    assert r1.frames.shape == clip.shape
    r3 = make(1)(clip, keep_frames=True)
    if kind == "ddim_inversion":  # deterministic: the seed is unused
        assert torch.equal(r3.frames, r1.frames)
    else:
        assert not torch.equal(r3.frames, r1.frames)


def test_simple_defences_share_the_interface(tiny):
    clip = _clip(5, (1, 3, 4, 64, 64))
    for d in (baselines.no_defence(tiny.recognizer), baselines.jpeg_defence(tiny.recognizer),
              baselines.wavelet_defence(tiny.recognizer), baselines.temporal_shuffle_defence(tiny.recognizer)):
        r = d(clip)
        assert r.label.shape == (1,) and r.logits.shape == (1, 1, 5) and "recognize" in r.timings_ms
    with pytest.raises(InputError, match="latent baseline"):
        baselines.LatentDiffusionDefence("ddpm++", tiny.eps_fn, tiny.encoder, tiny.decoder, tiny.recognizer)
