"""The engines manifest: ``engines.json`` in an engines folder says which deployment its
artefacts were exported for, and which artefact serves each network at each precision.

``vpure export --deployment D`` writes it (merging with what the folder already holds);
``vpure run --engines DIR --precision P`` reads it to choose every network's artefact, so
swapping fp32 for fp16 or int8 is that one flag. The artefacts' own sidecars still carry
the checks (request, file hash, weights, signature); the manifest only names them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import atomic
from .errors import ArtifactError

MANIFEST = "engines.json"
MANIFEST_VERSION = 1


def path(engines_dir: str | Path) -> Path:
    return Path(engines_dir) / MANIFEST


def read(engines_dir: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none (artefacts exported one by one)."""
    p = path(engines_dir)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"engines manifest {p} is not readable JSON: {e}") from None
    if not isinstance(data, dict) or data.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(f"engines manifest {p} has version {data.get('manifest_version') if isinstance(data, dict) else '?'}, "
                            f"this vpure reads {MANIFEST_VERSION}; re-export the deployment")
    return data


def record(engines_dir: str | Path, deployment: dict[str, Any], network: str, spec, precision: str,
           artefact: Path, calibration: dict[str, Any] | None) -> None:
    """Add (or replace) ``network``'s ``precision`` artefact in the folder's manifest.
    Artefacts of another deployment are dropped from it (their files stay)."""
    data = read(engines_dir)
    if data is None or data.get("deployment", {}).get("id") != deployment["id"]:
        data = {"manifest_version": MANIFEST_VERSION, "deployment": deployment, "networks": {}}
    entry = data["networks"].setdefault(network, {})
    entry["component"] = spec.name
    entry["inputs"] = [[t.name, list(t.shape), t.dtype] for t in spec.inputs]
    entry["outputs"] = [[t.name, list(t.shape), t.dtype] for t in spec.outputs]
    entry["profile"] = {k: list(v) for k, v in spec.profile.items()}
    entry.setdefault("artefacts", {})[precision] = {"file": Path(artefact).name, "calibration": calibration}
    atomic.write_text(path(engines_dir), json.dumps(data, indent=2, sort_keys=True))


def drop(engines_dir: str | Path, network: str, precision: str) -> None:
    """Remove an artefact from the manifest (an export that was refused after it was written)."""
    data = read(engines_dir)
    if data and precision in data.get("networks", {}).get(network, {}).get("artefacts", {}):
        del data["networks"][network]["artefacts"][precision]
        atomic.write_text(path(engines_dir), json.dumps(data, indent=2, sort_keys=True))
