"""A deployment: which networks the Shield serves, and from which files.

The ``[models]`` table of a run configuration names them; paths in it are relative to
the TOML file's folder. Two deployments ship: ``miniworld`` (the trained mini-world, the
default) and ``tiny`` (random-init test models). Any other is the user's own files::

    [models]
    labels = "labels.txt"                 # one class name per line
    [models.recognizer]
    arch = "i3d_nl5_r50"                  # i3d_nl5_r50 | i3d_r50 | slowfast_r50 | videomae | miniworld
    weights = "i3d_nl5_resnet50_v1_kinetics400.pth"
    frames = 32
    size = 224
    [models.gate]
    arch = "recognizer_stem"              # or "frame_classifier" with weights = "..."
    [models.diffusion]
    folder = "text-to-video-ms-1.7b"
    [models.flow]
    arch = "raft"                         # raft (princeton-vl or torchvision weights) | dis
    weights = "raft-things.pth"

Checks happen before anything is served: a missing file, an arch its checkpoint does not
fit (the loader's key report), a labels file whose count differs from the recogniser's
classes, a diffusion model whose latent geometry does not fit ``size``. The networks are
loaded one at a time by :func:`load_network`, so a component served from an engine is
never built in torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigBase, check
from .errors import CheckpointError, ConfigError

BUILTIN = ("miniworld", "tiny")
ARCHS = ("i3d_nl5_r50", "i3d_r50", "slowfast_r50", "videomae", "miniworld")
GATES = ("recognizer_stem", "frame_classifier")
FLOW_ARCHS = ("raft", "dis")
# The networks of a deployment (the runner's fields), in load order.
NETWORKS = ("recognizer", "frame_classifier", "unet", "encoder", "decoder", "comdefend", "raft")


@dataclass(frozen=True)
class ArchInfo:
    registry: str  # registry component whose interface and exporter it uses
    frames: int  # T of the checkpoint origin's inference recipe
    size: int
    # "module:function" building the architecture for num_classes classes (None: from the files)
    builder: str | None = None
    doc: str = ""


ARCH_INFO = {
    "i3d_nl5_r50": ArchInfo("i3d_nl5_r50", 32, 224, "vpure.runtime.models.i3d:i3d_nl5_resnet50",
                            "GluonCV-torch I3D-ResNet50 with 5 non-local blocks (.pth, state_dict inside or not)"),
    "i3d_r50": ArchInfo("i3d_nl5_r50", 32, 224, "vpure.runtime.models.i3d:i3d_resnet50",
                        "GluonCV-torch I3D-ResNet50 without non-local blocks"),
    "slowfast_r50": ArchInfo("slowfast_r50", 32, 256, "vpure.runtime.models.slowfast:slowfast_r50",
                             "pytorchvideo SlowFast-R50 8x8 (.pyth with model_state)"),
    "videomae": ArchInfo("videomae", 16, 224, None, "transformers VideoMAE save_pretrained folder"),
    "miniworld": ArchInfo("i3d_nl5_r50", 16, 64, None, "a mini-world I3D recogniser (vpure safetensors)"),
}


@dataclass(frozen=True)
class RecognizerModel(ConfigBase):
    arch: str = "i3d_nl5_r50"
    weights: Path | None = None  # a file, or a folder for videomae
    frames: int | None = None  # clip length T (default: the arch's inference recipe)
    size: int | None = None  # square input side in pixels (default: the arch's)
    mean: tuple[float, float, float] | None = None  # normalisation in [0, 1] units (default: the checkpoint origin's)
    std: tuple[float, float, float] | None = None
    num_classes: int | None = None  # read from the checkpoint; set it to have the count checked

    def validate(self) -> None:
        check(self.arch in ARCHS, f"models.recognizer.arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        check(self.weights is not None, "models.recognizer.weights is required (a checkpoint file or folder)")
        check(self.frames is None or 2 <= self.frames <= 512, f"models.recognizer.frames must be in [2, 512], got {self.frames}")
        check(self.size is None or 8 <= self.size <= 1024, f"models.recognizer.size must be in [8, 1024], got {self.size}")
        check(self.std is None or all(s > 0 for s in self.std), f"models.recognizer.std must be positive, got {self.std}")
        check(self.num_classes is None or self.num_classes >= 1, "models.recognizer.num_classes must be >= 1")


@dataclass(frozen=True)
class GateModel(ConfigBase):
    arch: str = "recognizer_stem"  # the recogniser's 2-D stem (I3D deflated) or a frame classifier
    weights: Path | None = None

    def validate(self) -> None:
        check(self.arch in GATES, f"models.gate.arch {self.arch!r} is not one of {', '.join(GATES)}")
        check(self.arch != "frame_classifier" or self.weights is not None,
              "models.gate.weights is required with arch = \"frame_classifier\"")
        check(self.arch != "recognizer_stem" or self.weights is None,
              "models.gate.weights is for arch = \"frame_classifier\"; recognizer_stem uses the recogniser's")


@dataclass(frozen=True)
class DiffusionModel(ConfigBase):
    folder: Path | None = None  # a diffusers text-to-video folder (unet/, vae/, text_encoder/, tokenizer/)

    def validate(self) -> None:
        check(self.folder is not None, "models.diffusion.folder is required")


@dataclass(frozen=True)
class FlowModel(ConfigBase):
    arch: str = "raft"
    weights: Path | None = None  # princeton-vl or torchvision RAFT state dict
    iters: int = 20  # RAFT refinement iterations (the released code's)

    def validate(self) -> None:
        check(self.arch in FLOW_ARCHS, f"models.flow.arch {self.arch!r} is not one of {', '.join(FLOW_ARCHS)}")
        check(self.arch != "raft" or self.weights is not None, "models.flow.weights is required with arch = \"raft\"")
        check(1 <= self.iters <= 64, f"models.flow.iters must be in [1, 64], got {self.iters}")


@dataclass(frozen=True)
class ComDefendModel(ConfigBase):
    weights: Path | None = None

    def validate(self) -> None:
        check(self.weights is not None, "models.comdefend.weights is required")


@dataclass(frozen=True)
class ModelsConfig(ConfigBase):
    """The deployment of a run: a shipped one by ``name``, or the user's files."""

    name: str = ""  # "miniworld" or "tiny" for a shipped deployment; "" with the tables below
    labels: Path | None = None
    recognizer: RecognizerModel | None = None
    gate: GateModel | None = None
    diffusion: DiffusionModel | None = None
    flow: FlowModel | None = None
    comdefend: ComDefendModel | None = None

    @classmethod
    def from_name(cls, name: str) -> "ModelsConfig":
        check(name in BUILTIN, f"models: {name!r} is not a shipped deployment ({', '.join(BUILTIN)}); "
                               "name a deployment file with --deployment FILE, or give [models] tables")
        return cls(name=name)

    def validate(self) -> None:
        own = [k for k in ("labels", "recognizer", "gate", "diffusion", "flow", "comdefend") if getattr(self, k)]
        if self.name:
            check(self.name in BUILTIN, f"models.name {self.name!r} is not a shipped deployment ({', '.join(BUILTIN)})")
            check(not own, f"models.name = {self.name!r} is a shipped deployment; it takes no {', '.join(own)}")
            return
        check(self.recognizer is not None, "models: a deployment needs [models.recognizer] (or name = \"miniworld\")")
        check(self.diffusion is not None, "models: a deployment needs [models.diffusion] (VideoPure's diffusion "
                                          "model folder)")

    @property
    def builtin(self) -> str | None:
        return self.name or None

    def resolved(self, base: Path) -> "ModelsConfig":
        """Every relative path made relative to ``base`` (the TOML file's folder)."""
        def fix(p: Path) -> Path:
            return p if p.is_absolute() else base / p

        out = self.replace(labels=fix(self.labels)) if self.labels is not None else self
        for name, attr in (("recognizer", "weights"), ("gate", "weights"), ("diffusion", "folder"),
                           ("flow", "weights"), ("comdefend", "weights")):
            table = getattr(out, name)
            if table is not None and getattr(table, attr) is not None:
                out = out.replace(**{name: table.replace(**{attr: fix(getattr(table, attr))})})
        return out


