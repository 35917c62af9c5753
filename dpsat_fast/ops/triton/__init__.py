"""Triton kernels of dpsat_fast (imported lazily: importing dpsat_fast never imports triton).

Modules: :mod:`.weight_grads` (Linear/Conv per-sample norms, clipped noisy sums with implicit im2col),
:mod:`.affine` (normalization layers), :mod:`.noise` (Philox noise epilogues). They run on CUDA tensors,
and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported).
"""
from ._common import interpreter_on, triton_can_run, triton_installed

__all__ = ["interpreter_on", "triton_can_run", "triton_installed"]
