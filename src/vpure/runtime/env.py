"""The one place that reads environment variables.

| variable | meaning | default |
|---|---|---|
| VPURE_DATA | folder with the real footage used by tests and demos | ``../shared/data`` beside the checkout, if present |
| VPURE_CACHE | cache folder (empty-prompt embeddings, engines built on the fly) | ``~/.cache/vpure`` |
| VPURE_LOG_LEVEL | logging level name | ``WARNING`` |
| VPURE_PROGRESS | ``0`` disables progress bars | bars on a terminal only |
| VPURE_NUM_THREADS | CPU threads for torch and the native kernels | torch's default |
| VPURE_RETAIN_CPU_MEMORY | ``0`` keeps glibc's default malloc thresholds (:mod:`vpure.runtime.memory`) | retained |
| VPURE_ENGINES_KEY | key that signs exported engines and that the runtime verifies them with (:mod:`vpure.runtime.artifacts`) | none: unsigned |
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import ConfigError

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Environment:
    data_dir: Path | None
    cache_dir: Path
    log_level: str
    progress: bool | None  # None: decide by whether stderr is a terminal
    num_threads: int | None
    retain_cpu_memory: bool
    engines_key: bytes | None = None


def _default_data_dir() -> Path | None:
    """``shared/data`` beside the checkout that holds this package (an editable install) or
    the current directory; None for an installed wheel run elsewhere."""
    here = Path(__file__).resolve()
    cwd = Path.cwd().resolve()
    for anc in (*here.parents, cwd, *cwd.parents):
        if (anc / "pyproject.toml").is_file():
            cand = anc.parent / "shared" / "data"
            if cand.is_dir():
                return cand
    return None


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    env = os.environ if environ is None else environ
    data = env.get("VPURE_DATA")
    level = env.get("VPURE_LOG_LEVEL", "WARNING").upper()
    if level not in _LEVELS:
        raise ConfigError(f"VPURE_LOG_LEVEL={level!r} is not one of {', '.join(_LEVELS)}")
    progress_raw = env.get("VPURE_PROGRESS")
    progress = None if progress_raw is None else progress_raw not in ("0", "false", "no", "")
    threads_raw = env.get("VPURE_NUM_THREADS")
    threads = None
    if threads_raw:
        if not threads_raw.isdigit() or int(threads_raw) < 1:
            raise ConfigError(f"VPURE_NUM_THREADS={threads_raw!r} must be a positive integer")
        threads = int(threads_raw)
    return Environment(
        data_dir=Path(data) if data else _default_data_dir(),
        cache_dir=Path(env.get("VPURE_CACHE") or Path.home() / ".cache" / "vpure"),
        log_level=level,
        progress=progress,
        num_threads=threads,
        retain_cpu_memory=env.get("VPURE_RETAIN_CPU_MEMORY", "1").strip().lower() not in ("0", "false", "no", "off"),
        engines_key=env["VPURE_ENGINES_KEY"].encode() if env.get("VPURE_ENGINES_KEY") else None,
    )


@functools.lru_cache(maxsize=1)
def cpuinfo() -> dict[str, str]:
    """The first processor's block of ``/proc/cpuinfo`` (``model name``, ``cpu family``,
    ``model``, ``flags``, ...); empty where it cannot be read. Read once per process."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info