def read_deployment(ref: str | Path) -> ModelsConfig:
    """``--deployment NAME|FILE``: a shipped deployment by name, or the ``[models]`` table of a
    run-configuration TOML (paths resolved against its folder)."""
    from .runner import RunConfig

    if str(ref) in BUILTIN:
        return ModelsConfig.from_name(str(ref))
    path = Path(ref)
    if not path.is_file():
        raise ConfigError(f"--deployment {ref}: neither a shipped deployment ({', '.join(BUILTIN)}) nor a file")
    return RunConfig.load(path).models


# -- checks and metadata -----------------------------------------------------------------

def _exists(path: Path | None, what: str, folder: bool = False) -> Path:
    if path is None or not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if folder and not path.is_dir():
        raise CheckpointError(f"{what} {path} is a file; a folder is expected")
    return path


def read_labels(path: Path) -> tuple[str, ...]:
    _exists(path, "models.labels")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"models.labels {path} cannot be read as UTF-8 text: {e}") from None
    names = tuple(line.strip() for line in lines if line.strip())
    if not names:
        raise ConfigError(f"models.labels {path} holds no class names (one per line)")
    return names


@dataclass
class Plan:
    """What a deployment serves, known before (or without) building any network."""

    models: ModelsConfig
    frames: int
    size: int
    num_classes: int
    class_names: tuple[str, ...] = ()
    recognizer_component: str = "i3d_nl5_r50"
    flow: str = "raft"  # raft | dis
    files: dict[str, list[Path]] = field(default_factory=dict)  # network -> files it is loaded from

    def spec(self, network: str):
        """The registry description of ``network`` at this deployment's shapes."""
        from .presets import profiled_spec

        return profiled_spec(registry_name(network, self.recognizer_component), self.frames, self.size,
                             self.num_classes)

    def has(self, network: str) -> bool:
        """Whether the deployment serves ``network`` (a file deployment may leave out ComDefend,
        or RAFT for DIS flow)."""
        if self.models.builtin:
            return True
        return network in self.files

    def source_id(self, network: str) -> str | None:
        """The identity of the weights ``network`` is built from: its files' hashes and the
        deployment's configuration of it (None for random-init networks, which have no files).
        An engine's sidecar records it, so staleness is judged without building the network."""
        from .artifacts import file_digest

        files = self.files.get(network)
        if not files:
            return None
        m = self.models
        table = {"recognizer": [m.recognizer], "frame_classifier": [m.recognizer, m.gate], "raft": [m.flow],
                 "comdefend": [m.comdefend]}.get(network, [m.diffusion])
        h = hashlib.sha256(json.dumps([network, m.name, [_settings(t) for t in table]], sort_keys=True).encode())
        for f in files:
            h.update(file_digest(f).encode())
        return h.hexdigest()

    def identity(self) -> str:
        """sha256 over what the deployment computes: shapes, classes, flow and each network's
        weights (:meth:`source_id`; folders may move, the identity stays)."""
        h = hashlib.sha256(json.dumps([self.models.name, self.frames, self.size, self.num_classes,
                                       list(self.class_names), self.flow, self.recognizer_component]).encode())
        for net in NETWORKS:
            h.update(f"{net}:{self.source_id(net) or 'random-init'}".encode())
        return h.hexdigest()


