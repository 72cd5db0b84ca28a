"""Spec oracles for the schedule and DDIM constants, and agreement with diffusers' DDIM maths."""

from __future__ import annotations

import math

import pytest
import torch

from vpure.runtime import schedule
from helpers import assert_close

# spec/videopure.md reference table: t, abar[t], a_prev, sigma2_t, log sigma2_t, c_t
TABLE = [
    (101, 0.89298, 0.91714, 0.0203943, -3.8925, 15.570),
    (81, 0.91714, 0.93978, 0.0175109, -4.0449, 16.180),
    (61, 0.93978, 0.96087, 0.0142615, -4.2502, 17.001),
    (41, 0.96087, 0.98038, 0.00997747, -4.6074, 18.430),
    (21, 0.98038, 0.99830, 0.00155863, -6.4639, 25.856),
    (1, 0.99830, 0.99915, 0.000426353, -7.7602, 31.041),
]


def test_timesteps_and_abar():
    assert schedule.ddim_timesteps() == [1, 21, 41, 61, 81, 101]
    assert schedule.ddim_timesteps(50, 3) == [1, 21, 41]
    ac = schedule.alphas_cumprod()
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    assert round(float(ac[0]), 5) == 0.99915
    assert bool((ac[1:] < ac[:-1]).all())


@pytest.mark.parametrize("t, a_t, a_prev, s2, log_s2, c_t", TABLE)
def test_sigma2_and_c_table(t, a_t, a_prev, s2, log_s2, c_t):
    assert round(schedule.abar(t), 5) == a_t
    assert round(schedule.prev_abar(t, 20), 5) == a_prev
    assert schedule.sigma2(t, 20) == pytest.approx(s2, rel=5e-6)
    assert math.log(schedule.sigma2(t, 20)) == pytest.approx(log_s2, abs=6e-5)
    assert schedule.sto_coefficient(t, 20) == pytest.approx(c_t, abs=6e-4)


def test_k_t_extrapolation_factor():
    n = 4 * 32 * 28 * 28
    k = schedule.sto_coefficient(101, 20) * 2 * 800 / (n * schedule.abar(101))
    assert k == pytest.approx(0.278, abs=5e-4)


def test_matches_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", clip_sample=False)
    s.set_timesteps(50)
    assert sorted(s.timesteps.tolist())[:6] == schedule.ddim_timesteps()
    assert_close(s.alphas_cumprod.double(), schedule.alphas_cumprod(), rtol=1e-6, atol=1e-8)
    assert float(s.final_alpha_cumprod) == pytest.approx(schedule.abar(0), rel=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="t_star"):
        schedule.ddim_timesteps(50, 51)
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedule.ddim_timesteps(0, 1)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
        schedule.ddim_timesteps(50.5, 6)
    with pytest.raises(ValueError, match="t_star must be an integer"):
        schedule.ddim_timesteps(50, True)
