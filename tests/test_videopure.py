"""VideoPure core: inversion, closed-form STO, fast vs released-equivalent path, voting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpure.runtime import schedule
from vpure.runtime.purifier import VideoPure
from vpure.runtime.errors import ConfigError, InputError, NonFiniteOutput
from vpure.runtime.flow import DISFlow, downsample_flow
from vpure.runtime.videopure import (VideoPureConfig, purify_latents, sto_step, temporal_ddim_invert, vote)
from vpure.lab.released_reference import ReleasedVideoPure, purify_latents_released

from helpers import assert_close
from tinyworld import real_clip, tiny_world


@pytest.fixture(scope="module")
def tiny():
    return tiny_world(seed=0)


def _latents(seed=0, shape=(1, 4, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape[0], shape[2] - 1, 2, *shape[3:], generator=g)


def test_temporal_inversion_preserves_frame_differences(tiny):
    z0, _ = _latents()
    with torch.inference_mode():
        z = temporal_ddim_invert(tiny.eps_fn, z0, schedule.ddim_timesteps())
    factor = math.sqrt(schedule.abar(101) / schedule.abar(0))
    for f, g in [(1, 0), (3, 1), (2, 3)]:
        assert_close(z[:, :, f] - z[:, :, g], factor * (z0[:, :, f] - z0[:, :, g]), atol=2e-5, name=f"frames {f}-{g}")


def test_plain_inversion_matches_diffusers_ddim_maths(tiny):
    """One plain DDIM-inversion step per timestep, written from diffusers' DDIMScheduler."""
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                      steps_offset=1, clip_sample=False)
    s.set_timesteps(50)
    z0, _ = _latents(1)
    with torch.inference_mode():
        z = z0.clone()
        for tau in schedule.ddim_timesteps():
            eps = tiny.eps_fn(z, tau)
            prev_t = tau - s.config.num_train_timesteps // s.num_inference_steps
            a_cur = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
            a_next = s.alphas_cumprod[tau]
            pred_x0 = (z - (1 - a_cur) ** 0.5 * eps) / a_cur ** 0.5
            z = a_next ** 0.5 * pred_x0 + (1 - a_next) ** 0.5 * eps
        ours = temporal_ddim_invert(tiny.eps_fn, z0, schedule.ddim_timesteps(), replicate_first_frame=False)
    assert_close(ours, z, atol=1e-5, name="plain inversion")


def _sto_autograd(z, eps, z0, flow, t, lam_spa, lam_temp, detach):
    """The spec's loss differentiated by autograd (grid_sample warp, F.mse_loss)."""
    a = schedule.abar(t)
    zr = z.clone().requires_grad_(True)
    x0 = (zr - math.sqrt(1 - a) * eps) / math.sqrt(a)
    b, c, tt, h, w = x0.shape
    gy, gx = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    temp = 0
    for i in range(1, tt):
        grid = torch.stack([2 * (gx + flow[:, i - 1, 0]) / (w - 1) - 1, 2 * (gy + flow[:, i - 1, 1]) / (h - 1) - 1], -1)
        nxt = x0[:, :, i].detach() if detach else x0[:, :, i]
        warped = F.grid_sample(nxt, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        temp = temp + (warped - x0[:, :, i - 1]).abs().mean()
    loss = lam_spa * F.mse_loss(x0, z0) - lam_temp * temp
    (g,) = torch.autograd.grad(loss, zr)
    return z + schedule.sto_coefficient(t, 20) * g


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "full"])
@pytest.mark.parametrize("t", [101, 21, 1])
def test_closed_form_sto_equals_autograd(detach, t):
    z0, flow = _latents(2)
    z0, flow = z0.double(), flow.double()
    g = torch.Generator().manual_seed(3)
    z, eps = torch.randn(z0.shape, generator=g).double(), torch.randn(z0.shape, generator=g).double()
    a = schedule.abar(t)
    x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
    ours = sto_step(z, x0, z0, flow, a, schedule.sto_coefficient(t, 20), 800.0, 5.0, detach_warp=detach, impl="ref")
    expected = _sto_autograd(z, eps, z0, flow, t, 800.0, 5.0, detach)
    assert_close(ours, expected, atol=1e-8, name="sto")
    # The production kernel (float32) agrees to float32 rounding.
    fast = sto_step(z.float(), x0.float(), z0.float(), flow.float(), a, schedule.sto_coefficient(t, 20), 800.0, 5.0,
                    detach_warp=detach, impl="native")
    assert_close(fast, expected, atol=2e-4, name="sto native")


