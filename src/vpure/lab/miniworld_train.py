"""Training every mini-world network on CPU, reproducibly from a seed (``vpure train``).

One loop (AdamW, linear warm-up then cosine decay, gradient clipping, a progress bar and
a final metrics line) serves every component; each ``train_<component>`` only says what a
batch is and what the loss is, then measures the test-split metrics its model card
records. Training data are clips of the seeded mini-world train split, generated once and
cached under ``$VPURE_CACHE/miniworld``. (Past ~400 lines: one loop and six short
per-component recipes read best side by side.)
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from vpure.runtime import atomic, schedule
from vpure.runtime.config import ConfigBase, check
from vpure.runtime.env import read_environment
from vpure.runtime.log import get_logger
from vpure.runtime.log import progress as bar
from vpure.runtime.precision import EMULATED_BF16, native_bf16
from vpure.lab import miniworld_eval as evaluate
from vpure.runtime.miniworld import models as mw
from vpure.runtime.miniworld.dataset import WorldConfig, make_clip, make_split

log = get_logger(__name__)


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """One component's training run; the defaults are the shipped weights' budgets."""

    component: str
    steps: int
    batch: int
    lr: float
    seed: int = 0
    train_clips: int = 1000
    eval_clips: int = 100
    warmup: int = 50
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    resume: bool = False  # start from the weights already in the folder (recorded in the card)
    crop: int = 0  # VAE and ComDefend: train on random square crops of this size (0: whole frames)
    # VAE: reconstruction loss weight of object pixels (mask dilated by one pixel) relative to the
    # background's 1. Objects cover ~9% of a frame and carry the class; 0 weighs every pixel alike.
    object_weight: float = 0.0
    # VAE: weight of a perceptual loss on the trained frame classifier's feature maps (each
    # stage's MSE over its mean square); the class lives in shapes the pixel loss blurs.
    feature_weight: float = 0.0
    freeze_encoder: bool = False  # VAE: train the decoder only (the latents, hence the UNet, stay valid)
    # Forward passes under bf16 autocast (weights, gradients and optimiser state stay fp32):
    # "auto" is bf16 where oneDNN has native bf16 (AVX512-BF16 or AMX), else fp32.
    precision: str = "auto"

    def validate(self) -> None:
        check(self.component in mw.COMPONENTS, f"TrainConfig.component {self.component!r} is not one of {mw.COMPONENTS}")
        check(self.steps >= 1 and self.batch >= 1, "TrainConfig.steps and batch must be >= 1")
        check(self.lr > 0, f"TrainConfig.lr must be > 0, got {self.lr}")
        check(self.train_clips >= 1 and self.eval_clips >= 1, "TrainConfig.train_clips and eval_clips must be >= 1")
        check(self.feature_weight >= 0, f"TrainConfig.feature_weight must be >= 0, got {self.feature_weight}")
        check(self.object_weight >= 0, f"TrainConfig.object_weight must be >= 0, got {self.object_weight}")
        check(self.crop == 0 or (self.crop >= 16 and self.crop % 8 == 0),
              f"TrainConfig.crop must be 0 or a multiple of 8 >= 16, got {self.crop}")
        check(self.precision in PRECISIONS, f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")

    def compute_precision(self) -> str:
        """The precision this run's forward passes use on this machine ("fp32" or "bf16")."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if native_bf16() else "fp32"


PRECISIONS = ("auto", "fp32", "bf16")


# Budgets measured on a 2-vCPU AMD EPYC (see each model card for the wall time).
BUDGETS: dict[str, TrainConfig] = {
    # fp32: bf16 autocast ran 1.6x faster per step (0.51 vs 0.80 s) but the same 1600 steps
    # ended at 21.58 dB instead of 22.35, and the VAE is the mini-world's weakest network.
    "vae": TrainConfig("vae", steps=1600, batch=16, lr=1e-3, precision="fp32"),  # ~0.80 s/step
    # fp32: PyTorch's CPU flash-attention backward is slower in bf16 than in fp32 at this
    # UNet's head size (8), which outweighs the convolutions' gain (1.30 vs 1.12 s/step).
    "unet": TrainConfig("unet", steps=1000, batch=8, lr=4e-4, precision="fp32"),  # ~1.12 s/step
    # The classifiers see 4000 clips with augmentation: on 1000 clips without it they memorised
    # backgrounds (frame classifier 83% train, 41% test).
    # Neither uses the stem max-pool: at 64 px it loses the silhouettes' corners. The frame
    # classifier needs ~6000 steps to pass 85% per frame; the recogniser then starts from it.
    "recognizer": TrainConfig("recognizer", steps=600, batch=16, lr=2e-4, train_clips=4000),
    "frame_classifier": TrainConfig("frame_classifier", steps=6000, batch=64, lr=2e-3, train_clips=4000),
    "comdefend": TrainConfig("comdefend", steps=800, batch=16, lr=1e-3),
    "raft": TrainConfig("raft", steps=3000, batch=8, lr=4e-4, train_clips=400, weight_decay=1e-5),  # ~0.65 s/step fp32, ~0.44 bf16
}
# The UNet needs the VAE; the recogniser is inflated from the frame classifier.
ORDER = ("vae", "unet", "frame_classifier", "recognizer", "comdefend", "raft")


