"""Diffusion schedule and DDIM constants as pure functions (spec/videopure.md).

Scaled-linear betas from 0.00085 to 0.012 over 1000 steps, abar[t] = prod(1 - beta[:t+1])
in float64. DDIM with "leading" spacing and offset 1; ``set_alpha_to_one=False``, so the
level before t = 1 is abar[0]. No object carries state between calls.
"""

from __future__ import annotations

import math
import operator
from functools import lru_cache

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


def betas() -> torch.Tensor:
    """(1000,) float64 scaled-linear betas."""
    return torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2


@lru_cache(maxsize=1)
def _abar() -> torch.Tensor:
    return torch.cumprod(1.0 - betas(), dim=0)


def alphas_cumprod() -> torch.Tensor:
    """(1000,) float64: abar[t] of the scaled-linear schedule (a fresh copy)."""
    return _abar().clone()


def abar(t: int) -> float:
    """abar[t] as a Python float; t < 0 gives abar[0] (``set_alpha_to_one=False``)."""
    return float(_abar()[max(t, 0)])


def _integer(name: str, v) -> int:
    """``v`` as an int: Python and NumPy integers and integral 0-d tensors, never floats or bools."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None


def step_size(num_inference_steps: int = 50) -> int:
    num_inference_steps = _integer("num_inference_steps", num_inference_steps)
    if not 1 <= num_inference_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_inference_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {num_inference_steps}")
    return NUM_TRAIN_TIMESTEPS // num_inference_steps


def ddim_timesteps(num_inference_steps: int = 50, t_star: int = 6) -> list[int]:
    """Ascending inversion timesteps: the first ``t_star`` of leading spacing with offset 1.

    ``ddim_timesteps() == [1, 21, 41, 61, 81, 101]``.
    """
    step = step_size(num_inference_steps)
    t_star = _integer("t_star", t_star)
    if not 1 <= t_star <= num_inference_steps:
        raise ValueError(f"t_star must be in [1, {num_inference_steps}], got {t_star}")
    return [i * step + 1 for i in range(t_star)]


def prev_abar(t: int, step: int) -> float:
    """abar at the DDIM level before t (t - step), abar[0] below zero."""
    return abar(t - step)


def sigma2(t: int, step: int) -> float:
    """DDIM posterior variance sigma_t^2 = (1 - a_prev)/(1 - abar_t) * (1 - abar_t / a_prev)."""
    a_t, a_prev = abar(t), prev_abar(t, step)
    return (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)


def sto_coefficient(t: int, step: int, alpha_s: float = -4.0) -> float:
    """c_t = alpha_s * log(sigma_t^2), the STO step size (positive for alpha_s < 0)."""
    return alpha_s * math.log(sigma2(t, step))
