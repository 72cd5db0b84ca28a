"""Atomic file replacement with a temporary name no other writer shares.

Every file vpure writes for others to read (weights, engines and their sidecars, caches,
configs, evaluation results) is written to a unique temporary file in the target's folder
and renamed over the target: a reader sees the old file or the new one, never half of
one, and two processes writing the same target never write into one temporary file.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; when the block ends without an error
    it becomes ``path`` (readable with ``mode``), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)
