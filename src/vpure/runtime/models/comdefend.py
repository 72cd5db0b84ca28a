"""ComDefend (Jia et al., CVPR 2019), the light spatial defence for dense attacks.

ComCNN compresses each frame into a 12-channel code which is binarised at inference;
RecCNN rebuilds the frame from the code. During training Gaussian noise is added to the
code logits before the sigmoid so the code learns to be binary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import ComponentSpec, Role, TensorSpec, register
from .layout import batch_to_frames, frames_to_batch

COM_WIDTHS = (16, 32, 64, 128, 256, 128, 64, 32)
REC_WIDTHS = (32, 64, 128, 256, 128, 64, 32, 16)
CODE_CHANNELS = 12


def _stack(cin: int, widths, cout: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.ELU(inplace=True)]
        cin = w
    layers.append(nn.Conv2d(cin, cout, 3, 1, 1))
    return nn.Sequential(*layers)


class ComDefend(nn.Module):
    """frames (B, 3, T, H, W) in [0, 1] -> reconstructed frames, same shape, in [0, 1]."""

    def __init__(self, com_widths=COM_WIDTHS, rec_widths=REC_WIDTHS, code_channels: int = CODE_CHANNELS,
                 noise_std: float = 20.0):
        super().__init__()
        self.com = _stack(3, com_widths, code_channels)
        self.rec = _stack(code_channels, rec_widths, 3)
        self.noise_std = noise_std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (N, 3, H, W) -> code (N, 12, H, W): binary in eval, soft (noisy) in training."""
        logits = self.com(x * 2.0 - 1.0)
        if self.training:
            return torch.sigmoid(logits + self.noise_std * torch.randn_like(logits))
        return (logits > 0).to(x.dtype)  # sigmoid(l) > 0.5  <=>  l > 0

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.rec(code))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return batch_to_frames(self.decode(self.encode(frames_to_batch(frames))), frames.shape[0])


def comdefend_config(model: ComDefend) -> dict:
    return {"com_widths": [m.out_channels for m in model.com if isinstance(m, nn.Conv2d)][:-1],
            "rec_widths": [m.out_channels for m in model.rec if isinstance(m, nn.Conv2d)][:-1],
            "code_channels": model.com[-1].out_channels, "noise_std": model.noise_std}


def load_comdefend(path, **overrides) -> ComDefend:
    """From a vpure safetensors file (architecture in its metadata) or a .pth state dict
    of the default architecture."""
    from ..checkpoint import construct, load_into, read_state_dict

    state, cfg = read_state_dict(path)
    model = construct(ComDefend, {**cfg, **overrides}, path)
    return load_into(model, state, str(path)).eval()


def train_comdefend(model: ComDefend, frames, *, steps: int = 100, lr: float = 1e-3, code_weight: float = 1e-4,
                    seed: int = 0, progress: bool | None = None) -> list[float]:
    """Train on clean frames (N, 3, H, W) in [0, 1]: reconstruction MSE + code sparsity.

    Returns the loss per step. Deterministic for a seed (CPU).
    """
    from ..log import progress as bar

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in bar(range(steps), total=steps, desc="comdefend", enable=progress):
        idx = torch.randint(0, frames.shape[0], (min(8, frames.shape[0]),), generator=g)
        x = frames[idx]
        code = model.encode(x)
        loss = torch.nn.functional.mse_loss(model.decode(code), x) + code_weight * code.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def tiny_comdefend() -> ComDefend:
    return ComDefend(com_widths=(8, 16), rec_widths=(16, 8))


register(ComponentSpec(
    name="comdefend", role=Role.COMDEFEND,
    inputs=(TensorSpec("frames", ("B", 3, "T", "H", "W")),),
    outputs=(TensorSpec("purified", ("B", 3, "T", "H", "W")),),
    profile={"B": (1, 1, 2), "T": (1, 4, 16), "H": (32, 64, 64), "W": (32, 64, 64)},
    build_tiny=f"{__name__}:tiny_comdefend",
    loader=f"{__name__}:load_comdefend",
    exporter="legacy", exporter_reason="plain conv graph; tracing is stable",
    doc="ComCNN + binarised code + RecCNN, per frame",
))
