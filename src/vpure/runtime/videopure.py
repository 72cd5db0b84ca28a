"""VideoPure purification as pure functions (spec/videopure.md, stages 2 and 3).

``eps_fn(z, t) -> eps`` is any callable taking a latent clip (B, 4, T, h, w) and an int
timestep (a torch module, an ONNX Runtime or TensorRT engine). Nothing here keeps state
between calls and nothing is random: the same inputs give bitwise-identical members.

STO (stage 3, step 3) is computed in closed form. With eps held constant,
d x0 / d z = 1 / sqrt(abar_t), so for L = lambda_spa * MSE(x0, z0) - lambda_temp * L_temp(x0)

    grad_z L = (2 lambda_spa (x0 - z0) / n - lambda_temp * grad L_temp(x0)) / sqrt(abar_t)
    z'       = z + c_t * grad_z L,   c_t = alpha_s * log(sigma_t^2)

where grad L_temp comes from the fused ``warp_l1_grad`` kernel and n is the number of
latent elements of one clip (MSE is a per-clip mean, so a clip gives the same members
alone or inside a batch; for B = 1 this is the released mean over all elements).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch

from vpure.kernels import warp_l1_grad

from . import schedule
from .backends.base import all_finite
from .config import ConfigBase, check
from .errors import InputError, NonFiniteOutput

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
LATENT_CHANNELS = 4  # SD's VAE: every eps_fn and member is (B, 4, T, h, w)
PAPER_LATENT_NUMEL = 4 * 32 * 28 * 28  # n the paper constants were tuned for (MSE)
PAPER_PAIR_NUMEL = 4 * 28 * 28  # C*h*w of one frame pair (per-pair L1 mean)
VOTING = ("hard", "soft", "off")
FLOW_RANGES = ("unit", "native")


@dataclass(frozen=True)
class VideoPureConfig(ConfigBase):
    """Defaults are the released implementation; each paper variant is a named option."""

    num_inference_steps: int = 50
    t_star: int = 6
    alpha_s: float = -4.0
    lambda_spa: float = 800.0
    lambda_temp: float = 5.0
    temporal_inversion: bool = True  # off: plain DDIM inversion (ablation)
    sto: bool = True  # off: no spatial-temporal optimisation (ablation)
    sto_feedback: bool = False  # paper Table VIII: continue the trajectory from z'
    detach_warp: bool = True  # released: no gradient through the warped frame
    rescale_to_size: bool = False  # scale lambdas to the clip size (see spec, size dependence)
    voting: str = "hard"  # "hard" (released), "soft" (mean softmax), "off" (last member alone)
    flow_range: str = "unit"  # frames fed to the flow network: [0, 1] as released, or its native range
    # Frames per VAE decoder call when decoding the members. 0 = auto: every member in one
    # batch on CUDA, 8 frames per call on CPU (defence.decode_frames says why).
    decode_batch_frames: int = 0
    kernel_impl: str = "auto"  # warp_l1_grad implementation

    def validate(self) -> None:
        check(self.t_star >= 1, f"VideoPureConfig.t_star must be >= 1, got {self.t_star}")
        check(1 <= self.num_inference_steps <= schedule.NUM_TRAIN_TIMESTEPS,
              f"VideoPureConfig.num_inference_steps must be in [1, 1000], got {self.num_inference_steps}")
        check(self.t_star <= self.num_inference_steps,
              f"VideoPureConfig.t_star ({self.t_star}) exceeds num_inference_steps ({self.num_inference_steps})")
        check(self.voting in VOTING, f"VideoPureConfig.voting {self.voting!r} is not one of {VOTING}")
        check(self.flow_range in FLOW_RANGES, f"VideoPureConfig.flow_range {self.flow_range!r} is not one of {FLOW_RANGES}")
        check(self.decode_batch_frames >= 0,
              f"VideoPureConfig.decode_batch_frames must be >= 0, got {self.decode_batch_frames}")
        check(self.lambda_spa >= 0 and self.lambda_temp >= 0, "VideoPureConfig lambdas must be >= 0")
        check(self.kernel_impl in ("auto", "triton", "native", "torch", "ref"),
              f"VideoPureConfig.kernel_impl {self.kernel_impl!r} is not a kernel implementation")

    @property
    def timesteps(self) -> list[int]:
        return schedule.ddim_timesteps(self.num_inference_steps, self.t_star)

    @property
    def step(self) -> int:
        return schedule.step_size(self.num_inference_steps)

    def lambdas(self, latent_shape: tuple[int, ...]) -> tuple[float, float]:
        """(lambda_spa, lambda_temp) for a latent clip (B, C, T, h, w), rescaled if asked."""
        if not self.rescale_to_size:
            return self.lambda_spa, self.lambda_temp
        _, c, t, h, w = latent_shape
        return (self.lambda_spa * (c * t * h * w) / PAPER_LATENT_NUMEL,
                self.lambda_temp * (c * h * w) / PAPER_PAIR_NUMEL)


def check_latents(z0: torch.Tensor, flow: torch.Tensor | None = None) -> None:
    if not isinstance(z0, torch.Tensor) or z0.ndim != 5:
        raise InputError(f"latents must be a (B, C, T, h, w) tensor, got {getattr(z0, 'shape', type(z0))}")
    if not z0.is_floating_point():
        raise InputError(f"latents must be floating point, got {z0.dtype}")
    if z0.shape[1] != LATENT_CHANNELS:
        raise InputError(f"latents must have {LATENT_CHANNELS} channels (Stable Diffusion's latent space), "
                         f"got shape {tuple(z0.shape)}")
    if min(z0.shape) == 0:
        raise InputError(f"latents are empty: shape {tuple(z0.shape)}")
    if not all_finite(z0):
        raise InputError("latents contain NaN or Inf")
    if flow is not None:
        b, _, t, h, w = z0.shape
        if tuple(flow.shape) != (b, t - 1, 2, h, w):
            raise InputError(f"flow must be (B, T-1, 2, h, w) = {(b, t - 1, 2, h, w)} at latent size, got {tuple(flow.shape)}")
        if not all_finite(flow):
            raise InputError("flow contains NaN or Inf")


def call_eps(eps_fn: EpsFn, z: torch.Tensor, t: int) -> torch.Tensor:
    """``eps_fn(z, t)``, refused with a clear error when the prediction has another shape or is
    not finite (a broken engine, a half-precision overflow) instead of corrupting the clip."""
    eps = eps_fn(z, t)
    if not isinstance(eps, torch.Tensor) or eps.shape != z.shape:
        raise InputError(f"eps_fn(z, {t}) returned {tuple(getattr(eps, 'shape', ())) or type(eps).__name__}, "
                         f"expected the latent's shape {tuple(z.shape)}")
    if not all_finite(eps):
        raise NonFiniteOutput("unet", f"at timestep {t}")
    return eps


def check_timesteps(timesteps) -> list[int]:
    """Strictly ascending integer timesteps inside the 1000-step schedule."""
    try:
        ts = [operator.index(t) for t in timesteps]
    except TypeError:
        raise InputError(f"timesteps must be integers, got {list(timesteps)!r}") from None
    if any(not 0 <= t < schedule.NUM_TRAIN_TIMESTEPS for t in ts) or any(a >= b for a, b in zip(ts, ts[1:])):
        raise InputError(f"timesteps must ascend strictly inside [0, {schedule.NUM_TRAIN_TIMESTEPS - 1}], got {ts}")
    return ts


# -- stage 2 ----------------------------------------------------------------------------
def temporal_ddim_invert(eps_fn: EpsFn, z0: torch.Tensor, timesteps: list[int], *,
                         replicate_first_frame: bool = True, step: int | None = None) -> torch.Tensor:
    """DDIM inversion of z0 through ``timesteps`` (ascending).

    With ``replicate_first_frame`` the first frame's noise prediction is used for every
    frame (temporal inversion), which preserves frame differences up to
    sqrt(abar[t_last] / abar[0]); off, it is plain DDIM inversion. ``step`` is the DDIM
    stride (default: the spacing of ``timesteps``, 20 for a single step).
    """
    check_latents(z0)
    timesteps = check_timesteps(timesteps)
    if step is None:
        step = timesteps[1] - timesteps[0] if len(timesteps) > 1 else schedule.step_size()
    z = z0
    for tau in timesteps:
        eps = call_eps(eps_fn, z, tau)
        if replicate_first_frame:
            eps = eps[:, :, :1].expand_as(eps)
        a_cur, a_next = schedule.prev_abar(tau, step), schedule.abar(tau)
        x0 = (z - math.sqrt(1.0 - a_cur) * eps) / math.sqrt(a_cur)
        z = math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps
    return z


# -- stage 3 ----------------------------------------------------------------------------
def sto_step(z: torch.Tensor, x0: torch.Tensor, z0: torch.Tensor, flow: torch.Tensor, abar_t: float, c_t: float,
             lambda_spa: float, lambda_temp: float, *, detach_warp: bool = True, impl: str = "auto") -> torch.Tensor:
    """One closed-form STO step: z' = z + c_t * grad_z L (module docstring)."""
    n = x0[0].numel()
    g = (2.0 * lambda_spa / n) * (x0 - z0)
    if lambda_temp and x0.shape[2] > 1:
        # The temporal gradient is a sum of signs: its derivative is zero almost everywhere,
        # so detaching it keeps this step exactly differentiable (full-gradient attacks).
        _, g_temp = warp_l1_grad(x0.detach(), flow.detach(), detach_warp=detach_warp, impl=impl)
        g = g - lambda_temp * g_temp.to(g.dtype)
    return z + (c_t / math.sqrt(abar_t)) * g


