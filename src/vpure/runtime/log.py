"""Logging set-up and progress bars (tqdm), both honouring the environment."""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, TypeVar

from .env import read_environment

T = TypeVar("T")
_ROOT = "vpure"


def get_logger(name: str) -> logging.Logger:
    """Logger under the ``vpure`` hierarchy (``vpure.runtime.cli`` -> ``vpure.runtime.cli``)."""
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def configure_logging(level: str | int | None = None) -> None:
    """Attach one stderr handler to the ``vpure`` logger (idempotent)."""
    if level is None:
        level = read_environment().log_level
    root = logging.getLogger(_ROOT)
    root.setLevel(level if isinstance(level, int) else level.upper())
    if not any(getattr(h, "_vpure", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._vpure = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", enable: bool | None = None) -> Iterator[T]:
    """Wrap an iterable in a tqdm bar on a terminal; a plain iterator otherwise."""
    if enable is None:
        enable = read_environment().progress
        if enable is None:
            enable = sys.stderr.isatty()
    if not enable:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))
