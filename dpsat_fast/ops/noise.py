"""Counter-based Gaussian noise ops: element ``j`` of the stream for ``(seed, offset)`` is
``tl.randn(seed, offset + j)`` (Philox4x32-10 + Box-Muller, see :mod:`dpsat_fast.ops.reference`), so the
same seed gives the same noise on every backend and no noise tensor is ever stored.

CPU tensors use the C++ kernels of ``dpsat_fast._C`` when it is built; CUDA tensors the Triton kernel
(:mod:`dpsat_fast.ops.triton.noise`), or the CUDA C++ kernels (csrc/cuda) when Triton is not used and the
extension was built with CUDA; anything else the pure-PyTorch reference.
"""
from __future__ import annotations

import functools
import math
import operator

import torch

from . import reference
from ._ext import EXTENSION_AVAILABLE
from .backend import use_triton

NOISE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def add_noise_and_scale_(
    grad: torch.Tensor, seed: int, offset: int, noise_std: float, scale: float
) -> None:
    """In place ``grad <- (grad + noise_std * xi) * scale`` with ``xi[j] = tl.randn(seed, offset + j)``.

    The DP optimizer's last step for one (clipped, summed) gradient tensor: ``noise_std = sigma C``
    and ``scale = 1 / expected_batch_size``. ``j`` runs over ``grad`` in row-major order whatever
    its strides; give each tensor of a step its own ``offset`` range (e.g. the running sum of the
    previous tensors' ``numel``) so that no two tensors share noise.

    Args:
        grad: float32, float64, bfloat16 or float16 tensor, updated in place. The arithmetic is fp32
            (fp64 for float64) with one rounding on the store.
        seed: Philox key, ``0 <= seed < 2**63``.
        offset: first Philox counter, ``offset >= 0`` and ``offset + grad.numel() <= 2**63``.
        noise_std: standard deviation of the added noise, finite and ``>= 0``.
        scale: finite factor applied after the noise.
    """
    op = "add_noise_and_scale_"
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"{op}: grad must be a torch.Tensor, got {type(grad).__name__}")
    if grad.dtype not in NOISE_DTYPES:
        raise TypeError(f"{op}: grad must be float32, float64, bfloat16 or float16, got {grad.dtype}")
    seed, offset = _check_seed_offset(op, seed, offset, grad.numel())
    noise_std, scale = float(noise_std), float(scale)
    if not (math.isfinite(noise_std) and noise_std >= 0.0):
        raise ValueError(f"{op}: noise_std must be finite and >= 0, got {noise_std}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    if grad.dtype != torch.float64 and use_triton(grad):
        from .triton.noise import sum_noise_scale

        target = grad if grad.is_contiguous() else grad.contiguous()
        sum_noise_scale(target.view(1, -1), target.view(-1), seed, offset, noise_std, scale)
        if target is not grad:
            grad.copy_(target)
    elif not _use_compiled(grad.device):
        reference.add_noise_and_scale_ref(grad, seed, offset, noise_std, scale)
    elif grad.is_contiguous():
        torch.ops.dpsat_fast.add_noise_and_scale_(grad, seed, offset, noise_std, scale)
    else:
        contiguous = grad.contiguous()
        torch.ops.dpsat_fast.add_noise_and_scale_(contiguous, seed, offset, noise_std, scale)
        grad.copy_(contiguous)


def philox_normal(
    seed: int, offset: int, numel: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``tl.randn(seed, offset + j)`` for ``j < numel``: a float32 tensor of shape ``(numel,)``."""
    op = "philox_normal"
    numel = _check_numel(op, numel)
    seed, offset = _check_seed_offset(op, seed, offset, numel)
    device = torch.device("cpu" if device is None else device)
    if not _use_compiled(device):
        return reference.philox_normal(seed, offset, numel, device)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    torch.ops.dpsat_fast.philox_normal_(out, seed, offset)
    return out


def philox_uint32(
    seed: int, offset: int, numel: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Philox4x32-10 words of ``tl.randint4x(seed, offset + j)``: int64 ``(4, numel)`` of uint32."""
    op = "philox_uint32"
    numel = _check_numel(op, numel)
    seed, offset = _check_seed_offset(op, seed, offset, numel)
    device = torch.device("cpu" if device is None else device)
    if not _use_compiled(device):
        counters = torch.arange(numel, dtype=torch.int64, device=device) + offset
        return torch.stack(reference.philox_randint4x(seed, counters))
    out = torch.empty(4, numel, dtype=torch.int64, device=device)
    torch.ops.dpsat_fast.philox_uint32_(out, seed, offset)
    return out


def cpu_capability() -> str | None:
    """Instruction set of the compiled CPU kernels ("avx512", "avx2", "default"), None without them.

    ``DPSAT_FAST_CPU_CAPABILITY`` (read once, when the extension loads) caps it; all versions
    produce identical bits.
    """
    return torch.ops.dpsat_fast.cpu_capability() if EXTENSION_AVAILABLE else None


def _use_compiled(device: torch.device) -> bool:
    if not EXTENSION_AVAILABLE:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _has_cuda_kernels())


@functools.lru_cache(maxsize=None)
def _has_cuda_kernels() -> bool:
    """The extension was built with its CUDA kernels (csrc/cuda: a CUDA torch at build time)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("dpsat_fast::add_noise_and_scale_", "CUDA")


def _check_numel(op: str, numel: int) -> int:
    numel = operator.index(numel)
    if numel < 0:
        raise ValueError(f"{op}: numel must be non-negative, got {numel}")
    return numel


def _check_seed_offset(op: str, seed: int, offset: int, numel: int) -> tuple[int, int]:
    seed, offset = operator.index(seed), operator.index(offset)
    if not 0 <= seed < 2**63:
        raise ValueError(f"{op}: seed must be in [0, 2**63), got {seed}")
    if offset < 0:
        raise ValueError(f"{op}: offset must be non-negative, got {offset}")
    if offset + numel > 2**63:
        raise ValueError(f"{op}: offset + numel must not exceed 2**63, got {offset} + {numel}")
    return seed, offset


if EXTENSION_AVAILABLE:

    def _check_fake_seed_offset(op: str, seed: int, offset: int) -> None:
        torch._check(seed >= 0, lambda: f"dpsat_fast::{op}: seed must be non-negative")
        torch._check(offset >= 0, lambda: f"dpsat_fast::{op}: offset must be non-negative")

    @torch.library.register_fake("dpsat_fast::add_noise_and_scale_")
    def _add_noise_and_scale_fake(grad, seed, offset, noise_std, scale):
        op = "add_noise_and_scale_"
        torch._check(
            grad.dtype in NOISE_DTYPES,
            lambda: f"dpsat_fast::{op}: grad must be float32, float64, bfloat16 or float16",
        )
        torch._check(grad.is_contiguous(), lambda: f"dpsat_fast::{op}: grad must be contiguous")
        _check_fake_seed_offset(op, seed, offset)
        return None

    @torch.library.register_fake("dpsat_fast::philox_normal_")
    def _philox_normal_fake(out, seed, offset):
        op = "philox_normal_"
        torch._check(out.dtype == torch.float32, lambda: f"dpsat_fast::{op}: out must be float32")
        torch._check(out.is_contiguous(), lambda: f"dpsat_fast::{op}: out must be contiguous")
        _check_fake_seed_offset(op, seed, offset)
        return None

    @torch.library.register_fake("dpsat_fast::philox_uint32_")
    def _philox_uint32_fake(out, seed, offset):
        op = "philox_uint32_"
        torch._check(out.dtype == torch.int64, lambda: f"dpsat_fast::{op}: out must be int64")
        torch._check(
            out.dim() == 2 and out.size(0) == 4,
            lambda: f"dpsat_fast::{op}: out must have shape (4, n)",
        )
        torch._check(out.is_contiguous(), lambda: f"dpsat_fast::{op}: out must be contiguous")
        _check_fake_seed_offset(op, seed, offset)
        return None
