"""Whether a per-sample op runs its Triton kernels.

``auto`` (default): Triton for CUDA tensors; CPU tensors run the C++ kernels of the extension (pure
PyTorch without it). ``triton``: Triton for every supported tensor, CPU ones included (needs the
interpreter, ``TRITON_INTERPRET=1``; this is how the Triton path is tested without a GPU). ``torch``: never
Triton (C++ on CPU, pure PyTorch on CUDA). Set with :func:`set_kernel_backend` or the
``DPSAT_FAST_KERNELS`` environment variable. fp64 inputs and Conv3d never take Triton.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .triton._common import interpreter_on, triton_can_run, triton_installed

BACKENDS = ("auto", "triton", "torch")
_backend: Optional[str] = None


def kernel_backend() -> str:
    b = _backend if _backend is not None else os.environ.get("DPSAT_FAST_KERNELS", "auto")
    if b not in BACKENDS:
        raise ValueError(f"DPSAT_FAST_KERNELS must be one of {BACKENDS}, got {b!r}")
    return b


def set_kernel_backend(backend: Optional[str]) -> None:
    """``"auto"``, ``"triton"``, ``"torch"``, or None to follow ``DPSAT_FAST_KERNELS`` again."""
    global _backend
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _backend = backend


@contextlib.contextmanager
def kernel_backend_as(backend: str):
    global _backend
    previous = _backend
    set_kernel_backend(backend)
    try:
        yield
    finally:
        _backend = previous


def use_triton(t: torch.Tensor) -> bool:
    """Whether ops on ``t`` run the Triton kernels (fp32/fp16/bf16 only)."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    backend = kernel_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_can_run(t.device):
            why = ("triton is not installed" if not triton_installed() else
                   "CPU tensors need the interpreter: set TRITON_INTERPRET=1 before importing triton"
                   if t.device.type == "cpu" and not interpreter_on() else f"Triton does not run on {t.device}")
            raise RuntimeError(f"dpsat_fast kernel backend 'triton' cannot run on {t.device}: {why}")
        return True
    return t.device.type == "cuda" and triton_can_run(t.device)
