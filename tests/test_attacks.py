"""Attacks: norm balls, success on an undefended model, oracles, and the exact VideoPure gradient."""

from __future__ import annotations

import pytest
import torch

from vpure.runtime import registry
from vpure.lab.attacks import BPDAOracle, EOTOracle, ModelOracle, TTOracle, apgd, attack, pgd
from vpure.lab.attacks.apgd import dlr_loss
from vpure.lab.attacks.fullgrad import FullGradOracle, member_logits
from vpure.lab.attacks.gate import GateOracle
from vpure.runtime.errors import InputError
from helpers import assert_close


@pytest.fixture(scope="module")
def model():
    return registry.get("i3d_nl5_r50").build(seed=0)


@pytest.fixture(scope="module")
def clips(data_dir):
    from tinyworld import real_clip

    return torch.cat([real_clip(data_dir, frames=8, size=64, start=s) for s in (0, 40)])


def _in_ball(adv, x, eps, norm):
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    d = (adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert bool((size <= eps * (1 + 1e-5) + 1e-7).all()), size


@pytest.mark.parametrize("norm, eps, step", [("linf", 8 / 255, 2 / 255), ("l2", 1.0, 0.25)])
def test_pgd_stays_in_the_ball_and_raises_the_loss(model, clips, norm, eps, step):
    y = model(clips).argmax(-1)
    trace = []
    adv = attack(ModelOracle(model), clips, y, eps=eps, step=step, iters=5, norm=norm, trace=trace)
    _in_ball(adv, clips, eps, norm)
    assert len(trace) == 6 and trace[-1] > trace[0]
    assert torch.equal(adv, attack(ModelOracle(model), clips, y, eps=eps, step=step, iters=5, norm=norm))  # seeded


def test_attacks_reduce_accuracy_of_an_undefended_model(model, clips):
    y = model(clips).argmax(-1)  # labels the model gets right by construction
    adv = pgd(model, clips, y, eps=16 / 255, step=4 / 255, iters=10)
    a2 = apgd(ModelOracle(model, dlr_loss), clips, y, eps=16 / 255, iters=10)
    _in_ball(a2, clips, 16 / 255, "linf")
    with torch.inference_mode():
        acc_pgd = float((model(adv).argmax(-1) == y).float().mean())
        acc_apgd = float((model(a2).argmax(-1) == y).float().mean())
    assert acc_pgd < 1.0 or acc_apgd < 1.0


def test_sparse_attack_touches_only_its_frames(model, clips):
    y = model(clips).argmax(-1)
    adv = pgd(model, clips, y, frames=[2, 5], iters=2)
    changed = (adv != clips).flatten(3).any(-1).any(1)  # (B, T)
    assert changed[:, [2, 5]].all() and not changed[:, [0, 1, 3, 4, 6, 7]].any()
    with pytest.raises(InputError, match="attacked frames must lie"):
        pgd(model, clips, y, frames=[9])


def test_bpda_is_the_identity_backward_averaged_over_members(model, clips):
    y = model(clips).argmax(-1)
    plain = ModelOracle(model)(clips, y)
    same = BPDAOracle(lambda x: [x, x, x], model)(clips, y)  # identity "purifier", three members
    assert_close(plain[1], same[1], atol=1e-7, rtol=1e-5)
    assert_close(plain[0], same[0], atol=1e-8, rtol=1e-5)
    flipped = BPDAOracle(lambda x: [x, x.flip(-1)], model)(clips, y)
    g_flip = ModelOracle(model)(clips.flip(-1), y)[1]
    assert_close(flipped[1], (plain[1] + g_flip) / 2, atol=1e-6, rtol=1e-5)


def test_tt_and_eot_average_their_inner_oracles(model, clips):
    y = model(clips).argmax(-1)
    inner = ModelOracle(model)
    assert_close(TTOracle(inner, shifts=(0,))(clips, y)[1], inner(clips, y)[1], atol=1e-8, rtol=1e-5)
    g = TTOracle(inner, shifts=(1,))(clips, y)[1]
    assert_close(g, torch.roll(inner(torch.roll(clips, 1, 2), y)[1], -1, 2), atol=1e-8, rtol=1e-5)
    seeds = []
    eot = EOTOracle(lambda s: (seeds.append(s), inner)[1], samples=3, seed=10)
    eot(clips, y)
    eot(clips, y)
    assert seeds == [10, 11, 12, 1010, 1011, 1012]


def test_gate_attack_keeps_frame_labels_while_fooling(model, clips):
    fc = registry.get("frame_classifier").build(seed=0)
    y = model(clips).argmax(-1)
    oracle = GateOracle(model, fc, clips, beta=1.0)
    adv = attack(oracle, clips, y, eps=8 / 255, iters=3)
    _in_ball(adv, clips, 8 / 255, "linf")
    loss, grad = oracle(clips, y)
    assert loss.shape == (2,) and grad.shape == clips.shape


def _tiny_videopure64():
    from tinyworld import tiny_world

    from vpure.runtime.purifier import VideoPure
    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.runtime.videopure import VideoPureConfig

    w = tiny_world(0)
    for m in (w.unet, w.encoder, w.decoder, w.recognizer):
        m.double()
    g = torch.Generator().manual_seed(1)
    fixed = torch.randn(1, 7, 2, 64, 64, generator=g, dtype=torch.float64) * 2

    def flow(frames, input_range="unit"):  # a fixed flow keeps the map smooth for finite differences
        return fixed[:, : frames.shape[2] - 1].expand(frames.shape[0], -1, -1, -1, -1)

    cfg = VideoPureConfig(kernel_impl="ref", lambda_spa=800.0, lambda_temp=5.0)
    return VideoPure(eps_fn_of(w.unet), w.encoder, w.decoder, w.recognizer, flow, cfg)


def test_full_gradient_matches_finite_differences(data_dir):
    from tinyworld import real_clip

    vp = _tiny_videopure64()
    x = real_clip(data_dir, frames=4, size=64).double()
    y = torch.tensor([1])
    oracle = FullGradOracle(vp)
    loss, grad = oracle(x, y)
    with torch.inference_mode():  # the differentiable map is the defence's own map
        ref = vp(x)
    logits = member_logits(vp, x.clone()).detach()
    assert_close(logits, ref.logits.double(), atol=1e-9, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        v = v / v.norm()
        h = 1e-5
        with torch.no_grad():
            fd = (oracle.loss(x + h * v, y) - oracle.loss(x - h * v, y)) / (2 * h)
        # rel 2e-3: the STO sign terms and the decoder clamp are kinks a finite difference can
        # straddle; a wrong gradient (e.g. BPDA's identity) is off by orders of magnitude.
        assert float(fd) == pytest.approx(float((grad * v).sum()), rel=2e-3, abs=1e-9)
    # checkpointing changes memory, not the gradient
    _, grad_nock = FullGradOracle(vp, use_checkpoint=False)(x, y)
    assert_close(grad, grad_nock, atol=1e-12, rtol=1e-5)