def test_mse_only_step_extrapolates_by_k_t():
    z0, flow = _latents(4)
    g = torch.Generator().manual_seed(5)
    z, eps = torch.randn(z0.shape, generator=g).double(), torch.randn(z0.shape, generator=g).double()
    t, a = 101, schedule.abar(101)
    x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
    c = schedule.sto_coefficient(t, 20)
    z_opt = sto_step(z, x0, z0.double(), flow.double(), a, c, 800.0, 0.0)
    x0_opt = (z_opt - math.sqrt(1 - a) * eps) / math.sqrt(a)
    k = c * 2 * 800 / (z0.numel() * a)
    assert_close(x0_opt - z0.double(), (1 + k) * (x0 - z0.double()), atol=1e-9, name="k_t")


def test_purify_members_and_determinism(tiny):
    z0, flow = _latents(6)
    with torch.inference_mode():
        a = purify_latents(tiny.eps_fn, z0, flow)
        b = purify_latents(tiny.eps_fn, z0, flow)
    assert len(a) == 7 and all(m.shape == z0.shape for m in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "two runs differ"


def test_fast_path_equals_released_path(tiny):
    z0, flow = _latents(7)
    # Variants run with the size rescaling: on an 8x8 latent the raw paper constants
    # extrapolate x0 ~14x per step (spec, size dependence) and feedback compounds rounding.
    for cfg in [VideoPureConfig(), VideoPureConfig(sto_feedback=True, detach_warp=False, rescale_to_size=True),
                VideoPureConfig(sto=False), VideoPureConfig(temporal_inversion=False, rescale_to_size=True)]:
        with torch.inference_mode():
            fast = purify_latents(tiny.eps_fn, z0, flow, cfg)
        with torch.no_grad():
            ref = purify_latents_released(tiny.eps_fn, z0, flow, cfg)
        for i, (f, r) in enumerate(zip(fast, ref)):
            assert_close(f, r, atol=1e-4, name=f"member {i} {cfg}")


def test_end_to_end_defence_matches_released_on_real_footage(tiny, data_dir):
    clip = real_clip(data_dir, frames=8, size=64)
    flow = DISFlow("fast")
    fast = VideoPure(tiny.eps_fn, tiny.encoder, tiny.decoder, tiny.recognizer, flow)
    ref = ReleasedVideoPure(tiny.eps_fn, tiny.encoder, tiny.decoder, tiny.recognizer, flow)
    r1, r2 = fast(clip), ref(clip)
    assert torch.equal(r1.member_labels, r2.member_labels) and torch.equal(r1.label, r2.label)
    assert_close(r1.logits, r2.logits, atol=1e-3, name="member logits")
    assert r1.logits.shape == (7, 1, 5)
    assert r1.timings_ms["unet_calls"] == 12
    assert torch.equal(fast(clip).logits, r1.logits), "fast path not deterministic"


def test_ablations_change_the_members(tiny):
    z0, flow = _latents(8)
    with torch.inference_mode():
        base = purify_latents(tiny.eps_fn, z0, flow)
        for cfg in [VideoPureConfig(temporal_inversion=False), VideoPureConfig(sto=False),
                    VideoPureConfig(rescale_to_size=True), VideoPureConfig(t_star=3)]:
            other = purify_latents(tiny.eps_fn, z0, flow, cfg)
            assert len(other) == cfg.t_star + 1
            if len(other) == len(base):
                assert not torch.equal(other[-1], base[-1]), cfg


def test_vote_ties_to_smallest_class_and_modes():
    k = 4
    labels = torch.tensor([[2], [1], [2], [1], [3], [0], [3]])  # 2, 1 and 3 each twice
    logits = F.one_hot(labels, k).float()
    label, member = vote(logits, "hard")
    assert label.item() == 1 and torch.equal(member, labels)
    assert vote(logits, "off")[0].item() == 3
    soft = logits.clone()
    soft[0, 0, 2] = 5.0
    assert vote(soft, "soft")[0].item() == 2


def test_config_validation_and_round_trip():
    cfg = VideoPureConfig(t_star=4, voting="soft", rescale_to_size=True)
    assert VideoPureConfig.from_toml(cfg.to_toml()) == cfg
    with pytest.raises(ConfigError, match="voting"):
        VideoPureConfig(voting="majority")
    with pytest.raises(ConfigError, match="t_star"):
        VideoPureConfig(t_star=0)
    assert VideoPureConfig().lambdas((1, 4, 32, 28, 28)) == (800.0, 5.0)
    spa, temp = VideoPureConfig(rescale_to_size=True).lambdas((1, 4, 8, 8, 8))
    assert spa == pytest.approx(800 * 2048 / 100352) and temp == pytest.approx(5 * 256 / 3136)


@pytest.mark.parametrize("clip, needle", [
    (torch.rand(1, 3, 4, 60, 64), "multiples of 8"),
    (torch.rand(1, 3, 4, 64, 64) * 2, "[0, 1]"),
    (torch.full((1, 3, 4, 64, 64), float("nan")), "NaN"),
    (torch.rand(3, 4, 64, 64), "(B, 3, T, H, W)"),
    (torch.rand(1, 3, 0, 64, 64), "empty"),
    ((torch.rand(1, 3, 4, 64, 64) * 255).to(torch.uint8), "floating point"),
])
def test_defence_rejects_bad_clips(tiny, clip, needle):
    vp = VideoPure(tiny.eps_fn, tiny.encoder, tiny.decoder, tiny.recognizer, DISFlow("ultrafast"))
    with pytest.raises(InputError) as e:
        vp(clip)
    assert needle in str(e.value)


def test_purify_rejects_mismatched_flow(tiny):
    z0, flow = _latents(9)
    with pytest.raises(InputError, match="flow must be"):
        purify_latents(tiny.eps_fn, z0, flow[:, :-1])


def test_inversion_and_purification_refuse_bad_timesteps_predictions_and_configs(tiny):
    z0, flow = _latents(9)
    for ts in ([21, 1], [1, 1], [1, 1000], [1.5, 21]):
        with pytest.raises(InputError, match="timesteps must"):
            temporal_ddim_invert(tiny.eps_fn, z0, ts)
    with pytest.raises(InputError, match=r"returned \(1, 3, 4, 8, 8\), expected"):
        temporal_ddim_invert(lambda z, t: z[:, :3], z0, [1, 21])
    with pytest.raises(NonFiniteOutput, match="unet returned NaN or Inf at timestep 1"):
        purify_latents(lambda z, t: torch.full_like(z, float("inf")), z0, flow)
    with pytest.raises(InputError, match="config must be a VideoPureConfig"):
        purify_latents(tiny.eps_fn, z0, flow, config={"t_star": 6})


def test_downsample_flow_scales_vectors():
    flow = torch.zeros(1, 2, 2, 64, 96)
    flow[:, :, 0], flow[:, :, 1] = 8.0, -4.0
    small = downsample_flow(flow, (8, 12))
    assert small.shape == (1, 2, 2, 8, 12)
    assert_close(small[:, :, 0], torch.full_like(small[:, :, 0], 1.0), atol=1e-8, rtol=1e-5)
    assert_close(small[:, :, 1], torch.full_like(small[:, :, 1], -0.5), atol=1e-8, rtol=1e-5)


def test_decode_frames_chunking_is_equivalent(tiny):
    from vpure.runtime.purifier import decode_frames

    z = torch.randn(3, 4, 5, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        whole = tiny.decoder(z)
        for k in (1, 3, 0, 15):
            assert_close(decode_frames(tiny.decoder, z, k), whole, atol=1e-5, name=f"frames_per_call={k}")


def test_decode_frames_auto_chunks_fit_a_backend_profile(tiny):
    """The automatic chunk (8 frames on CPU) never exceeds what a backend-served decoder's
    shape profile admits; a plain module gets 8-frame calls."""
    from types import SimpleNamespace

    from vpure.runtime.purifier import decode_frames

    z = torch.randn(2, 4, 7, 8, 8, generator=torch.Generator().manual_seed(12))
    sizes: list[int] = []

    def served(x):  # as as_module_call wraps a backend: the call, with the backend beside it
        sizes.append(x.shape[2])
        return tiny.decoder(x)

    served.backend = SimpleNamespace(spec=SimpleNamespace(profile={"T": (1, 3, 3)}))
    with torch.inference_mode():
        whole = tiny.decoder(z)
        assert_close(decode_frames(served, z), whole, atol=1e-5, name="profile-capped chunks")
        assert sizes == [3, 3, 3, 3, 2]
        sizes.clear()
        del served.backend
        decode_frames(served, z)
        assert sizes == [8, 6]


def test_video_loading_errors(tmp_path):
    from vpure.runtime.video import load_clip

    with pytest.raises(InputError, match="does not exist"):
        load_clip(tmp_path / "missing.mp4", 4, 64)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(InputError, match="cannot decode"):
        load_clip(junk, 4, 64)


def test_video_loading_too_few_frames(data_dir):
    from vpure.runtime.video import load_clip

    with pytest.raises(InputError, match="only"):
        load_clip(data_dir / "tree.avi", 10, 64, start=65)


def _tiny_eps_unet():
    from vpure.runtime.models.diffusion import tiny_unet

    torch.manual_seed(0)
    return tiny_unet().eval()


def test_graphed_eps_is_the_eager_call_off_cuda():
    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.runtime.models.graphed import GraphedEps

    unet = _tiny_eps_unet()
    g = GraphedEps(unet)
    z = torch.randn(1, 4, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(g(z, 41), eps_fn_of(unet)(z, 41))
    assert g.replays == 0 and not g.graphs


@pytest.mark.gpu
def test_graphed_eps_replays_match_eager_calls_on_cuda():
    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.runtime.models.graphed import GraphedEps

    unet = _tiny_eps_unet().cuda()
    g, eager = GraphedEps(unet), eps_fn_of(unet)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for shape in [(1, 4, 4, 8, 8), (2, 4, 4, 8, 8), (1, 4, 4, 8, 8)]:
            for t in (101, 41, 1):
                z = torch.randn(shape, generator=gen).cuda()
                first = g(z, t)
                assert_close(first, eager(z, t), atol=1e-4, rtol=1e-4)
                g(torch.randn(shape, generator=gen).cuda(), 7)  # the clone must not alias the static output
                assert_close(first, eager(z, t), atol=1e-4, rtol=1e-4)
    assert g.failure is None, g.failure
    assert len(g.graphs) == 2 and g.replays == 18
    z = torch.randn(1, 4, 4, 8, 8, device="cuda", requires_grad=True)
    g(z, 41).sum().backward()  # gradients wanted: served eagerly
    assert z.grad is not None and g.replays == 18


def test_folded_temporal_convs_compute_the_same_unet():
    import copy

    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.runtime.models.rewrites import TemporalConv, fold_temporal_convs

    unet = _tiny_eps_unet()
    folded = copy.deepcopy(unet)
    n = fold_temporal_convs(folded)
    assert n == sum(isinstance(m, torch.nn.Conv3d) and m.kernel_size[1:] == (1, 1) for m in unet.modules()) > 0
    assert not any(isinstance(m, torch.nn.Conv3d) for m in folded.modules())
    assert sum(isinstance(m, TemporalConv) for m in folded.modules()) == n
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    z = torch.randn(2, 4, 4, 8, 8)
    with torch.no_grad():
        assert_close(eps_fn_of(folded)(z, 41), eps_fn_of(unet)(z, 41), atol=1e-5, rtol=1e-5)
    other = torch.nn.Sequential(torch.nn.Conv3d(3, 3, 3, padding=1), torch.nn.Conv3d(3, 3, (3, 1, 1), stride=(2, 1, 1)))
    assert fold_temporal_convs(other) == 0


def test_training_through_folded_convs_updates_the_original_layout():
    """The mini-world UNet trains folded; unfolding restores diffusers' Conv3d with the trained
    parameter objects, so the saved state dict and the module's outputs are the folded ones'."""
    import copy

    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.runtime.models.rewrites import TemporalConv, fold_temporal_convs, unfold_temporal_convs

    unet = _tiny_eps_unet()
    before = copy.deepcopy(unet)
    kinds = {n: (m.kernel_size, m.padding, m.bias is not None) for n, m in unet.named_modules()
             if isinstance(m, torch.nn.Conv3d)}
    n = fold_temporal_convs(unet)
    params = {k: v for k, v in unet.named_parameters()}
    z = torch.randn(2, 4, 4, 8, 8)
    loss = eps_fn_of(unet)(z, 41).square().mean()
    loss.backward()
    with torch.no_grad():
        for p in unet.parameters():
            p -= 0.1 * p.grad
        trained = eps_fn_of(unet)(z, 41)
    assert unfold_temporal_convs(unet) == n and not any(isinstance(m, TemporalConv) for m in unet.modules())
    assert {k: (m.kernel_size, m.padding, m.bias is not None) for k, m in unet.named_modules()
            if isinstance(m, torch.nn.Conv3d)} == kinds
    assert all(v is params[k] for k, v in unet.named_parameters())  # same objects, same names
    temporal = [k for k, m in unet.named_modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size[1:] == (1, 1)]
    assert any(not torch.equal(unet.state_dict()[f"{k}.weight"], before.state_dict()[f"{k}.weight"]) for k in temporal)
    with torch.no_grad():
        assert_close(eps_fn_of(unet)(z, 41), trained, atol=1e-5, rtol=1e-5)
    assert unfold_temporal_convs(unet) == 0


@pytest.mark.parametrize("keys", [16, 77, 196])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_matches_sdpa_for_short_and_long_keys(keys, dtype):
    from vpure.runtime.models.attention_processors import SHORT_KEYS, attend

    g = torch.Generator().manual_seed(keys)
    q, k, v = (torch.randn(3, 4, n, 8, generator=g).to(dtype).requires_grad_(True) for n in (49, keys, keys))
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.detach().double() for t in (q, k, v)))
    out = attend(q, k, v)
    assert out.dtype == dtype and out.shape == (3, 4, 49, 8)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out.double(), ref, atol=tol, rtol=tol)
    if keys <= SHORT_KEYS and dtype == torch.bfloat16:  # fp32 softmax: only the output's rounding is left
        assert (out.double() - ref).abs().max() <= 2 * (ref.abs().max() * 2 ** -8)
    out.float().square().sum().backward()
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(qr, kr, vr).square().sum().backward()
    gtol = 1e-4 if dtype == torch.float32 else 1e-1
    for a, b in ((q, qr), (k, kr), (v, vr)):
        assert_close(a.grad.double(), b.grad, atol=gtol, rtol=gtol)


