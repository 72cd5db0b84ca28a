"""Seeded synthetic clips on real photographs, with exact optical flow.

Every clip shows one textured object of a class over a background from real photographs
that ship inside scikit-image (``skimage/data``; read as image files, scikit-image itself
is never imported). The camera pans across the photograph and the object translates and
rotates, so block matching and optical flow have real texture to work with, while the
class is decided by the object's silhouette and can be read from any single frame.

Classes (the silhouette of the object):

====  ========  =================================================
id    name      silhouette (unit radius, object coordinates)
====  ========  =================================================
0     disc      filled circle
1     square    filled square, half side 0.85
2     triangle  filled equilateral triangle
3     cross     plus sign, arm half width 0.33
4     ring      annulus, radii 0.44 to 1.0
====  ========  =================================================

Motion per clip: the camera moves with constant velocity up to ``max_camera_speed``
px/frame plus a small acceleration; the object moves on a straight line at up to
``max_object_speed`` px/frame and rotates at up to ``max_spin`` rad/frame. The object
texture is a crop of a different photograph, tinted, attached to the object (it moves and
rotates with it), so the ground-truth flow is exact: camera motion for the background,
the object's rigid motion inside its silhouette (pixels counted as object where its
coverage exceeds one half). Sensor noise is added last.

Splits are fixed by seed: clip ``i`` of split ``s`` is generated from the seed
``(world seed, split id, i)``, so any clip can be regenerated alone and the splits never
share a clip. All photographs serve every split (with different crops, paths and tints).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigBase, check
from ..errors import ConfigError

CLASSES = ("disc", "square", "triangle", "cross", "ring")
SPLITS = {"train": 0, "val": 1, "test": 2}
# Scenes (backgrounds) and surfaces (object textures) from skimage/data.
BACKGROUNDS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
               "motorcycle_right.png", "camera.png", "coins.png", "moon.png", "hubble_deep_field.jpg",
               "retina.jpg", "ihc.png", "page.png", "text.png", "clock_motion.png", "cell.png")
TEXTURES = ("brick.png", "grass.png", "gravel.png", "color.png", "logo.png", "horse.png", "chessboard_RGB.png")


@dataclass(frozen=True)
class WorldConfig(ConfigBase):
    frames: int = 16
    size: int = 64
    seed: int = 0
    max_object_speed: float = 2.0  # px/frame
    max_camera_speed: float = 1.5  # px/frame
    max_spin: float = 0.06  # rad/frame
    object_radius: tuple[float, float] = (11.0, 17.0)  # px
    background_short_side: int = 160  # photographs are resized so a 64-px crop sees part of a scene
    noise_std: float = 0.01

    def validate(self) -> None:
        check(self.frames >= 2, f"WorldConfig.frames must be >= 2, got {self.frames}")
        check(self.size >= 32 and self.size % 8 == 0, f"WorldConfig.size must be a multiple of 8 >= 32, got {self.size}")
        check(self.object_radius[0] <= self.object_radius[1] < self.size / 2,
              f"WorldConfig.object_radius {self.object_radius} must be ordered and below size/2")
        check(self.background_short_side >= self.size + 2 * self.max_camera_speed * self.frames + 4,
              "WorldConfig.background_short_side is too small for the camera path")


@dataclass
class Sample:
    clip: torch.Tensor  # (3, T, H, W) float32 in [0, 1]
    label: int
    flow: torch.Tensor  # (T-1, 2, H, W) float32, frame t -> t+1, (dx, dy) in pixels
    mask: torch.Tensor  # (T, H, W) bool, object pixels


def _skimage_data() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the mini-world's photographs come from scikit-image's data folder; "
                          "pip install scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.lru_cache(maxsize=None)
def _photo(name: str, short_side: int) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], RGB, shorter side resized to ``short_side`` (area)."""
    import cv2

    path = _skimage_data() / name
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ConfigError(f"cannot read the mini-world photograph {path}")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    scale = short_side / min(h, w)
    img = cv2.resize(img, (max(short_side, round(w * scale)), max(short_side, round(h * scale))),
                     interpolation=cv2.INTER_AREA)
    return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0).contiguous()


