"""Loading a ModelScope-layout diffusers folder from a local path.

Layout: ``unet/`` (UNet3DConditionModel), ``vae/`` (AutoencoderKL), ``text_encoder/`` and
``tokenizer/`` (CLIP), ``scheduler/``. The empty-prompt embedding (spec: constant
conditioning) is computed once with the text encoder and cached as
``vpure_empty_prompt.safetensors`` beside the model (or in the vpure cache folder when
the model folder is read-only); later loads need no text encoder. Nothing is fetched from
a hub: every ``from_pretrained`` call is ``local_files_only``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import atomic
from ..env import read_environment
from ..errors import CheckpointError, first_line
from ..log import get_logger
from .diffusion import EpsUNet, VAEDecoder, VAEEncoder

log = get_logger(__name__)
EMBEDDING_FILE = "vpure_empty_prompt.safetensors"


@dataclass
class DiffusionModel:
    unet: EpsUNet
    vae_encoder: VAEEncoder
    vae_decoder: VAEDecoder


def _folder(root: Path, name: str) -> Path:
    sub = root / name
    if not (sub / "config.json").is_file() and not (sub / "tokenizer_config.json").is_file():
        raise CheckpointError(f"model folder {root} has no usable {name}/ (expected {name}/config.json)")
    return sub


def _check_root(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"model folder {root} does not exist")
    return root


def _pretrained(cls, path: Path, what: str, dtype: torch.dtype):
    try:
        return cls.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any loader failure (a pickle weights_only refuses too) is one line
        raise CheckpointError(f"cannot load the {what} from {path}: {first_line(e)}") from None


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"model dtype must be a floating torch dtype, got {dtype!r}")


def _cache_paths(root: Path) -> list[Path]:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / EMBEDDING_FILE, read_environment().cache_dir / "embeddings" / key / EMBEDDING_FILE]


def compute_empty_prompt_embedding(root: Path) -> torch.Tensor:
    """(1, L, D) float32: the text encoder's last hidden state for the empty prompt."""
    from ..extras import require

    transformers = require("transformers", "transformers", "computing a ModelScope folder's empty-prompt embedding")
    CLIPTextModel, CLIPTokenizer = transformers.CLIPTextModel, transformers.CLIPTokenizer

    root = _check_root(root)
    tok_dir, enc_dir = _folder(root, "tokenizer"), _folder(root, "text_encoder")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load the tokenizer from {tok_dir}: {first_line(e)}") from None
    encoder = _pretrained(CLIPTextModel, enc_dir, "text encoder", torch.float32).eval()
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.inference_mode():
        return encoder(ids)[0].float().clone()


def empty_prompt_embedding(root: str | Path) -> torch.Tensor:
    """The cached embedding, computing and caching it on first use."""
    from safetensors.torch import load_file, save_file

    root = _check_root(Path(root))
    for path in _cache_paths(root):
        if path.is_file():
            try:
                emb = load_file(str(path))["embedding"]
            except Exception as e:  # noqa: BLE001 - a corrupt cache is recomputed, never half-used
                log.warning("cached embedding %s is unreadable (%s); recomputing it", path, e)
                path.unlink(missing_ok=True)
                continue
            if emb.ndim != 3 or emb.shape[0] != 1 or not emb.is_floating_point():
                log.warning("cached embedding %s has shape %s %s, expected (1, L, D) float; recomputing it",
                            path, tuple(emb.shape), emb.dtype)
                path.unlink(missing_ok=True)
                continue
            return emb.float()
    emb = compute_empty_prompt_embedding(root)
    for path in _cache_paths(root):
        try:
            with atomic.replacing(path) as tmp:
                save_file({"embedding": emb.contiguous()}, str(tmp), metadata={"prompt": "", "source": "text_encoder"})
            log.info("cached the empty-prompt embedding at %s", path)
            break
        except OSError as e:
            log.warning("cannot write %s (%s); trying the next cache location", path, e)
    return emb


def load_unet(root: str | Path, dtype: torch.dtype = torch.float32) -> EpsUNet:
    from diffusers import UNet3DConditionModel

    _check_dtype(dtype)
    root = _check_root(Path(root))
    unet = _pretrained(UNet3DConditionModel, _folder(root, "unet"), "UNet3D", dtype)
    emb = empty_prompt_embedding(root)
    if emb.shape[-1] != unet.config.cross_attention_dim:
        raise CheckpointError(f"empty-prompt embedding width {emb.shape[-1]} does not match the UNet's "
                              f"cross_attention_dim {unet.config.cross_attention_dim} in {root}")
    return EpsUNet(unet, emb.to(dtype)).eval()


def _vae(root: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    _check_dtype(dtype)
    return _pretrained(AutoencoderKL, _folder(_check_root(root), "vae"), "VAE", dtype)


def load_vae_encoder(root: str | Path, dtype: torch.dtype = torch.float32) -> VAEEncoder:
    return VAEEncoder(_vae(Path(root), dtype)).eval()


def load_vae_decoder(root: str | Path, dtype: torch.dtype = torch.float32) -> VAEDecoder:
    return VAEDecoder(_vae(Path(root), dtype)).eval()


def load_modelscope(root: str | Path, dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """UNet (as eps_fn with the baked embedding) and VAE encoder/decoder from one folder."""
    root = _check_root(Path(root))
    unet = load_unet(root, dtype)
    vae = _vae(root, dtype)
    if unet.unet.config.in_channels != vae.config.latent_channels:
        raise CheckpointError(f"UNet in_channels {unet.unet.config.in_channels} != VAE latent_channels "
                              f"{vae.config.latent_channels} in {root}")
    return DiffusionModel(unet, VAEEncoder(vae).eval(), VAEDecoder(vae).eval())