def test_inference_rewrites_compute_the_same_unet_and_keep_gradients():
    import copy

    from vpure.runtime.models.attention_processors import ConstantContextAttention, LeanSelfAttention
    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.runtime.models.rewrites import optimise_for_inference

    unet = _tiny_eps_unet()
    fast = copy.deepcopy(unet)
    done = optimise_for_inference(fast)
    assert done["temporal_convs"] > 0 and done["cross_attention"] > 0
    assert done["linears"] == sum(type(m).__name__ == "FlatLinear" for m in fast.modules()) > 0
    assert list(fast.state_dict()) == list(unet.state_dict())
    procs = [m.processor for m in fast.unet.modules() if isinstance(getattr(m, "processor", None),
                                                                     ConstantContextAttention)]
    assert len(procs) == done["cross_attention"]
    z = torch.randn(2, 4, 4, 8, 8)
    with torch.inference_mode():
        for t in (101, 41):
            assert_close(eps_fn_of(fast)(z, t), eps_fn_of(unet)(z, t), atol=2e-5, rtol=1e-5)
    assert all(p.hits == 2 and p.projections == 1 for p in procs)  # two calls, the prompt projected once
    lean = [m.processor for m in fast.unet.modules() if isinstance(getattr(m, "processor", None), LeanSelfAttention)]
    assert len(lean) == done["self_attention"] > 0 and all(p.hits == 2 for p in lean)
    zg = z.clone().requires_grad_(True)
    zr = z.clone().requires_grad_(True)
    eps_fn_of(fast)(zg, 41).square().sum().backward()
    eps_fn_of(unet)(zr, 41).square().sum().backward()
    assert_close(zg.grad, zr.grad, atol=1e-4, rtol=1e-4)
    assert all(p.hits == 3 for p in procs) and not any(q.requires_grad for q in fast.parameters())
    fast.requires_grad_(True)  # gradients wanted for the projections: diffusers' path, not the cache
    eps_fn_of(fast)(z, 41).square().sum().backward()
    assert all(p.hits == 3 for p in procs)
    assert all(m.to_k.weight.grad is not None for m in fast.unet.modules() if getattr(m, "is_cross_attention", False))
    fast.requires_grad_(False)
    with torch.no_grad():  # a new prompt is projected again, not served stale
        fast.prompt_embedding.add_(0.5)
        unet.prompt_embedding.add_(0.5)
        assert_close(eps_fn_of(fast)(z, 41), eps_fn_of(unet)(z, 41), atol=2e-5, rtol=1e-5)
        assert all(p.projections == 2 for p in procs)
        other = torch.randn_like(unet.prompt_embedding)  # a context that is not the prompt: diffusers' path
        ref = unet.unet(z, torch.tensor([41]), encoder_hidden_states=other.expand(2, -1, -1), return_dict=False)[0]
        got = fast.unet(z, torch.tensor([41]), encoder_hidden_states=other.expand(2, -1, -1), return_dict=False)[0]
        assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_subpixel_upsample_equals_upsample_then_convolve(channels_last, bias):
    from diffusers.models.upsampling import Upsample2D
    from vpure.runtime.models.rewrites import SubpixelUpsample

    torch.manual_seed(0)
    ref = Upsample2D(6, use_conv=True, out_channels=5, bias=bias).eval()
    fast = SubpixelUpsample(ref.conv)
    x = torch.randn(3, 6, 5, 7)  # odd, non-square sizes: every border phase is exercised
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = ref(x), fast(x)
        assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.shape == (3, 5, 10, 14) and fast._cache is not None  # the rewrite ran
        # The output keeps the input's memory layout (oneDNN's channels-last activations flow on).
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert_close(fast(x, output_size=(10, 14)), want, atol=1e-5, rtol=1e-5)
        assert_close(fast(x, output_size=(11, 15)), ref(x, output_size=(11, 15)), atol=1e-6, rtol=1e-6)  # not 2x: upsampled as asked
        ref.conv.weight.mul_(-2)  # weights changed in place: the derived 2x2 ones are rebuilt
        assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)