def _settings(table: ConfigBase | None) -> dict[str, Any] | None:
    """A table's settings without its paths (which say where, not what)."""
    if table is None:
        return None
    return {k: v for k, v in table.to_dict().items() if k not in ("weights", "folder")}


def registry_name(network: str, recognizer: str = "i3d_nl5_r50") -> str:
    return {"frame_classifier": "frame_classifier", "recognizer": recognizer, "unet": "unet",
            "encoder": "vae_encoder", "decoder": "vae_decoder", "comdefend": "comdefend", "raft": "raft"}[network]


def _recognizer_classes(rm: RecognizerModel) -> int:
    """num_classes from the checkpoint (its classifier's rows), without building the network."""
    if rm.arch == "videomae":
        cfg = _json(_exists(rm.weights, "models.recognizer.weights", folder=True) / "config.json",
                    "models.recognizer.weights")
        n = cfg.get("num_labels") or len(cfg.get("id2label") or {})
        if not n:
            raise CheckpointError(f"{rm.weights}/config.json gives no num_labels/id2label: not a classifier folder")
        return int(n)
    return _classifier_rows(rm)


def _classifier_rows(rm: RecognizerModel) -> int:
    path = _exists(rm.weights, "models.recognizer.weights")
    st = path.stat()
    return _rows(path.resolve(), st.st_size, st.st_mtime_ns, rm.arch)


