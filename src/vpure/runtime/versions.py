"""Installed package versions, read from distribution metadata (never by importing)."""

from __future__ import annotations

import importlib.metadata as md


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None if it is not installed."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
