"""Kernel errors. vpure.runtime's typed errors subclass nothing here: kernels stay standalone."""


class KernelError(ValueError):
    """Bad arguments to a kernel (shape, dtype, device); the message names the argument."""


class KernelUnavailable(RuntimeError):
    """The requested implementation cannot run here (not built, no device, no triton)."""