def _load_cache(path: Path):
    """A cached tensor file, or None when it is absent or does not load (a torn or corrupted
    write, another version's format): the caller rebuilds it, with a warning."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
        log.warning("mini-world cache %s does not load (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None
    if isinstance(data, dict) and not {"clips", "labels"} <= set(data):
        log.warning("mini-world cache %s lacks clips or labels; rebuilding it", path)
        return None
    return data


def train_data(count: int, world: WorldConfig, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, T, H, W) uint8 clips and labels of ``split``, cached on disk."""
    key = hashlib.sha256(repr((world.to_dict(), split, count)).encode()).hexdigest()[:12]
    path = read_environment().cache_dir / "miniworld" / f"{split}-{count}-{key}.pt"
    data = _load_cache(path)
    if data is not None:
        return data["clips"], data["labels"]
    clips, labels = make_split(split, count, world, progress=True)
    with atomic.replacing(path) as tmp:
        torch.save({"clips": clips, "labels": labels}, tmp)
    return clips, labels


def train_masks(count: int, world: WorldConfig, split: str = "train") -> torch.Tensor:
    """(N, T, H, W) bool object masks of the first ``count`` clips of ``split``, cached on disk
    beside the clips (regenerated from the seeded generator: ~25 ms a clip)."""
    key = hashlib.sha256(repr((world.to_dict(), split, count, "mask")).encode()).hexdigest()[:12]
    path = read_environment().cache_dir / "miniworld" / f"{split}-{count}-mask-{key}.pt"
    cached = _load_cache(path)
    if isinstance(cached, torch.Tensor):
        return cached
    masks = torch.empty(count, world.frames, world.size, world.size, dtype=torch.bool)
    for i in bar(range(count), desc=f"mini-world {split} masks", enable=None):
        masks[i] = make_clip(split, i, world).mask
    with atomic.replacing(path) as tmp:
        torch.save(masks, tmp)
    return masks


def fit(params, cfg: TrainConfig, loss_fn: Callable[[torch.Generator], torch.Tensor], desc: str,
        progress: bool | None = None) -> list[float]:
    """AdamW with warm-up and cosine decay; ``loss_fn(generator)`` draws a batch and returns its loss."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)

    def lr_at(i: int) -> float:
        if i < cfg.warmup:
            return (i + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (i - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    low = cfg.compute_precision() == "bf16"
    if low and not native_bf16():
        log.warning("%s: --precision bf16 asked, but %s; `auto` would train in fp32", desc, EMULATED_BF16)
    losses: list[float] = []
    it = bar(range(cfg.steps), total=cfg.steps, desc=f"{desc} ({'bf16' if low else 'fp32'})", enable=progress)
    for _ in it:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            loss = loss_fn(g).float()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {len(losses)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if hasattr(it, "set_postfix") and len(losses) % 20 == 0:
            it.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    return losses


def _frames_of(clips_u8: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random frames (n, 3, H, W) in [0, 1] from random clips, and those clips' indices."""
    ci = torch.randint(0, clips_u8.shape[0], (n,), generator=g)
    ti = torch.randint(0, clips_u8.shape[2], (n,), generator=g)
    return clips_u8[ci, :, ti].float() / 255, ci


