"""vpure.runtime: detection, VideoPure purification and the lean execution runtime.

Importing this package is cheap: it never imports onnx, TensorRT, Triton or
``vpure.export`` and never initialises CUDA. Submodules are imported on use.
"""

from .versions import package_version as _package_version

__version__ = _package_version("vpure") or "0+unknown"  # "unknown" when run from an uninstalled tree
