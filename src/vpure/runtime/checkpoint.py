"""Reading and writing checkpoints: safetensors first, ``.pth`` through
``torch.load(weights_only=True)`` (never arbitrary code), clear errors naming missing and
unexpected keys and shape mismatches. Architecture arguments travel in the safetensors
metadata as JSON under ``vpure_config``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .errors import CheckpointError

_WRAPPERS = ("state_dict", "model", "model_state", "net")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, architecture config) from a .safetensors or .pth/.pt file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the weights file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {e}") from None
        try:
            config = json.loads(meta.get("vpure_config", "{}"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"checkpoint {path}: its vpure_config metadata is not JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"checkpoint {path}: its vpure_config metadata is not a JSON object")
        return state, config
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read with weights_only=True: {str(e).splitlines()[0]}") from None
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def construct(cls: type, kwargs: dict[str, Any], path: str | Path):
    """``cls(**kwargs)`` for an architecture read from a checkpoint: a config that does not
    build the class (tampered metadata, another model's file) is a CheckpointError naming it."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its architecture config does not build a {cls.__name__}: {e}") from None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str = "checkpoint") -> torch.nn.Module:
    """Strict load; raises CheckpointError listing every mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:5])}")
        raise CheckpointError(f"{where} does not fit {type(module).__name__}: " + " | ".join(parts))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return module


def save_safetensors(module: torch.nn.Module, path: str | Path, config: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic.replacing(path) as tmp:
        save_file(state, str(tmp), metadata={"vpure_config": json.dumps(config or {})})
    return path