def _sdf(kind: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (object units, negative inside) to silhouette ``kind`` at (u, v)."""
    def box(hx, hy):
        dx, dy = u.abs() - hx, v.abs() - hy
        out = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
        return out + torch.maximum(dx, dy).clamp(max=0)

    if kind == 0:
        return torch.sqrt(u * u + v * v) - 1.0
    if kind == 1:
        return box(0.85, 0.85)
    if kind == 2:  # equilateral triangle of circumradius 1, apex up (v grows downwards)
        k = math.sqrt(3.0)
        x, y = u.abs(), -v
        d1 = (k * x + y - 1.0) / 2.0  # the two upper edges
        d2 = -y - 0.5  # the base
        return torch.maximum(d1, d2)
    if kind == 3:
        return torch.minimum(box(0.33, 1.0), box(1.0, 0.33))
    if kind == 4:
        r = torch.sqrt(u * u + v * v)
        return (r - 0.72).abs() - 0.28
    raise ConfigError(f"no silhouette {kind}")


def _sample_bilinear(img: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """img (3, H, W) at pixel coordinates x, y (N, h, w) -> (N, 3, h, w), border-clamped."""
    _, h, w = img.shape
    grid = torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1)
    return F.grid_sample(img.expand(x.shape[0], -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                         align_corners=True)


def clip_seed(cfg: WorldConfig, split: str, index: int) -> int:
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return (cfg.seed * 1_000_003 + SPLITS[split] * 10_000_019 + int(index)) % (2 ** 63)


def make_clip(split: str, index: int, cfg: WorldConfig | None = None, label: int | None = None) -> Sample:
    """Clip ``index`` of ``split``: deterministic, independent of every other clip."""
    cfg = cfg or WorldConfig()
    rng = np.random.default_rng(clip_seed(cfg, split, index))
    t_n, s = cfg.frames, cfg.size
    label = int(rng.integers(len(CLASSES))) if label is None else int(label)
    bg = _photo(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], cfg.background_short_side)
    tex = _photo(TEXTURES[rng.integers(len(TEXTURES))], 96)
    t = torch.arange(t_n, dtype=torch.float64)

    # Camera path: top-left corner of the view in photograph pixels.
    _, bh, bw = bg.shape
    vc = rng.uniform(-1, 1, 2) * cfg.max_camera_speed
    ac = rng.uniform(-1, 1, 2) * 0.02
    span = np.abs(vc) * (t_n - 1) + np.abs(ac) * (t_n - 1) ** 2 / 2 + 2
    c0 = np.array([rng.uniform(span[0], bw - s - span[0]), rng.uniform(span[1], bh - s - span[1])])
    cam = torch.from_numpy(c0)[None] + t[:, None] * torch.from_numpy(vc)[None] + 0.5 * t[:, None] ** 2 * torch.from_numpy(ac)[None]

    # Object path in view pixels: a straight line kept inside the frame, rotation, radius.
    r = rng.uniform(*cfg.object_radius)
    lo, hi = r * 0.6, s - 1 - r * 0.6
    for _ in range(100):
        p0 = rng.uniform(lo, hi, 2)
        v = rng.uniform(-1, 1, 2) * cfg.max_object_speed
        p1 = p0 + v * (t_n - 1)
        if lo <= p1.min() and p1.max() <= hi:
            break
    else:
        v = np.zeros(2)
    pos = torch.from_numpy(p0)[None] + t[:, None] * torch.from_numpy(v)[None]
    theta0, spin = rng.uniform(0, 2 * math.pi), rng.uniform(-1, 1) * cfg.max_spin
    ang = theta0 + spin * t
    tint = torch.from_numpy(rng.uniform(0.35, 1.0, 3)).float()
    tint[rng.integers(3)] = 1.0  # a vivid colour: one channel at full strength
    tex_off = rng.uniform(0, 96 - 2 * r - 1, 2) if 96 > 2 * r + 1 else np.zeros(2)

    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float64), torch.arange(s, dtype=torch.float64), indexing="ij")
    xs, ys = xs[None], ys[None]  # (1, s, s)
    bx, by = xs + cam[:, 0, None, None], ys + cam[:, 1, None, None]
    background = _sample_bilinear(bg, bx.float(), by.float())  # (T, 3, s, s)
    dx, dy = xs - pos[:, 0, None, None], ys - pos[:, 1, None, None]
    ca, sa = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
    u, w = (ca * dx + sa * dy) / r, (-sa * dx + ca * dy) / r  # object coordinates (rotate by -angle)
    sdf = _sdf(label, u, w) * r  # in pixels
    alpha = (0.5 - sdf).clamp(0, 1).float()[:, None]  # one-pixel anti-aliased edge
    texture = _sample_bilinear(tex, (u * r + r + tex_off[0]).float(), (w * r + r + tex_off[1]).float())
    texture = (0.15 + 0.85 * texture) * tint.view(1, 3, 1, 1)
    frames = alpha * texture + (1 - alpha) * background
    noise = torch.from_numpy(rng.standard_normal(frames.shape)).float() * cfg.noise_std
    frames = (frames + noise).clamp(0, 1)

    # Exact forward flow t -> t+1.
    mask = (alpha[:, 0] > 0.5)
    cam_flow = -(cam[1:] - cam[:-1])  # (T-1, 2)
    flow = cam_flow[:, :, None, None].expand(t_n - 1, 2, s, s).clone()
    ca1, sa1 = torch.cos(ang[1:])[:, None, None], torch.sin(ang[1:])[:, None, None]
    uu, ww = u[:-1] * r, w[:-1] * r  # object-frame offsets at t
    x1 = pos[1:, 0, None, None] + ca1 * uu - sa1 * ww
    y1 = pos[1:, 1, None, None] + sa1 * uu + ca1 * ww
    obj_flow = torch.stack([x1 - xs, y1 - ys], dim=1)
    m = mask[:-1, None].expand_as(flow)
    flow = torch.where(m, obj_flow, flow)
    return Sample(frames.permute(1, 0, 2, 3).contiguous(), label, flow.float(), mask)


def make_split(split: str, count: int, cfg: WorldConfig | None = None, start: int = 0,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``start .. start+count-1`` of ``split`` as uint8 (N, 3, T, H, W) and labels (N,)."""
    from ..log import progress as bar

    cfg = cfg or WorldConfig()
    clips = torch.empty(count, 3, cfg.frames, cfg.size, cfg.size, dtype=torch.uint8)
    labels = torch.empty(count, dtype=torch.int64)
    for i in bar(range(count), desc=f"mini-world {split}", enable=progress or None):
        smp = make_clip(split, start + i, cfg)
        clips[i] = (smp.clip * 255).round().to(torch.uint8)
        labels[i] = smp.label
    return clips, labels
