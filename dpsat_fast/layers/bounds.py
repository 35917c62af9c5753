"""Certified clipping norms for layers whose per-example gradient is never materialized.

A Linear or convolution weight gradient ``G_i = g_iᵀ a_i`` reaches the release through two different
computations: its norm (ghost route ``Σ_{t,s}(a_t·a_s)(g_t·g_s)`` or instantiate route ``‖fl(g_iᵀa_i)‖²``)
and the clipped sum ``fl(Σ_i c_i g_iᵀ a_i)``. Both round, and neither rounding is small relative to
``‖G_i‖`` when the positions of one example cancel (two identical positions with ``g_1 ≈ v``,
``g_2 ≈ −v + δ``): float32 then reports a norm near 0 for a gradient of norm 100·C, or, with an exact norm,
the clipped sum's rounding of the huge terms ``c_i a_t g_tᵀ`` is itself huge. Both are bounded by
``S_i = Σ_t ‖a_{i,t}‖·‖g_{i,t}‖`` (``sqrt(Σ_k S_{i,k}²)`` over the groups of a convolution), which no
cancellation can shrink. With the a-priori constants of :mod:`dpsat_fast.ops.error_bounds`,

    N̂_i = sqrt(max(ĥ_i, 0)·(1 + ρ) + α·S_i²) + (β + κ)·S_i        (ghost: α; instantiate: β, ρ)

is at least ``‖G_i‖ + κ·S_i``: the norm of the exact gradient plus everything the clipped sum's rounding
can add for example i. Clipping with ``c_i = min(1, C/N̂_i)`` therefore bounds what example i moves the
release by ``C``, up to the rounding of the other examples' terms (which the adversary does not control
and which is ``κ·Σ_{j≠i} c_j S_j``; see docs/privacy.md).

In ordinary training ``S_i ≈ √T·‖G_i‖`` and the bound exceeds ``sqrt(ĥ_i)`` by well under 1 %. When it
exceeds it by more than :data:`FALLBACK_WIDTH` (cancellation), the example is recomputed exactly: its
per-example gradient in float64 (exact products, a sum whose error is ~1e-16·S_i), whose norm is then its
clipping norm, and whose clipped contribution is added from that float64 gradient instead of the fused
sum (so no ``κ·S_i`` term either). :data:`fallback_counts` counts such examples per layer.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: relative width ``N̂_i / sqrt(ĥ_i) − 1`` above which an example's norm is recomputed exactly. Ordinary
#: training stays far below it: under 0.5 % on CPU for ResNet-18 layers, and under 4 % in the (conservative)
#: bound for float32 Triton kernels on tensor cores
FALLBACK_WIDTH = 1.0 / 8

#: examples recomputed exactly, per layer name (diagnostics; ordinary training leaves it empty)
fallback_counts: Counter = Counter()

_CHUNK_ELEMENTS = 1 << 22
# float64 sums of squares of float32/16-bit data, their square roots and the final sums err by far less than
# this (relative): S is rounded up by it so that it stays an upper bound of the exact Σ_t ‖a_t‖·‖g_t‖
_S_ROUND_UP = 1.0 + 2.0 ** -40


def _row_sq_norms64(t: Tensor, dims: Sequence[int]) -> Tensor:
    """``Σ t²`` over ``dims`` in float64 (exact squares), batch-chunked to bound the float64 temporaries."""
    B = t.shape[0]
    per = max(1, t[0].numel()) if B else 1
    step = max(1, _CHUNK_ELEMENTS // per)
    parts = [t[s:s + step].double().pow(2).sum(dims) for s in range(0, B, step)]
    if not parts:
        shape = [0] + [n for d, n in enumerate(t.shape[1:], 1) if d not in dims]
        return torch.zeros(shape, dtype=torch.float64, device=t.device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def linear_position_products(a: Tensor, g: Tensor) -> Tensor:
    """``S_i = Σ_t ‖a_{i,t}‖·‖g_{i,t}‖`` (float64, rounded up) for a [B, T, D], g [B, T, P] -> [B]."""
    na = _row_sq_norms64(a, (2,))  # [B, T]
    ng = _row_sq_norms64(g, (2,))
    return (na * ng).sqrt().sum(1) * _S_ROUND_UP


def _group_sq64(x: Tensor, groups: int) -> Tensor:
    """``Σ_{c∈k} x_c²`` per group k: x [B, C, *S] -> [B, G, *S] in float64 (batch-chunked)."""
    B, C = x.shape[:2]
    step = max(1, _CHUNK_ELEMENTS // max(1, x[0].numel())) if B else 1
    parts = [x[s:s + step].double().pow(2).view(-1, groups, C // groups, *x.shape[2:]).sum(2)
             for s in range(0, B, step)]
    if not parts:
        return torch.zeros((0, groups) + tuple(x.shape[2:]), dtype=torch.float64, device=x.device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def conv_position_products(xs: Sequence[Tensor], gs: Sequence[Tensor], weight_shape: Sequence[int],
                           stride, padding, dilation, groups: int) -> Tensor:
    """``S_i = sqrt(Σ_k S_{i,k}²)``, ``S_{i,k} = Σ_{uses} Σ_t ‖patch_{t,k}‖·‖g_{t,k}‖`` (float64, rounded up) of
    a convolution with one (input, output gradient) pair per use: the patch norms are window sums of
    ``Σ_{c∈k} x_c²`` over the kernel footprint (stride, padding, dilation), in float64."""
    n = len(weight_shape) - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    total = None
    for x, g in zip(xs, gs):
        B = x.shape[0]
        ones = torch.ones((groups, 1) + tuple(weight_shape[2:]), dtype=torch.float64, device=x.device)
        patch = conv(_group_sq64(x, groups), ones, None, tuple(stride), tuple(padding), tuple(dilation), groups)
        patch = patch.clamp_min(0).flatten(2)  # [B, G, T]
        gg = _row_sq_norms64(g.reshape(B, groups, g.shape[1] // groups, math.prod(g.shape[2:])), (2,))  # [B, G, T]
        s_k = (patch * gg).sqrt().sum(2)  # [B, G]
        total = s_k if total is None else total + s_k
    return total.pow(2).sum(1).sqrt() * _S_ROUND_UP


def certified_norms(sq_hat: Tensor, S: Tensor, *, alpha: float = 0.0, beta: float = 0.0, rho: float = 0.0,
                    kappa: float = 0.0) -> Tuple[Tensor, Tensor]:
    """``(N̂², loose)``: the certified squared clipping norms (float64) and the mask of examples whose
    certificate is wider than :data:`FALLBACK_WIDTH` (to be recomputed exactly)."""
    h = sq_hat.double().clamp_min(0)
    S = S.double()
    norm = (h * (1.0 + rho) + alpha * S * S).sqrt() + (beta + kappa) * S
    loose = (S > 0) & (norm > (1.0 + FALLBACK_WIDTH) * h.sqrt())
    return norm * norm, loose


def exact_sq_norms(pe64: Tensor, positions: int, S: Tensor) -> Tensor:
    """Certified squared norms of float64 per-example gradients [n, ...] computed from float64 inputs
    (products exact, sums of ``positions`` terms err by ≤ γ⁶⁴·S): ``(‖pe‖·(1 + ε) + γ⁶⁴_T·S)²``."""
    n = max(1, pe64[0].numel()) if pe64.shape[0] else 1
    u = 2.0 ** -53
    norm = pe64.flatten(1).pow(2).sum(1).sqrt() * (1.0 + (n + 4) * u)
    gamma_t = (positions + 2) * u / (1.0 - (positions + 2) * u)
    return (norm + gamma_t * S.double()) ** 2


def record_fallback(name: str, count: int) -> None:
    if count:
        fallback_counts[name] += int(count)


def scale_without(scale: Tensor, idx: Tensor) -> Tensor:
    """``scale`` with the examples ``idx`` set to 0 (they are summed separately)."""
    out = scale.clone()
    out[idx] = 0
    return out


__all__ = ["FALLBACK_WIDTH", "fallback_counts", "linear_position_products", "conv_position_products",
           "certified_norms", "exact_sq_norms", "record_fallback", "scale_without"]
