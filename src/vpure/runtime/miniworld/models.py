"""The mini-world's architectures, and its shipped weights with their model cards.

Each component is a small member of the family the product deploys: an SD-contract VAE
(AutoencoderKL, 4 latent channels, 8x), a diffusers ``UNet3DConditionModel`` predicting
epsilon on the scaled-linear 1000-step schedule, an I3D-family 3D ResNet recogniser, the
ResNet-style frame classifier, ComDefend and RAFT-small (3 correlation levels for 64-pixel
frames). Weights live beside this module in ``weights/<component>.safetensors``; the
architecture and the model card (training command, data seed, metrics) travel in the
safetensors metadata, and ``weights/<component>.md`` is the human-readable card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import atomic
from ..errors import CheckpointError, first_line
from ..log import get_logger

log = get_logger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
COMPONENTS = ("vae", "unet", "recognizer", "frame_classifier", "comdefend", "raft")
NUM_CLASSES = 5

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(32, 64, 96, 96), layers_per_block=1, norm_num_groups=16)
UNET = dict(sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
            block_out_channels=(48, 96, 96), layers_per_block=1, norm_num_groups=16,
            cross_attention_dim=48, attention_head_dim=8)
PROMPT_TOKENS = 4
FRAME_CLASSIFIER = dict(num_classes=NUM_CLASSES, widths=(16, 32, 64), depths=(1, 1, 1), stem_width=16,
                        stem_pool=False)
# The frame classifier inflated (I3D's bootstrap from a trained 2D network): same widths and
# depths in basic blocks, every block's first conv 3x3x3, one non-local block after stage 2.
RECOGNIZER = dict(num_classes=NUM_CLASSES, block="basic", blocks=(1, 1, 1), inflate=((1,), (1,), (1,)),
                  nonlocal_=((0,), (1,), (0,)), base_width=16, dropout=0.2, stem_pool=False)
COMDEFEND = dict(com_widths=(16, 32, 32, 16), rec_widths=(16, 32, 32, 16))
RAFT = dict(small=True, iters=8, corr_levels=3, stride=4)  # 64-pixel frames: a 16x16 grid


def build(component: str, config: dict[str, Any] | None = None) -> torch.nn.Module:
    """A fresh (random-init) module of ``component`` with the mini-world architecture
    (or ``config``, as recorded in a weights file)."""
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**(config or VAE))
    if component == "unet":
        from diffusers import UNet3DConditionModel

        from ..models.diffusion import EpsUNet

        cfg = dict(config or UNET)
        tokens = int(cfg.pop("prompt_tokens", PROMPT_TOKENS))
        return EpsUNet(UNet3DConditionModel(**cfg), torch.zeros(1, tokens, cfg["cross_attention_dim"]))
    if component == "recognizer":
        from ..models.i3d import I3DResNet

        cfg = dict(config or RECOGNIZER)
        cfg["inflate"] = tuple(tuple(x) for x in cfg["inflate"])
        cfg["nonlocal_"] = tuple(tuple(x) for x in cfg["nonlocal_"])
        return I3DResNet(**cfg)
    if component == "frame_classifier":
        from ..models.frame_classifier import FrameClassifier

        return FrameClassifier(**(config or FRAME_CLASSIFIER))
    if component == "comdefend":
        from ..models.comdefend import ComDefend

        return ComDefend(**(config or COMDEFEND))
    if component == "raft":
        from ..models.raft import RAFT as RAFTModel

        return RAFTModel(**(config or RAFT))
    raise CheckpointError(f"no mini-world component {component!r}; known: {', '.join(COMPONENTS)}")


def default_config(component: str) -> dict[str, Any]:
    cfg = {"vae": VAE, "unet": {**UNET, "prompt_tokens": PROMPT_TOKENS}, "recognizer": RECOGNIZER,
           "frame_classifier": FRAME_CLASSIFIER, "comdefend": COMDEFEND, "raft": RAFT}[component]
    return json.loads(json.dumps(cfg))  # plain lists, as it is stored


SUMMARIES = {
    "vae": "AutoencoderKL with SD's latent contract: 4 latent channels, 8x downsampling, latents scaled "
           "by the measured scaling factor to unit variance.",
    "unet": "diffusers UNet3DConditionModel predicting epsilon on the scaled-linear 1000-step schedule, "
            "conditioned on a fixed (baked) prompt embedding; trained on the VAE's latents.",
    "recognizer": "I3D-family 3D ResNet (basic blocks, one non-local block) classifying 16-frame clips into "
                  "the 5 silhouette classes; inflated from the trained frame classifier, then trained on clips.",
    "frame_classifier": "ResNet-style per-frame classifier for the detection gate's exception index.",
    "comdefend": "ComDefend (ComCNN + RecCNN), the light spatial defence for dense attacks.",
    "raft": "RAFT-small with 3 correlation levels and stride 4 (64-pixel frames: a 16x16 grid), "
            "8 iterations, trained on the dataset's exact flows with RAFT's sequence loss.",
}


def weights_path(component: str, weights_dir: str | Path | None = None) -> Path:
    return Path(weights_dir or WEIGHTS_DIR) / f"{component}.safetensors"


def save(component: str, module: torch.nn.Module, card: dict[str, Any], config: dict[str, Any] | None = None,
         weights_dir: str | Path | None = None) -> Path:
    """Write ``<component>.safetensors`` (architecture and card in its metadata) and ``.md``."""
    from safetensors.torch import save_file

    path = weights_path(component, weights_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: some layouts alias modules under two names (I3D's GluonCV ``head``), which
    # safetensors refuses to store as shared memory.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    if component == "vae":  # the measured scaling factor is part of the latent contract
        config = {**(config or default_config("vae")), "scaling_factor": float(module.config.scaling_factor)}
    meta = {"vpure_config": json.dumps(config or default_config(component)), "vpure_card": json.dumps(card)}
    with atomic.replacing(path) as tmp:  # package data: readable by whoever installs it
        save_file(state, str(tmp), metadata=meta)
    atomic.write_text(path.with_suffix(".md"), card_markdown(component, card))
    return path


def refresh_card(component: str, changes: dict[str, Any], weights_dir: str | Path | None = None) -> dict[str, Any]:
    """Rewrite a weights file's card (same tensors, same architecture) with ``changes`` merged in."""
    from ..checkpoint import read_state_dict

    card = read_card(component, weights_dir) | changes
    _, cfg = read_state_dict(weights_path(component, weights_dir))
    save(component, load(component, weights_dir), card, config=cfg or None, weights_dir=weights_dir)
    return card


