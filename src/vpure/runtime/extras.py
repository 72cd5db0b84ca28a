"""Optional dependencies: a clear error naming the extra to install, not an ImportError.

``pip install vpure`` installs what an edge box runs. The exporter (``vpure[export]``: onnx),
Hugging Face models (``vpure[transformers]``: VideoMAE recognisers, the ModelScope text
encoder that computes the empty-prompt embedding once) and the lab (``vpure[lab]``: Ray
for distributed evaluation, PyWavelets for a baseline) are extras.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BackendUnavailable


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or BackendUnavailable saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(f"{purpose} needs the {module.split('.')[0]} package, which is not installed "
                                 f"({e.msg}): pip install 'vpure[{extra}]'") from None
