"""vpure.runtime: detection, VideoPure purification and the lean execution runtime.

Importing this package is cheap: it never imports onnx, TensorRT, Triton or
``vpure.export`` and never initialises CUDA. Submodules are imported on use.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("vpure")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