def _frames(clips_u8: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return _frames_of(clips_u8, n, g)[0]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Class-preserving augmentation per sample of (B, 3, ..., H, W): flips, quarter turns and
    a colour-channel permutation. Every silhouette class is invariant to all of them; they stop
    a small network from memorising backgrounds and tints instead of shapes."""
    out = []
    for xi in x:
        k = int(torch.randint(0, 4, (1,), generator=g))
        xi = torch.rot90(xi, k, dims=(-2, -1))
        if bool(torch.rand(1, generator=g) < 0.5):
            xi = xi.flip(-1)
        xi = xi[torch.randperm(3, generator=g)]
        out.append(xi)
    return torch.stack(out)


def _crop(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """A random ``size`` x ``size`` crop per sample of (B, C, H, W); ``size`` 0 keeps the frames."""
    if not size or size >= x.shape[-1]:
        return x
    h, w = x.shape[-2:]
    ys = torch.randint(0, h - size + 1, (x.shape[0],), generator=g).tolist()
    xs = torch.randint(0, w - size + 1, (x.shape[0],), generator=g).tolist()
    return torch.stack([xi[..., y:y + size, x0:x0 + size] for xi, y, x0 in zip(x, ys, xs)])


def _start(component: str, cfg: TrainConfig, weights_dir, fresh: Callable[[], torch.nn.Module] | None = None):
    """The module to train (train mode): the folder's weights when resuming, else ``fresh()``
    (default: the mini-world architecture, random init)."""
    module = mw.load(component, weights_dir) if cfg.resume else (fresh or (lambda: mw.build(component)))()
    return module.train()


def _clips(clips_u8, labels, n, g):
    i = torch.randint(0, clips_u8.shape[0], (n,), generator=g)
    return clips_u8[i].float() / 255, labels[i]


# -- per component -------------------------------------------------------------------

def train_vae(cfg, world, data, test, weights_dir, progress):
    from vpure.runtime.models.diffusion import VAEDecoder, VAEEncoder

    clips, _ = data
    vae = _start("vae", cfg, weights_dir)
    masks = train_masks(len(clips), world) if cfg.object_weight > 0 else None
    if cfg.freeze_encoder:
        for part in (vae.encoder, vae.quant_conv):
            part.eval().requires_grad_(False)
    critic = None
    if cfg.feature_weight > 0:  # the trained frame classifier, frozen, as the perceptual critic
        critic = mw.load("frame_classifier", weights_dir).eval().requires_grad_(False)

    def loss_fn(g):
        ci = torch.randint(0, clips.shape[0], (cfg.batch,), generator=g)
        ti = torch.randint(0, clips.shape[2], (cfg.batch,), generator=g)
        x = clips[ci, :, ti].float() / 255
        if masks is not None:  # the weight map travels with the frame through the crop
            w = 1 + cfg.object_weight * F.max_pool2d(masks[ci, ti].float()[:, None], 3, 1, 1)
            x = torch.cat([x, w], 1)
        x = _crop(x, cfg.crop, g)
        x, w = x[:, :3] * 2 - 1, (x[:, 3:] if masks is not None else None)
        with torch.set_grad_enabled(not cfg.freeze_encoder):
            post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        d = rec - x
        per_pixel = d.pow(2) + 0.1 * d.abs()
        loss = per_pixel.mean() if w is None else (per_pixel * w).sum() / (w.sum() * 3)
        if not cfg.freeze_encoder:
            loss = loss + 1e-6 * post.kl().mean()
        if critic is not None:
            with torch.no_grad():
                target = critic.feature_maps((x + 1) / 2)
            got = critic.feature_maps((rec.clamp(-1, 1) + 1) / 2)
            loss = loss + cfg.feature_weight * sum(F.mse_loss(a, b) / b.pow(2).mean().clamp_min(1e-6)
                                                   for a, b in zip(got, target)) / len(got)
        return loss

    losses = fit(vae.parameters(), cfg, loss_fn, "vae", progress)
    vae.eval()
    with torch.inference_mode():  # SD's latent contract: scale latents to unit variance
        g = torch.Generator().manual_seed(cfg.seed + 1)
        mean = vae.encode(_frames(clips, 512, g) * 2 - 1).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    enc, dec = VAEEncoder(vae), VAEDecoder(vae)
    metrics = {"vae_psnr_db": round(evaluate.reconstruction_psnr(lambda x: dec(enc(x)), test[0]), 2),
               "vae_object_psnr_db": round(evaluate.reconstruction_psnr(
                   lambda x: dec(enc(x)), test[0], masks=train_masks(len(test[0]), world, "test")), 2),
               "scaling_factor": round(float(vae.config.scaling_factor), 5), "final_train_loss": _tail(losses)}
    if mw.weights_path("recognizer", weights_dir).is_file():  # absent on a first `train all`
        recognizer = mw.load("recognizer", weights_dir).eval()
        metrics["recognizer_on_reconstruction"] = round(
            evaluate.reconstruction_accuracy(enc, dec, recognizer, *test), 4)
    return vae, metrics


def train_unet(cfg, world, data, test, weights_dir, progress):
    from vpure.runtime.models.diffusion import VAEEncoder
    from vpure.runtime.models.rewrites import fold_temporal_convs, unfold_temporal_convs

    clips, _ = data
    encoder = VAEEncoder(mw.load("vae", weights_dir)).eval()
    with torch.inference_mode():  # latents once: the VAE is frozen
        latents = torch.cat([encoder(clips[i:i + 16].float() / 255) for i in bar(
            range(0, len(clips), 16), desc="encode latents", enable=progress)])

    def fresh():
        unet = mw.build("unet")
        gen = torch.Generator().manual_seed(cfg.seed)
        unet.prompt_embedding.copy_(torch.randn(unet.prompt_embedding.shape, generator=gen))  # the "empty prompt"
        return unet

    unet = _start("unet", cfg, weights_dir, fresh)
    # Temporal (3,1,1) convolutions as 2-D ones while training (same parameters; PyTorch's CPU
    # conv3d is unblocked for them), back to diffusers' Conv3d layout before saving.
    fold_temporal_convs(unet)
    abar = schedule.alphas_cumprod().float()

    def loss_fn(g):
        i = torch.randint(0, len(latents), (cfg.batch,), generator=g)
        z0 = latents[i]
        # Half the timesteps from the range purification uses (t <= 200), half from all 1000.
        low = torch.randint(1, 201, (cfg.batch,), generator=g)
        full = torch.randint(1, 1000, (cfg.batch,), generator=g)
        t = torch.where(torch.rand(cfg.batch, generator=g) < 0.5, low, full)
        noise = torch.randn(z0.shape, generator=g)
        ab = abar[t].view(-1, 1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        eps = unet.unet(zt, t, encoder_hidden_states=unet.prompt_embedding.expand(cfg.batch, -1, -1)).sample
        return F.mse_loss(eps, noise)

    losses = fit(unet.parameters(), cfg, loss_fn, "unet", progress)
    unfold_temporal_convs(unet)
    unet.eval()
    metrics = {"unet_eps_mse_test": round(evaluate.unet_loss(unet, encoder, test[0]), 5),
               "final_train_loss": _tail(losses)}
    return unet, metrics


def train_recognizer(cfg, world, data, test, weights_dir, progress):
    from vpure.runtime.models.i3d import inflate_from_2d

    clips, labels = data
    # I3D's recipe: bootstrap from the trained 2D network. Trained from scratch, the 3D network
    # stayed at chance (loss ln 5) for 1500 steps on this data; the silhouettes must first be
    # found in single frames, which the frame classifier has already learned to do. Centre
    # inflation starts at the frame classifier's clip accuracy (93% on the test split); I3D's
    # mean inflation started at 69% (zero temporal padding at 4-8 time steps) and reached only
    # 83% after 600 steps.
    model = _start("recognizer", cfg, weights_dir, lambda: inflate_from_2d(
        mw.build("recognizer"), mw.load("frame_classifier", weights_dir), "centre"))

    def loss_fn(g):
        x, y = _clips(clips, labels, cfg.batch, g)
        return F.cross_entropy(model(augment(x, g)), y, label_smoothing=0.05)

    losses = fit(model.parameters(), cfg, loss_fn, "recognizer", progress)
    model.eval()
    return model, {"recognizer_accuracy": round(evaluate.recognizer_accuracy(model, *test), 4),
                   "final_train_loss": _tail(losses)}


def train_frame_classifier(cfg, world, data, test, weights_dir, progress):
    clips, labels = data
    model = _start("frame_classifier", cfg, weights_dir)

    def loss_fn(g):
        frames, ci = _frames_of(clips, cfg.batch, g)
        x = augment(frames, g)[:, :, None]  # (B, 3, 1, H, W)
        return F.cross_entropy(model(x)[:, 0], labels[ci], label_smoothing=0.05)

    losses = fit(model.parameters(), cfg, loss_fn, "frame_classifier", progress)
    model.eval()
    return model, {"frame_accuracy": round(evaluate.frame_accuracy(model, *test), 4),
                   "final_train_loss": _tail(losses)}


def train_comdefend(cfg, world, data, test, weights_dir, progress):
    clips, _ = data
    model = _start("comdefend", cfg, weights_dir)

    def loss_fn(g):
        x = _crop(_frames(clips, cfg.batch, g), cfg.crop, g)
        code = model.encode(x)
        return F.mse_loss(model.decode(code), x) + 1e-4 * code.mean()

    losses = fit(model.parameters(), cfg, loss_fn, "comdefend", progress)
    model.eval()
    return model, {"comdefend_psnr_db": round(evaluate.reconstruction_psnr(model, test[0]), 2),
                   "final_train_loss": _tail(losses)}


def train_raft(cfg, world, data, test, weights_dir, progress):
    pool = [make_clip("train", i, world) for i in bar(range(cfg.train_clips), desc="flow pairs", enable=progress)]
    frames = torch.stack([(s.clip * 255).round().to(torch.uint8) for s in pool])  # (N, 3, T, H, W)
    flows = torch.stack([s.flow.half() for s in pool])  # (N, T-1, 2, H, W)
    model = _start("raft", cfg, weights_dir)

    def loss_fn(g):
        ci = torch.randint(0, frames.shape[0], (cfg.batch,), generator=g)
        ti = torch.randint(0, flows.shape[1], (cfg.batch,), generator=g)
        a, b = frames[ci, :, ti].float() / 255, frames[ci, :, ti + 1].float() / 255
        gt = flows[ci, ti].float()
        preds = model.predictions(a, b)
        n = len(preds)
        return sum(0.8 ** (n - 1 - k) * (p - gt).abs().mean() for k, p in enumerate(preds))

    losses = fit(model.parameters(), cfg, loss_fn, "raft", progress)
    model.eval()
    clips_t, flows_t = evaluate.flow_pairs("test", min(cfg.eval_clips, 50), world)
    return model, {"raft_epe_px": round(evaluate.raft_epe(model, clips_t, flows_t), 4),
                   "dis_medium_epe_px": round(evaluate.dis_epe(clips_t, flows_t, "medium"), 4),
                   "final_train_loss": _tail(losses)}


TRAINERS = {"vae": train_vae, "unet": train_unet, "recognizer": train_recognizer,
            "frame_classifier": train_frame_classifier, "comdefend": train_comdefend, "raft": train_raft}


def _tail(losses: list[float], n: int = 50) -> float:
    return round(sum(losses[-n:]) / len(losses[-n:]), 5)


def train(cfg: TrainConfig, world: WorldConfig | None = None, weights_dir: str | Path | None = None,
          progress: bool | None = None, command: str = "") -> dict[str, Any]:
    """Train ``cfg.component``, save weights and card into ``weights_dir``; returns the card."""
    world = world or WorldConfig()
    torch.manual_seed(cfg.seed)
    resumed = None
    if cfg.resume:  # the chain of runs that produced the weights, so they can be reproduced
        prev = mw.read_card(cfg.component, weights_dir)
        digest = hashlib.sha256(mw.weights_path(cfg.component, weights_dir).read_bytes()).hexdigest()
        resumed = {"sha256": digest, "command": prev.get("command"), "steps": prev.get("steps"),
                   "metrics": prev.get("metrics"), "resumed_from": prev.get("resumed_from")}
    t0 = time.perf_counter()
    data = train_data(cfg.train_clips, world)
    test = train_data(cfg.eval_clips, world, split="test")
    module, metrics = TRAINERS[cfg.component](cfg, world, data, test, weights_dir, progress)
    card = {"summary": mw.SUMMARIES[cfg.component],
            "command": command or f"vpure train {cfg.component}", "data_seed": world.seed,
            "train_clips": cfg.train_clips, "eval_clips": cfg.eval_clips, "frames": world.frames, "size": world.size,
            "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed, "crop": cfg.crop,
            "object_weight": cfg.object_weight, "feature_weight": cfg.feature_weight,
            "freeze_encoder": cfg.freeze_encoder, "precision": cfg.compute_precision(),
            "resumed_from": resumed,
            "train_seconds": round(time.perf_counter() - t0, 1),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "parameters": sum(p.numel() for p in module.parameters()),
            "metrics": metrics, "check": evaluate.check_metrics(cfg.component, module, world, weights_dir)}
    mw.save(cfg.component, module, card, weights_dir=weights_dir)
    log.info("%s: %s", cfg.component, metrics)
    return card