def purify_latents(eps_fn: EpsFn, z0: torch.Tensor, flow: torch.Tensor,
                   config: VideoPureConfig | None = None, invert_eps_fn: EpsFn | None = None) -> list[torch.Tensor]:
    """Stages 2 and 3: the voting members in order t = 101, 81, ..., 1, then the final latent.

    z0 (B, 4, T, h, w), flow (B, T-1, 2, h, w) at latent resolution. Each member has z0's
    shape. With ``config.sto`` off the members are the plain DDIM x0 predictions.
    ``invert_eps_fn`` (default ``eps_fn``) serves the inversion calls: the same network,
    passed separately only so callers can time the two phases apart.
    """
    if config is not None and not isinstance(config, VideoPureConfig):
        raise InputError(f"config must be a VideoPureConfig or None, got {type(config).__name__}")
    cfg = config or VideoPureConfig()
    check_latents(z0, flow)
    step = cfg.step
    ts = cfg.timesteps
    lam_spa, lam_temp = cfg.lambdas(tuple(z0.shape))
    z = temporal_ddim_invert(invert_eps_fn or eps_fn, z0, ts, replicate_first_frame=cfg.temporal_inversion, step=step)

    def optimise(z_t, x0_t, t):
        if not cfg.sto:
            return z_t
        return sto_step(z_t, x0_t, z0, flow, schedule.abar(t), schedule.sto_coefficient(t, step, cfg.alpha_s),
                        lam_spa, lam_temp, detach_warp=cfg.detach_warp, impl=cfg.kernel_impl)

    members: list[torch.Tensor] = []
    eps = None
    for t in reversed(ts):
        eps = call_eps(eps_fn, z, t)
        a_t, a_prev = schedule.abar(t), schedule.prev_abar(t, step)
        sq, sq1 = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        x0 = (z - sq1 * eps) / sq
        z_opt = optimise(z, x0, t)
        member = (z_opt - sq1 * eps) / sq if cfg.sto else x0
        members.append(member)
        x0_next = member if cfg.sto_feedback else x0
        z = math.sqrt(a_prev) * x0_next + math.sqrt(1.0 - a_prev) * eps
    # The final latent, optimised once more with the last eps, abar[t_1] and sigma2_{t_1}.
    t1 = ts[0]
    x0 = (z - math.sqrt(1.0 - schedule.abar(t1)) * eps) / math.sqrt(schedule.abar(t1))
    members.append(optimise(z, x0, t1))
    return members


# -- stage 4 ----------------------------------------------------------------------------
def vote(member_logits: torch.Tensor, mode: str = "hard") -> tuple[torch.Tensor, torch.Tensor]:
    """member_logits (M, B, K) -> (labels (B,), member labels (M, B)).

    hard: most frequent member label, ties to the smallest class index; soft: argmax of
    the mean softmax; off: the last member's label.
    """
    if member_logits.ndim != 3:
        raise InputError(f"member logits must be (M, B, K), got {tuple(member_logits.shape)}")
    member_labels = member_logits.argmax(dim=-1)
    if mode == "off":
        return member_labels[-1], member_labels
    if mode == "soft":
        return member_logits.float().softmax(-1).mean(0).argmax(-1), member_labels
    if mode != "hard":
        raise InputError(f"voting mode {mode!r} is not one of {VOTING}")
    k = member_logits.shape[-1]
    counts = torch.nn.functional.one_hot(member_labels, k).sum(0)  # (B, K)
    return counts.argmax(-1), member_labels  # argmax returns the first maximum: smallest class