@functools.lru_cache(maxsize=8)
def _rows(path: Path, size: int, mtime_ns: int, arch: str) -> int:
    """The checkpoint's class count, read once per file version (a run plans its deployment
    for the engines choice and again for the runner)."""
    from .checkpoint import read_state_dict

    state, _ = read_state_dict(path)
    key = "blocks.6.proj.weight" if arch == "slowfast_r50" else "fc.weight"
    if key not in state:
        other = "fc.weight" if key != "fc.weight" else "blocks.6.proj.weight"
        hint = f" (it has {other}: another arch's checkpoint?)" if other in state else ""
        raise CheckpointError(f"models.recognizer.weights {path}: no {key}, not a {arch} checkpoint{hint}")
    return int(state[key].shape[0])


def _json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what}: {path} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} is not a JSON object")
    return data


def plan(models: ModelsConfig, weights: Path | None = None, *, window: int | None = None) -> Plan:
    """The deployment's shapes, classes and files, checked; networks are not built here
    (only a recogniser checkpoint is read for its class count, and the diffusion folder's
    configs for its geometry)."""
    if models.builtin == "miniworld":
        from .miniworld.dataset import CLASSES
        from .miniworld.models import NUM_CLASSES, weights_path

        files = {n: [weights_path({"encoder": "vae", "decoder": "vae"}.get(n, n), weights)] for n in NETWORKS}
        return Plan(models, 16, 64, NUM_CLASSES, tuple(CLASSES), files=files)
    if models.builtin == "tiny":  # its RAFT needs 128 px or more: 64-pixel clips take DIS flow
        return Plan(models, 8, 64, 5, flow="dis")
    rm = models.recognizer
    info = ARCH_INFO[rm.arch]
    frames, size = rm.frames or info.frames, rm.size or info.size
    if rm.arch == "videomae":
        cfg = _json(_exists(rm.weights, "models.recognizer.weights", folder=True) / "config.json",
                    "models.recognizer.weights")
        fixed = (int(cfg.get("num_frames", 16)), int(cfg.get("image_size", 224)))
        if (rm.frames or fixed[0], rm.size or fixed[1]) != fixed:
            raise ConfigError(f"models.recognizer: this VideoMAE takes {fixed[0]} frames at {fixed[1]} px (its "
                              f"position embeddings fix them); frames = {rm.frames}, size = {rm.size} do not fit")
        frames, size = fixed
    num_classes = _recognizer_classes(rm)
    if rm.num_classes is not None and rm.num_classes != num_classes:
        raise ConfigError(f"models.recognizer.num_classes = {rm.num_classes}, but {rm.weights} has {num_classes}")
    names: tuple[str, ...] = ()
    if models.labels is not None:
        names = read_labels(models.labels)
        if len(names) != num_classes:
            raise ConfigError(f"models.labels {models.labels} names {len(names)} classes, but the recogniser "
                              f"{rm.weights} has {num_classes}")
    files: dict[str, list[Path]] = {"recognizer": _files(rm.weights)}
    gate = models.gate or GateModel()
    if gate.arch == "recognizer_stem":
        if rm.arch not in ("i3d_nl5_r50", "i3d_r50", "miniworld"):
            raise ConfigError(f"models.gate.arch = \"recognizer_stem\" deflates an I3D's 2-D stem; a {rm.arch} "
                              "recogniser has none: set arch = \"frame_classifier\" with its weights")
        files["frame_classifier"] = files["recognizer"]
    else:
        files["frame_classifier"] = [_exists(gate.weights, "models.gate.weights")]
    dm = models.diffusion
    root = _exists(dm.folder, "models.diffusion.folder", folder=True)
    _check_geometry(root, size)
    unet_files = _files(root / "unet")
    files["unet"] = unet_files
    files["encoder"] = files["decoder"] = _files(root / "vae")
    flow = models.flow or FlowModel(arch="dis")
    if flow.arch == "raft":
        files["raft"] = [_exists(flow.weights, "models.flow.weights")]
    if models.comdefend is not None:
        files["comdefend"] = [_exists(models.comdefend.weights, "models.comdefend.weights")]
    if window is not None and window > frames and rm.arch == "videomae":
        raise ConfigError(f"window = {window} frames, but the VideoMAE recogniser takes exactly {frames}")
    return Plan(models, frames, size, num_classes, names, info.registry, flow.arch, files)


