"""What every Triton module here shares: when Triton can run, and the per-launch constants.

Triton runs kernels on CUDA tensors, and on CPU tensors when the interpreter is on
(``TRITON_INTERPRET=1`` set before ``triton`` is first imported). Nothing here queries CUDA at import.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    """True when Triton kernels run in the CPU interpreter (read from the environment each call)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(device: torch.device) -> bool:
    """Triton can launch on tensors of ``device``: CUDA with triton installed, or CPU under the interpreter."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return not interpreter_on()
    return device.type == "cpu" and interpreter_on()


def dot_precision(device: torch.device) -> str:
    """``tl.dot`` precision for fp32 operands: three-pass TF32 on GPUs (≈ fp32 accuracy; plain TF32 would
    perturb norms by ~1e-3 and with them the clipping bound), exact fp32 in the interpreter."""
    return "tf32x3" if device.type == "cuda" else "ieee"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