def card_markdown(component: str, card: dict[str, Any]) -> str:
    lines = [f"# mini-world {component}", "", SUMMARIES.get(component, ""), "",
             f"- training command: `{card.get('command', '?')}`",
             f"- data: mini-world seed {card.get('data_seed')}, {card.get('train_clips')} training clips "
             f"({card.get('frames')} frames at {card.get('size')}x{card.get('size')})",
             f"- steps: {card.get('steps')}, batch {card.get('batch')}, seed {card.get('seed')}, "
             f"{card.get('precision', 'fp32')} forward passes, "
             f"wall time {card.get('train_seconds', 0):.0f} s on {card.get('machine', '?')}",
             f"- parameters: {card.get('parameters')}"]
    prev = card.get("resumed_from")
    while prev:  # a resumed run: the runs before it, most recent first
        lines.append(f"- resumed from weights sha256 {prev.get('sha256', '?')[:16]}, trained by "
                     f"`{prev.get('command', '?')}` ({prev.get('steps')} steps; metrics {prev.get('metrics')})")
        prev = prev.get("resumed_from")
    lines += ["", "## Metrics (test split)", ""]
    lines += [f"- {k}: {v}" for k, v in card.get("metrics", {}).items()]
    return "\n".join(lines) + "\n"


def read_card(component: str, weights_dir: str | Path | None = None) -> dict[str, Any]:
    from safetensors import safe_open

    path = weights_path(component, weights_dir)
    if not path.is_file():
        raise CheckpointError(f"mini-world weights {path} are missing; train them with `vpure train {component}`")
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("vpure_card", "{}"))


def load(component: str, weights_dir: str | Path | None = None) -> torch.nn.Module:
    """The trained module (eval mode) from the shipped (or a given) weights folder."""
    from ..checkpoint import load_into, read_state_dict

    path = weights_path(component, weights_dir)
    if not path.is_file():
        raise CheckpointError(f"mini-world weights {path} are missing; train them with `vpure train {component}`")
    state, cfg = read_state_dict(path)
    try:
        module = build(component, cfg or None)
    except (TypeError, ValueError, KeyError) as e:  # tampered metadata, another model's file
        raise CheckpointError(f"{path}: its architecture config does not build the mini-world {component}: "
                              f"{first_line(e)}") from None
    return load_into(module, state, str(path)).eval()


@dataclass
class MiniWorld:
    """Every trained network, wrapped to the product's call signatures."""

    unet: torch.nn.Module  # EpsUNet: (latents, timestep) -> eps
    encoder: torch.nn.Module  # VAEEncoder: frames in [0, 1] -> scaled latents
    decoder: torch.nn.Module  # VAEDecoder
    recognizer: torch.nn.Module  # I3D: clip -> logits
    frame_classifier: torch.nn.Module  # frames -> per-frame logits
    comdefend: torch.nn.Module
    raft: torch.nn.Module


def load_world(weights_dir: str | Path | None = None, prepare: bool = True) -> MiniWorld:
    """The six shipped (or ``weights_dir``'s) networks in eval mode; with ``prepare``, the
    recogniser, frame classifier and VAE prepared for CPU inference as ``vpure run`` serves
    them eagerly (:mod:`vpure.runtime.models.inference`: the recogniser's 3-D convolutions
    through oneDNN, the frame classifier's weights channels-last, both through fused oneDNN
    convolutions without autograd, the decoder upsampling by sub-pixel convolutions, the
    VAE's group norms and SiLUs in the native kernel). ``vpure run`` itself loads them
    unprepared and prepares only the components it serves eagerly (a compiled or engine-
    served one keeps diffusers' layers). State dicts and gradients are unchanged."""
    from ..models.diffusion import VAEDecoder, VAEEncoder
    from ..models.inference import prepare_decoder, prepare_encoder, prepare_frame_classifier, prepare_recognizer

    vae = load("vae", weights_dir)
    recognizer = load("recognizer", weights_dir)
    frame_classifier = load("frame_classifier", weights_dir)
    if prepare:
        prepare_encoder(vae.encoder)
        prepare_decoder(vae.decoder)
        prepare_recognizer(recognizer)
        prepare_frame_classifier(frame_classifier)
    return MiniWorld(load("unet", weights_dir), VAEEncoder(vae).eval(), VAEDecoder(vae).eval(),
                     recognizer, frame_classifier, load("comdefend", weights_dir), load("raft", weights_dir))
