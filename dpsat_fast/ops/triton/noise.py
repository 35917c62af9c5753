"""Triton kernels that add counter-based Gaussian noise: ``ξ[j] = tl.randn(seed, offset + j)``.

* :func:`_sum_noise_scale_kernel`: ``out = (Σ_s src[s] + σ·ξ) · scale`` over flat tensors: the DP
  optimizer's noise step (one source, in place) and the reduction of split clipped sums. The sources are
  added in fp64 and the sum rounded to fp32 once, before the noise (one source: exactly ``src + σ·ξ``).
* :func:`_per_example_clipped_sum_kernel`: ``Σ_i c_i G_i + σ·ξ`` for small materialized per-example
  gradients ``G`` [B, K] (norm layers), written once.

The stream is the one :mod:`dpsat_fast.ops.reference` defines (Philox4x32-10, Box-Muller), so the
same seed gives the same noise as the C++ kernels and the pure-PyTorch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreter_on

# launch tiles (num_warps/num_stages: Triton's defaults); bench/triton_aot.py compiles the GPU ones.
# The interpreter pays ~20 ms per program whatever its size: few large programs there.
_GPU_BLOCK = 1024
_INTERPRETER_BLOCK = 1 << 14
_BLOCK = _GPU_BLOCK if not interpreter_on() else _INTERPRETER_BLOCK
_PER_EXAMPLE_GPU_BLOCKS = dict(BLOCK_B=16, BLOCK_K=128)
_PER_EXAMPLE_INTERPRETER_BLOCKS = dict(BLOCK_B=16, BLOCK_K=32)


@triton.jit
def _sum_noise_scale_kernel(src_ptr, out_ptr, n, n_src, seed, offset, noise_std, scale,
                            HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    total = tl.zeros([BLOCK], dtype=tl.float64)
    src = src_ptr + idx
    for _ in range(0, n_src):
        total += tl.load(src, mask=mask, other=0.0).to(tl.float64)
        src += n  # 64-bit pointer steps: s·n may exceed 2**31 where n does not
    acc = total.to(tl.float32)
    if HAS_NOISE:
        acc += noise_std * tl.randn(seed, offset + idx)
    tl.store(out_ptr + idx, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _per_example_clipped_sum_kernel(grads_ptr, scale_ptr, out_ptr, B, K, s_b, s_k, seed, offset, noise_std,
                                    HAS_NOISE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    kk = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    k_mask = kk < K
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        b_mask = b < B
        c = tl.load(scale_ptr + b, mask=b_mask, other=0.0)  # [BLOCK_B]
        grads = tl.load(grads_ptr + b[:, None] * s_b + kk[None, :] * s_k,
                        mask=b_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_K]
        acc += tl.sum(grads * c[:, None], 0)
    if HAS_NOISE:
        acc += noise_std * tl.randn(seed, offset + kk)
    tl.store(out_ptr + kk, acc, mask=k_mask)


def sum_noise_scale(src: torch.Tensor, out: torch.Tensor, seed: int, offset: int, noise_std: float,
                    scale: float) -> None:
    """``out = (src.sum(0) + noise_std·ξ) · scale`` with src [S, n] and out [n], both contiguous; out may
    alias src (S = 1, in place)."""
    n_src, n = src.shape
    if n == 0:
        return
    grid = (cdiv(n, _BLOCK),)
    _sum_noise_scale_kernel[grid](src, out, n, n_src, seed, offset, float(noise_std), float(scale),
                                  HAS_NOISE=noise_std != 0.0, BLOCK=_BLOCK)


def per_example_clipped_sum(grads: torch.Tensor, scale: torch.Tensor, seed: int, offset: int,
                            noise_std: float) -> torch.Tensor:
    """``Σ_i scale_i grads_i + noise_std·ξ``: grads [B, K] -> fp32 [K]."""
    B, K = grads.shape
    out = torch.empty(K, dtype=torch.float32, device=grads.device)
    if K == 0:
        return out
    scale = scale.to(device=grads.device, dtype=torch.float32).contiguous()
    blocks = _PER_EXAMPLE_INTERPRETER_BLOCKS if interpreter_on() else _PER_EXAMPLE_GPU_BLOCKS
    _per_example_clipped_sum_kernel[(cdiv(K, blocks["BLOCK_K"]),)](
        grads, scale, out, B, K, grads.stride(0), grads.stride(1), seed, offset, float(noise_std),
        HAS_NOISE=noise_std != 0.0, **blocks)
    return out
