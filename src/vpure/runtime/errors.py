"""Typed errors. Every message names the offending input and what was expected."""

from __future__ import annotations


class VpureError(Exception):
    """Base class of every error vpure raises on purpose."""


def first_line(e: BaseException) -> str:
    """``"<Type>: <first line of the message>"``: a third-party error in one line of ours."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class ConfigError(VpureError, ValueError):
    """A configuration value or file is invalid (field named in the message)."""


class InputError(VpureError, ValueError):
    """A tensor, clip or file given to vpure has the wrong shape, dtype, range or content."""


class NonFiniteOutput(VpureError, FloatingPointError):
    """A network returned NaN or Inf. Its output cannot be trusted, so the clip must not be
    judged from it (an argmax of NaN is class 0: a gate would read that as "clean").

    ``component`` names the network; ``frames`` holds, for a per-frame output, the indices of
    the non-finite frames of each clip in the batch (empty lists for clips that were fine).
    """

    def __init__(self, component: str, detail: str = "", frames: list[list[int]] | None = None):
        self.component, self.frames = component, frames
        super().__init__(f"{component} returned NaN or Inf{f' {detail}' if detail else ''} "
                         "(a broken engine, a precision overflow or a hostile input)")


class CheckpointError(VpureError):
    """A checkpoint or model folder is missing, malformed or does not fit the architecture."""


class ArtifactError(VpureError):
    """An exported engine or its sidecar is missing, tampered with, or does not match the request."""


class BackendUnavailable(VpureError, RuntimeError):
    """The requested backend, kernel implementation or device is not available here."""


class UnknownComponent(VpureError, KeyError):
    """A component name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return str(self.args[0]) if self.args else ""