def test_subpixel_upsampling_keeps_the_decoder_its_state_and_its_gradients():
    import copy
    import pickle

    from vpure.runtime.models.diffusion import tiny_vae, VAEDecoder
    from vpure.runtime.models.rewrites import SubpixelUpsample, optimise_for_inference, use_subpixel_upsampling

    torch.manual_seed(0)
    dec = VAEDecoder(tiny_vae()).eval()
    fast = copy.deepcopy(dec)
    n = use_subpixel_upsampling(fast)
    assert n == 3 and sum(isinstance(m, SubpixelUpsample) for m in fast.modules()) == 3
    assert use_subpixel_upsampling(fast) == 0
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in dec.state_dict().items()}
    z = torch.randn(1, 4, 3, 8, 8)
    with torch.inference_mode():
        assert_close(fast(z), dec(z), atol=1e-5, rtol=1e-5)
    # Gradients to the latents through frozen weights take the rewrite; they match diffusers'.
    for m in (dec, fast):
        m.requires_grad_(False)
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    dec(za).square().sum().backward()
    fast(zb).square().sum().backward()
    assert_close(zb.grad, za.grad, atol=1e-4, rtol=1e-4)
    # Gradients for the weights (training): diffusers' path, the same parameter gradients.
    for m in (dec, fast):
        m.requires_grad_(True)
    dec(z).square().sum().backward()
    fast(z).square().sum().backward()
    for (name, a), b in zip(dec.named_parameters(), fast.parameters()):
        assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, name=name)
    # Copies and pickles do not carry the derived weights; they rebuild them from their own.
    with torch.no_grad():
        fast(z)
    ups = [m for m in fast.modules() if isinstance(m, SubpixelUpsample)]
    assert all(m._cache is not None for m in ups)
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert all(m._cache is None for m in clone.modules() if isinstance(m, SubpixelUpsample))
        with torch.no_grad():
            assert_close(clone(z), dec(z), atol=1e-5, rtol=1e-5)
    # Captured graphs record diffusers' operators, not the rewrite.
    with torch.no_grad():
        traced = torch.jit.trace(fast, (z,))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::upsample_nearest2d" in kinds
    # The UNet's up blocks get it through optimise_for_inference.
    unet = _tiny_eps_unet()
    assert optimise_for_inference(unet)["upsamplers"] == 1
