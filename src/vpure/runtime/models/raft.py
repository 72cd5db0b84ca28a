"""RAFT optical flow (Teed & Deng, ECCV 2020), the original architecture and the key names
of princeton-vl's ``raft-things.pth`` / ``raft-small.pth`` (with or without ``module.``).

large: feature encoder 256-d (instance norm), context encoder 128+128 (batch norm), 4-level
all-pairs correlation pyramid, radius 4, separable ConvGRU, convex 8x upsampling.
small: 128-d features, context 96+64, radius 3, ConvGRU, bilinear 8x upsampling.

``stride`` (8 as published, or 4) is the encoders' output stride: at 4 the last encoder
stage keeps its resolution (same weights shapes, one stride-2 conv becomes stride 1), the
flow is estimated on a grid twice as fine and upsampled 4x (the large model's convex-mask
head then predicts 4x4 instead of 8x8 weights per cell). Small frames (the mini-world's 64
pixels: an 8x8 grid at stride 8) need it; checkpoints record it in their config.

One file past ~400 lines on purpose: the encoders, correlation pyramid, update blocks and
key mapping are one architecture whose parameter names must match the original's.

Input frames are in [0, 1]. ``input_range="unit"`` feeds them as they are (VideoPure's
released code disables RAFT's normalisation); ``"native"`` applies RAFT's own
2 * (x / 255) - 1 to the 0..255 image, i.e. 2x - 1. The iteration count is fixed at
construction so the graph exports to ONNX (grid_sample needs opset 16 or later).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from ..registry import ComponentSpec, Role, TensorSpec, Tolerance, register
from .layout import frames_to_batch

INPUT_RANGES = ("unit", "native")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # no affine, no running stats: no checkpoint keys
    return nn.Identity()


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, planes: int, norm: str, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.norm1, self.norm2 = _norm(norm, planes), _norm(norm, planes)
        self.downsample = None
        if stride != 1 or cin != planes:  # the projection the published stride-2 stages have
            self.norm3 = _norm(norm, planes)
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride), self.norm3)

    def forward(self, x):
        y = self.relu(self.norm2(self.conv2(self.relu(self.norm1(self.conv1(x))))))
        return self.relu((x if self.downsample is None else self.downsample(x)) + y)


class BottleneckBlock(nn.Module):
    def __init__(self, cin: int, planes: int, norm: str, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes // 4, 1)
        self.conv2 = nn.Conv2d(planes // 4, planes // 4, 3, padding=1, stride=stride)
        self.conv3 = nn.Conv2d(planes // 4, planes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.norm1, self.norm2, self.norm3 = _norm(norm, planes // 4), _norm(norm, planes // 4), _norm(norm, planes)
        self.downsample = None
        if stride != 1 or cin != planes:  # the projection the published stride-2 stages have
            self.norm4 = _norm(norm, planes)
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride), self.norm4)

    def forward(self, x):
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        y = self.relu(self.norm3(self.conv3(y)))
        return self.relu((x if self.downsample is None else self.downsample(x)) + y)


class Encoder(nn.Module):
    """Basic (64/96/128, residual) or small (32/64/96, bottleneck) encoder at 1/stride resolution."""

    def __init__(self, output_dim: int, norm: str, small: bool, stride: int = 8):
        super().__init__()
        dims = (32, 64, 96) if small else (64, 96, 128)
        block = BottleneckBlock if small else ResidualBlock
        self.conv1 = nn.Conv2d(3, dims[0], 7, stride=2, padding=3)
        self.norm1 = _norm(norm, dims[0])
        self.relu1 = nn.ReLU(inplace=True)
        cin = dims[0]
        for i, (d, s) in enumerate(zip(dims, (1, 2, 2 if stride == 8 else 1))):
            self.add_module(f"layer{i + 1}", nn.Sequential(block(cin, d, norm, s), block(d, d, norm, 1)))
            cin = d
        self.conv2 = nn.Conv2d(cin, output_dim, 1)

    def forward(self, x):
        x = self.relu1(self.norm1(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class FlowHead(nn.Module):
    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


def _gru_step(h, x, cz, cr, cq):
    hx = torch.cat([h, x], dim=1)
    z, r = torch.sigmoid(cz(hx)), torch.sigmoid(cr(hx))
    q = torch.tanh(cq(torch.cat([r * h, x], dim=1)))
    return (1 - z) * h + z * q


class ConvGRU(nn.Module):
    def __init__(self, hidden: int, cin: int):
        super().__init__()
        self.convz = nn.Conv2d(hidden + cin, hidden, 3, padding=1)
        self.convr = nn.Conv2d(hidden + cin, hidden, 3, padding=1)
        self.convq = nn.Conv2d(hidden + cin, hidden, 3, padding=1)

    def forward(self, h, x):
        return _gru_step(h, x, self.convz, self.convr, self.convq)


class SepConvGRU(nn.Module):
    def __init__(self, hidden: int, cin: int):
        super().__init__()
        for axis, k, p in (("1", (1, 5), (0, 2)), ("2", (5, 1), (2, 0))):
            for gate in "zrq":
                self.add_module(f"conv{gate}{axis}", nn.Conv2d(hidden + cin, hidden, k, padding=p))

    def forward(self, h, x):
        h = _gru_step(h, x, self.convz1, self.convr1, self.convq1)  # horizontal
        return _gru_step(h, x, self.convz2, self.convr2, self.convq2)  # vertical


class MotionEncoder(nn.Module):
    def __init__(self, corr_planes: int, small: bool):
        super().__init__()
        self.small = small
        if small:
            self.convc1 = nn.Conv2d(corr_planes, 96, 1)
            self.convf1 = nn.Conv2d(2, 64, 7, padding=3)
            self.convf2 = nn.Conv2d(64, 32, 3, padding=1)
            self.conv = nn.Conv2d(128, 80, 3, padding=1)
        else:
            self.convc1 = nn.Conv2d(corr_planes, 256, 1)
            self.convc2 = nn.Conv2d(256, 192, 3, padding=1)
            self.convf1 = nn.Conv2d(2, 128, 7, padding=3)
            self.convf2 = nn.Conv2d(128, 64, 3, padding=1)
            self.conv = nn.Conv2d(64 + 192, 126, 3, padding=1)

    def forward(self, flow, corr):
        cor = F.relu(self.convc1(corr))
        if not self.small:
            cor = F.relu(self.convc2(cor))
        flo = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([cor, flo], dim=1))), flow], dim=1)


class UpdateBlock(nn.Module):
    def __init__(self, corr_planes: int, hidden: int, small: bool, stride: int = 8):
        super().__init__()
        self.encoder = MotionEncoder(corr_planes, small)
        if small:
            self.gru = ConvGRU(hidden, 82 + 64)
            self.flow_head = FlowHead(hidden, 128)
            self.mask = None
        else:
            self.gru = SepConvGRU(hidden, 128 + hidden)
            self.flow_head = FlowHead(hidden, 256)
            self.mask = nn.Sequential(nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(256, stride * stride * 9, 1))

    def forward(self, net, inp, corr, flow):
        net = self.gru(net, torch.cat([inp, self.encoder(flow, corr)], dim=1))
        mask = None if self.mask is None else 0.25 * self.mask(net)
        return net, mask, self.flow_head(net)


def _sample(img: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """grid_sample at pixel coordinates (x, y), align_corners=True, zero padding."""
    h, w = img.shape[-2:]
    x, y = coords.split(1, dim=-1)
    return F.grid_sample(img, torch.cat([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1), align_corners=True)


class RAFT(nn.Module):
    """image1, image2 (N, 3, H, W) in [0, 1], H and W multiples of ``stride`` -> flow (N, 2, H, W)
    from 1 to 2."""

    def __init__(self, small: bool = False, iters: int = 10, input_range: str = "unit", corr_levels: int = 4,
                 stride: int = 8):
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")
        if stride not in (4, 8):
            raise ValueError(f"RAFT stride must be 4 or 8, got {stride!r}")
        self.small, self.iters, self.input_range, self.stride = small, iters, input_range, stride
        self.hidden_dim, self.context_dim = (96, 64) if small else (128, 128)
        # 4 levels as published; the mini-world's 64-pixel frames use 3 (min size 64).
        self.corr_levels, self.corr_radius = corr_levels, (3 if small else 4)
        planes = self.corr_levels * (2 * self.corr_radius + 1) ** 2
        self.fnet = Encoder(128 if small else 256, "instance", small, stride)
        self.cnet = Encoder(self.hidden_dim + self.context_dim, "none" if small else "batch", small, stride)
        self.update_block = UpdateBlock(planes, self.hidden_dim, small, stride)

    def _corr_pyramid(self, f1: torch.Tensor, f2: torch.Tensor) -> list[torch.Tensor]:
        n, d, h, w = f1.shape
        corr = torch.matmul(f1.reshape(n, d, h * w).transpose(1, 2), f2.reshape(n, d, h * w))
        corr = (corr / (d ** 0.5)).reshape(n * h * w, 1, h, w)
        pyramid = [corr]
        for _ in range(self.corr_levels - 1):
            corr = F.avg_pool2d(corr, 2, stride=2)
            pyramid.append(corr)
        return pyramid

    def _lookup(self, pyramid: list[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
        r = self.corr_radius
        n, _, h, w = coords.shape
        c = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
        lin = torch.linspace(-r, r, 2 * r + 1, device=coords.device, dtype=coords.dtype)
        # As in the original: the first window axis offsets x, the second y.
        delta = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), dim=-1).view(1, 2 * r + 1, 2 * r + 1, 2)
        out = [_sample(corr, c / 2 ** i + delta).view(n, h, w, -1) for i, corr in enumerate(pyramid)]
        return torch.cat(out, dim=-1).permute(0, 3, 1, 2)

    @staticmethod
    def _grid(n: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.arange(h, device=like.device, dtype=like.dtype),
                                torch.arange(w, device=like.device, dtype=like.dtype), indexing="ij")
        return torch.stack([xs, ys], dim=0)[None].expand(n, 2, h, w)

    def _upsample(self, flow: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, _, h, w = flow.shape
        s = self.stride
        if mask is None:
            return s * F.interpolate(flow, size=(s * h, s * w), mode="bilinear", align_corners=True)
        mask = torch.softmax(mask.view(n, 1, 9, s, s, h, w), dim=2)
        up = F.unfold(s * flow, [3, 3], padding=1).view(n, 2, 9, 1, 1, h, w)
        return torch.sum(mask * up, dim=2).permute(0, 1, 4, 2, 5, 3).reshape(n, 2, s * h, s * w)

    @property
    def min_size(self) -> int:
        """The coarsest correlation level must be at least 2 pixels: stride * 2**levels."""
        return self.stride * 2 ** self.corr_levels

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        return self.predictions(image1, image2, every_iteration=False)[-1]

    def predictions(self, image1: torch.Tensor, image2: torch.Tensor, every_iteration: bool = True) -> list[torch.Tensor]:
        """Full-resolution flow after each refinement iteration (for RAFT's sequence loss), or
        only the last one."""
        h, w = image1.shape[-2:]
        s = self.stride
        if not torch.jit.is_tracing() and (h % s or w % s or min(h, w) < self.min_size):
            raise InputError(f"RAFT needs H and W multiples of {s} and >= {self.min_size} "
                             f"(a {self.corr_levels}-level correlation pyramid at 1/{s} resolution), got {h}x{w}")
        if self.input_range == "native":
            image1, image2 = 2 * image1 - 1, 2 * image2 - 1
        n = image1.shape[0]
        fmaps = self.fnet(torch.cat([image1, image2], dim=0)).float()
        pyramid = self._corr_pyramid(fmaps[:n], fmaps[n:])
        net, inp = torch.split(self.cnet(image1), [self.hidden_dim, self.context_dim], dim=1)
        net, inp = torch.tanh(net), torch.relu(inp)
        h, w = fmaps.shape[-2:]
        coords0 = self._grid(n, h, w, fmaps)
        coords1 = coords0.clone()
        mask, out = None, []
        for i in range(self.iters):
            if self.training:
                coords1 = coords1.detach()  # as published: each iteration's gradient stops at its input
            corr = self._lookup(pyramid, coords1)
            net, mask, delta = self.update_block(net, inp, corr, coords1 - coords0)
            coords1 = coords1 + delta
            if every_iteration or i == self.iters - 1:
                out.append(self._upsample(coords1 - coords0, mask))
        return out


class RAFTFlow:
    """Flow provider over clips: frames (B, 3, T, H, W) in [0, 1] -> flows (B, T-1, 2, H, W).

    Frame pairs are batched ``pairs_per_call`` at a time (memory bound for long clips); H and
    W are padded by replication to multiples of the stride (and to RAFT's minimum size),
    centred as RAFT's own ``InputPadder`` does (half the padding before, the rest after;
    VideoPure's released code uses it too), and the flow is cropped back.
    """

    def __init__(self, model: RAFT, pairs_per_call: int = 8):
        self.model, self.pairs_per_call = model.eval(), max(1, pairs_per_call)

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor, input_range: str | None = None) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[1] != 3 or frames.shape[2] < 2:
            raise InputError(f"frames must be (B, 3, T>=2, H, W), got {tuple(frames.shape)}")
        b, _, t, h, w = frames.shape
        s = self.model.stride
        ph, pw = max((-h) % s, self.model.min_size - h), max((-w) % s, self.model.min_size - w)
        x = frames_to_batch(frames)
        top, left = ph // 2, pw // 2
        if ph or pw:
            x = F.pad(x, (left, pw - left, top, ph - top), mode="replicate")
        x = x.reshape(b, t, 3, h + ph, w + pw)
        first, second = x[:, :-1].reshape(-1, 3, h + ph, w + pw), x[:, 1:].reshape(-1, 3, h + ph, w + pw)
        k = self.pairs_per_call
        flows = torch.cat([self.model(first[i:i + k], second[i:i + k]) for i in range(0, first.shape[0], k)])
        return flows[..., top:top + h, left:left + w].reshape(b, t - 1, 2, h, w)


def raft_large(iters: int = 10, input_range: str = "unit") -> RAFT:
    return RAFT(small=False, iters=iters, input_range=input_range)


def raft_small(iters: int = 10, input_range: str = "unit") -> RAFT:
    return RAFT(small=True, iters=iters, input_range=input_range)


def tiny_raft() -> RAFT:
    return RAFT(small=True, iters=2)


_TV_ENCODERS = {"feature_encoder.": "fnet.", "context_encoder.": "cnet."}
_TV_UPDATE = {"motion_encoder.convcorr1.0.": "encoder.convc1.", "motion_encoder.convcorr2.0.": "encoder.convc2.",
              "motion_encoder.convflow1.0.": "encoder.convf1.", "motion_encoder.convflow2.0.": "encoder.convf2.",
              "motion_encoder.conv.0.": "encoder.conv.", "flow_head.": "flow_head."}


def torchvision_to_princeton(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ``raft_large``/``raft_small`` state dict to princeton-vl keys.

    torchvision wraps each conv+norm in ``Conv2dNormActivation`` (``convnormrelu{k}.0/1``),
    calls the encoders ``feature_encoder``/``context_encoder``, the GRU ``recurrent_block``
    and the upsampling mask ``mask_predictor``. The downsample norm is also registered as
    ``norm3`` (residual) / ``norm4`` (bottleneck) in the original layout, so it is copied.
    """
    import re

    small = "update_block.recurrent_block.convgru2.convz.weight" not in state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = None
        for tv, pv in _TV_ENCODERS.items():
            if key.startswith(tv):
                rest = key[len(tv):]
                rest = re.sub(r"^convnormrelu\.0\.", "conv1.", rest)
                rest = re.sub(r"^convnormrelu\.1\.", "norm1.", rest)
                rest = re.sub(r"\.convnormrelu(\d)\.0\.", r".conv\1.", rest)
                rest = re.sub(r"\.convnormrelu(\d)\.1\.", r".norm\1.", rest)
                rest = re.sub(r"^conv\.", "conv2.", rest)
                new = pv + rest
                m = re.match(r"^(layer\d\.\d)\.downsample\.1\.(.*)$", rest)
                if m:
                    out[f"{pv}{m.group(1)}.{'norm4' if small else 'norm3'}.{m.group(2)}"] = value
        if key.startswith("update_block."):
            rest = key[len("update_block."):]
            for tv, pv in _TV_UPDATE.items():
                if rest.startswith(tv):
                    new = "update_block." + pv + rest[len(tv):]
            m = re.match(r"^recurrent_block\.convgru(\d)\.conv([zrq])\.(.*)$", rest)
            if m:
                gate = f"conv{m.group(2)}" if small else f"conv{m.group(2)}{m.group(1)}"
                new = f"update_block.gru.{gate}.{m.group(3)}"
        if key.startswith("mask_predictor."):
            new = key.replace("mask_predictor.convrelu.0.", "update_block.mask.0.").replace(
                "mask_predictor.conv.", "update_block.mask.2.")
        if new is None:
            raise CheckpointError(f"torchvision RAFT key {key!r} has no counterpart in the RAFT layout")
        out[new] = value
    return out


def load_raft(path, iters: int = 10, input_range: str = "unit") -> RAFT:
    """princeton-vl ``raft-things.pth`` / ``raft-small.pth`` (``module.`` prefixes stripped),
    torchvision ``raft_large``/``raft_small`` state dicts (renamed), or a vpure safetensors
    file; large vs small is read from the feature encoder's width."""
    from ..checkpoint import load_into, read_state_dict

    state, _ = read_state_dict(path)
    if any(k.startswith("feature_encoder.") for k in state):
        state = torchvision_to_princeton(state)
    w = state.get("fnet.conv1.weight")
    if w is None:
        raise CheckpointError(f"{path}: no fnet.conv1.weight, not a RAFT checkpoint in the princeton-vl layout")
    small = w.shape[0] == 32
    levels = 4
    corr_in = state.get("update_block.encoder.convc1.weight")
    if corr_in is not None:  # correlation planes = levels * (2r + 1)^2
        levels = max(1, int(corr_in.shape[1]) // (2 * (3 if small else 4) + 1) ** 2)
    model = RAFT(small=small, iters=iters, input_range=input_range, corr_levels=levels)
    return load_into(model, state, str(path)).eval()


register(ComponentSpec(
    name="raft", role=Role.FLOW,
    inputs=(TensorSpec("image1", ("B", 3, "H", "W")), TensorSpec("image2", ("B", 3, "H", "W"))),
    outputs=(TensorSpec("flow", ("B", 2, "H", "W")),),
    profile={"B": (1, 2, 8), "H": (128, 128, 128), "W": (128, 128, 128)},
    build_tiny=f"{__name__}:tiny_raft",
    loader=f"{__name__}:load_raft",
    exporter="legacy", exporter_reason="fixed iteration count unrolled by tracing; grid_sample needs opset 16",
    opset=17,
    tolerance=Tolerance(fp32_atol=1e-3, fp32_rtol=1e-3, fp16_sqnr_db=25.0, int8_sqnr_db=10.0),
    fp32_ops=("InstanceNormalization", "Softmax", "GridSample"),
    precisions=("fp32", "fp16"),
    precision_note="int8 RAFT misses 10 dB SQNR even with the update block in float: quantised encoder "
                   "features corrupt the correlation volume that every iteration reads",
    doc="RAFT optical flow (princeton-vl layout), fixed iterations; frame pairs batched",
))
