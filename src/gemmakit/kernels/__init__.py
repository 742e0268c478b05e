"""The C kernels behind one declared boundary.

``csrc/gemmakit_kernels.h`` declares every exported function and struct; :mod:`.abi` builds the ctypes side
from it; :mod:`.loader` compiles, caches, checks (ABI number) and loads the library; :mod:`.fused` wraps the
decode-step kernels for the model. Quantized matmuls (quant/linear.py) and sampling (sampling.py) call the
library through :func:`kernels`.
"""

from .loader import FALLBACK_NOTE, kernel_status, kernels, release_thread_workers

__all__ = ["FALLBACK_NOTE", "kernel_status", "kernels", "release_thread_workers"]