def _files(path: Path) -> list[Path]:
    """The weight files of a checkpoint file or folder (what an engine's staleness is judged by)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".pth", ".pt", ".pyth"))


def _check_geometry(root: Path, size: int) -> None:
    """The VAE maps size x size frames to latents its UNet takes."""
    vae = _json(root / "vae" / "config.json", "models.diffusion.folder")
    unet = _json(root / "unet" / "config.json", "models.diffusion.folder")
    factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    if size % factor:
        raise ConfigError(f"models.diffusion.folder {root}: its VAE downsamples by {factor}, which does not divide "
                          f"the recogniser's size {size} (latents would not decode back to {size} px); set "
                          f"models.recognizer.size to a multiple of {factor}")
    latent, channels = size // factor, vae.get("latent_channels", 4)
    if unet.get("in_channels", channels) != channels:
        raise ConfigError(f"models.diffusion.folder {root}: the UNet takes {unet.get('in_channels')} latent "
                          f"channels, the VAE gives {channels}")
    if latent < 2 ** (len(unet.get("block_out_channels", (0,) * 4)) - 1):
        raise ConfigError(f"models.diffusion.folder {root}: {size} px gives {latent}x{latent} latents, smaller "
                          f"than the UNet's {len(unet.get('block_out_channels'))} resolution levels take")


# -- loading ----------------------------------------------------------------------------

def load_network(p: Plan, network: str, weights: Path | None = None):
    """One network of the deployment as a torch module in eval mode (None: not deployed,
    such as RAFT under DIS flow or an absent ComDefend)."""
    from . import registry

    builtin = p.models.builtin
    if builtin == "tiny":
        return registry.get(registry_name(network)).build(seed=0)
    if builtin == "miniworld":
        from .miniworld import models as mw

        if network in ("encoder", "decoder"):
            from .models.diffusion import VAEDecoder, VAEEncoder

            return (VAEEncoder if network == "encoder" else VAEDecoder)(mw.load("vae", weights)).eval()
        return mw.load(network, weights)
    m = p.models
    if network == "recognizer":
        return _load_recognizer(m.recognizer)
    if network == "frame_classifier":
        gate = m.gate or GateModel()
        if gate.arch == "frame_classifier":
            from .models.frame_classifier import load_frame_classifier

            return load_frame_classifier(gate.weights)
        from .models.deflate import DeflatedI3DFrameClassifier

        return DeflatedI3DFrameClassifier(_load_recognizer(m.recognizer))
    if network in ("unet", "encoder", "decoder"):
        from .models import modelscope

        loader = {"unet": modelscope.load_unet, "encoder": modelscope.load_vae_encoder,
                  "decoder": modelscope.load_vae_decoder}[network]
        return loader(m.diffusion.folder)
    if network == "raft":
        if p.flow != "raft":
            return None
        from .models.raft import load_raft

        return load_raft(m.flow.weights, iters=m.flow.iters)
    if network == "comdefend":
        if m.comdefend is None:
            return None
        from .models.comdefend import load_comdefend

        return load_comdefend(m.comdefend.weights)
    raise ConfigError(f"no network {network!r}; a deployment has {', '.join(NETWORKS)}")


def _load_recognizer(rm: RecognizerModel):
    import importlib

    import torch

    from .checkpoint import load_into, read_state_dict

    info = ARCH_INFO[rm.arch]
    if rm.arch == "videomae":
        from .models.videomae import load_videomae

        module = load_videomae(rm.weights)
    elif rm.arch == "miniworld":
        from .models.i3d import load_i3d

        module = load_i3d(rm.weights)
    else:
        state, _ = read_state_dict(rm.weights)
        mod, _, fn = info.builder.partition(":")
        module = getattr(importlib.import_module(mod), fn)(_classifier_rows(rm))
        try:
            load_into(module, state, f"models.recognizer.weights {rm.weights}")
        except CheckpointError as e:
            raise CheckpointError(f"models.recognizer.arch = {rm.arch!r} does not fit its checkpoint: {e}") from None
        module.eval()
    if rm.mean is not None or rm.std is not None:
        with torch.no_grad():
            if rm.mean is not None:
                module.mean.copy_(torch.tensor(rm.mean).view_as(module.mean))
            if rm.std is not None:
                module.std.copy_(torch.tensor(rm.std).view_as(module.std))
    return module
