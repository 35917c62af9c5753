"""Pure-PyTorch implementations of the per-sample gradient ops: the CPU path, and the fallback on other
devices (fp64 inputs, Conv3d, Triton unavailable).

Weight gradients of the form G_i = g_iᵀ a_i.

Every layer with a weight matrix (Linear, each group of a Conv, attention projections) has a per-example
weight gradient ``G_i = g_iᵀ a_i`` with ``a_i ∈ R^{T×D}`` the layer input at T positions and
``g_i ∈ R^{T×P}`` the gradient of the layer output (docs/algorithms.md §3). Two exact ways to get ``‖G_i‖²_F``:

* ghost:        ``‖G_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩_F``      cost ≈ 2T²(D+P), memory T² per example;
* instantiate:  form ``G_i`` and sum its squares         cost ≈ 2TDP,     memory DP per example.

``T = 1`` collapses the ghost route to ``‖a_i‖²·‖g_i‖²``. :func:`choose_route` picks the cheaper one.
The clipped sum ``Σ_i s_i G_i = (diag(s) g)ᵀ a`` is one GEMM with a per-row scale.

Convolutions: for group k the layer is a matrix product on unfolded patches, ``a_i ∈ R^{T×D_k}`` with
``D_k = (C_in/groups)·∏kernel``; every group is counted. The conv instantiate route and the conv clipped
sum never unfold: both are convolution weight-gradients (the former with the batch folded into the
groups, the latter of the per-example-scaled output gradient).

Accumulation (the error model of :mod:`.error_bounds` relies on it): GEMMs and convolution weight-gradients
in float32 (float64 for float64 inputs); every sum of squares that makes a squared norm, and the ghost
route's double sum ``Σ_{t,s} Â_ts·Ĝ_ts``, in float64 with exact float64 products, rounded once to float32 at
the end. Clipped sums are blocked: at most :data:`CLIPPED_SUM_BLOCK_ROWS` rows (examples × positions) are
reduced at a time (a whole example when it has more positions), and the block partials are then added.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Per-chunk element budget for temporaries ([chunk, T, T] Grams or [chunk, P, D] per-example grads).
_CHUNK_ELEMENTS = 1 << 24
# Rows (examples × positions) reduced at once by a clipped sum before the block partial is added to the
# running sum: K0 of the error model (dpsat_fast/ops/error_bounds.py). csrc/cpu/per_sample.cpp
# (kClippedSumBlockRows) and the Triton kernel use the same value; tests/test_error_bounds.py checks it.
CLIPPED_SUM_BLOCK_ROWS = 1024
# Elements squared and summed at once in float64 by :func:`row_sq_norms` (bounds its temporaries).
_WIDE_CHUNK_ELEMENTS = 1 << 22


def accum_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def choose_route(T: int, D: int, P: int) -> str:
    """'ghost' when 2T²(D+P) < 2TDP (the Gram route is cheaper), else 'instantiate'."""
    if T == 1:
        return "ghost"
    return "ghost" if T * (D + P) < D * P else "instantiate"


def batch_chunks(batch: int, per_example: int, budget: int = _CHUNK_ELEMENTS):
    """Slices of the batch whose temporaries stay under the element budget (at least one slice)."""
    step = max(1, budget // max(per_example, 1))
    if batch == 0:
        yield slice(0, 0)
    for start in range(0, batch, step):
        yield slice(start, min(start + step, batch))


def row_sq_norms(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``Σ x[i]²`` over all but the first dim: x [B, ...] -> [B]. Squares and sums in float64 (exact squares
    of float32 values), rounded once to ``dtype`` (default: the accumulation dtype of x)."""
    out_dtype = accum_dtype(x) if dtype is None else dtype
    B = x.shape[0]
    x = x.reshape(B, -1)
    out = torch.empty(B, dtype=torch.float64, device=x.device)
    for sl in batch_chunks(B, x.shape[1], _WIDE_CHUNK_ELEMENTS):
        out[sl] = x[sl].to(torch.float64).square_().sum(1)
    return out.to(out_dtype)


def sq_norms_ghost(a: Tensor, g: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``‖g_iᵀ a_i‖²`` via Gram matrices. a: [B, T, D], g: [B, T, P] -> [B].

    The Grams are float32 GEMMs; ``Σ_{t,s} Â_ts·Ĝ_ts`` takes exact float64 products and a float64 sum
    (ordinary float32 summation of these T² terms, each up to ``S_i²``, loses what cancels). The result
    is rounded to ``dtype`` (default: the accumulation dtype; float64 keeps the wide sum, e.g. to add
    up the groups of a convolution)."""
    dt = accum_dtype(a)
    out_dtype = dt if dtype is None else dtype
    B, T, _ = a.shape
    if T == 1:
        return (row_sq_norms(a, torch.float64) * row_sq_norms(g, torch.float64)).to(out_dtype)
    out = torch.empty(B, dtype=torch.float64, device=a.device)
    for sl in batch_chunks(B, T * T):
        ac, gc = a[sl].to(dt), g[sl].to(dt)
        gram_a = torch.bmm(ac, ac.transpose(1, 2))  # [b, T, T]
        gram_g = torch.bmm(gc, gc.transpose(1, 2))  # [b, T, T]
        out[sl] = gram_a.to(torch.float64).mul_(gram_g).sum((1, 2))
    return out.to(out_dtype)


def sq_norms_instantiate(a: Tensor, g: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``‖g_iᵀ a_i‖²`` by forming each G_i (in chunks, float32 GEMMs) and summing its squares in float64.
    a: [B, T, D], g: [B, T, P] -> [B] in ``dtype`` (default: the accumulation dtype)."""
    dt = accum_dtype(a)
    B, _, D = a.shape
    P = g.shape[2]
    out = torch.empty(B, dtype=torch.float64, device=a.device)
    for sl in batch_chunks(B, D * P):
        per_example = torch.bmm(g[sl].to(dt).transpose(1, 2), a[sl].to(dt))  # [b, P, D]
        out[sl] = row_sq_norms(per_example, torch.float64)
    return out.to(dt if dtype is None else dtype)


def weight_sq_norms(a: Tensor, g: Tensor, route: str | None = None) -> Tensor:
    """Per-example ``‖g_iᵀ a_i‖²`` by the given route, or the cheaper one. a: [B,T,D], g: [B,T,P]."""
    if route is None:
        route = choose_route(a.shape[1], a.shape[2], g.shape[2])
    if route == "ghost":
        return sq_norms_ghost(a, g)
    if route == "instantiate":
        return sq_norms_instantiate(a, g)
    raise ValueError(f"unknown per-sample norm route {route!r}; expected 'ghost' or 'instantiate'")


def weight_per_example_grads(a: Tensor, g: Tensor) -> Tensor:
    """Materialized ``G_i = g_iᵀ a_i``: [B, P, D] (for shared parameters and tests only)."""
    dt = accum_dtype(a)
    return torch.bmm(g.to(dt).transpose(1, 2), a.to(dt))


def weight_clipped_sum(a: Tensor, g: Tensor, scale: Tensor) -> Tensor:
    """``Σ_i s_i g_iᵀ a_i``: a: [B,T,D], g: [B,T,P], scale: [B] -> [P, D]. One GEMM ``(diag(s) g)ᵀ a`` per block
    of :data:`CLIPPED_SUM_BLOCK_ROWS` rows of the [B·T] rows, the block results added in order."""
    return linear_clipped_sum(a, g, scale, with_bias=False)[0]


def linear_clipped_sum(a: Tensor, g: Tensor, scale: Tensor, with_bias: bool) -> tuple[Tensor, Tensor | None]:
    """``(Σ_i s_i g_iᵀ a_i [P, D], Σ_i s_i Σ_t g_{i,t} [P] or None)``, both reduced over the [B·T] rows in blocks
    of at most :data:`CLIPPED_SUM_BLOCK_ROWS` rows (one GEMM / GEMV per block), the block partials then added."""
    dt = accum_dtype(a)
    B, T, D = a.shape
    P = g.shape[2]
    scaled = (g.to(dt) * scale.to(dt).view(B, 1, 1)).reshape(B * T, P)
    rows = a.to(dt).reshape(B * T, D)
    w = torch.zeros(P, D, dtype=dt, device=a.device)
    b = torch.zeros(P, dtype=dt, device=a.device) if with_bias else None
    for start in range(0, B * T, CLIPPED_SUM_BLOCK_ROWS):
        blk = slice(start, start + CLIPPED_SUM_BLOCK_ROWS)
        w += scaled[blk].t().mm(rows[blk])
        if with_bias:
            b += scaled[blk].sum(0)
    return w, b


def bias_per_example_grads(g: Tensor) -> Tensor:
    """Per-example bias gradient ``Σ_t g_{i,t}``: g [B, T, P] -> [B, P]."""
    return g.to(accum_dtype(g)).sum(1)


def clipped_sum_examples_per_block(T: int) -> int:
    """Whole examples of T positions per block of a convolution's clipped sum: ``max(1, K0 // T)``, so a
    block has at most ``max(K0, T)`` rows (K0 = :data:`CLIPPED_SUM_BLOCK_ROWS`)."""
    return max(1, CLIPPED_SUM_BLOCK_ROWS // max(T, 1))


# ------------------------------------------------------------------------------------------------------
# convolutions (1-D, 2-D, 3-D; numeric symmetric padding: the layer rule pre-pads everything else)
# ------------------------------------------------------------------------------------------------------


def unfold_patches(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int) -> Tensor:
    """im2col for N-d convolution: x [B, C, *S] -> [B, groups, (C/groups)·∏k, T] (weight layout order).

    1-D and 2-D go through F.unfold (one optimized im2col, no intermediate copies); 3-D through strided
    windows and one copy."""
    n = len(kernel_size)
    B, C = x.shape[:2]
    if n == 2:
        cols = F.unfold(x, tuple(kernel_size), tuple(dilation), tuple(padding), tuple(stride))  # [B, C·K, T]
    elif n == 1:
        cols = F.unfold(x.unsqueeze(2), (1, kernel_size[0]), (1, dilation[0]), (0, padding[0]), (1, stride[0]))
    else:
        if any(padding):
            x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
        for d in range(n):
            x = x.unfold(2 + d, dilation[d] * (kernel_size[d] - 1) + 1, stride[d])  # appends a window dim
        x = x[(slice(None),) * (2 + n) + tuple(slice(None, None, dl) for dl in dilation)]  # [B, C, *T, *k]
        perm = (0, 1) + tuple(range(2 + n, 2 + 2 * n)) + tuple(range(2, 2 + n))
        T = math.prod(x.shape[2:2 + n])
        cols = x.permute(perm).reshape(B, C * math.prod(kernel_size), T)
    return cols.view(B, groups, cols.shape[1] // groups, cols.shape[2])


def conv_patches_and_grads(xs: Sequence[Tensor], gs: Sequence[Tensor], kernel_size, stride, padding, dilation,
                           groups: int):
    """Unfolded inputs [B·G, T, D_k] and output grads [B·G, T, P_k] (transposed views of feature-major tensors),
    several uses concatenated along T."""
    a_parts, g_parts = [], []
    for x, g in zip(xs, gs):
        a_parts.append(unfold_patches(x, kernel_size, stride, padding, dilation, groups))  # [B, G, D_k, T]
        g_parts.append(g.reshape(g.shape[0], groups, g.shape[1] // groups, math.prod(g.shape[2:])))  # [B, G, P_k, T]
    a = torch.cat(a_parts, 3) if len(a_parts) > 1 else a_parts[0]
    g = torch.cat(g_parts, 3) if len(g_parts) > 1 else g_parts[0]
    B, G = a.shape[:2]
    return (a.reshape(B * G, a.shape[2], a.shape[3]).transpose(1, 2),
            g.reshape(B * G, g.shape[2], g.shape[3]).transpose(1, 2))


def conv_per_example_grads(x: Tensor, g: Tensor, weight_shape: Sequence[int], stride, padding, dilation,
                           groups: int) -> Tensor:
    """Per-example weight gradients [B, *weight_shape].

    Dense convolutions whose patches are small or trivial are one batched GEMM ``g_i a_iᵀ``: a 1×1 kernel
    reads the (strided) input directly, a small fan-in (e.g. an RGB stem, ``D <= 64``) unfolds it. Every
    other case is ONE convolution weight-gradient with the batch folded into the groups (no unfold)."""
    n = len(weight_shape) - 2
    dt, b = accum_dtype(x), x.shape[0]
    if b == 0:
        return torch.zeros((0,) + tuple(weight_shape), dtype=dt, device=x.device)
    if groups == 1 and n in (1, 2):
        c_out, fan_in = weight_shape[0], math.prod(weight_shape[1:])
        gt = g.to(dt).reshape(b, c_out, -1)  # [B, P, T]
        if all(k == 1 for k in weight_shape[2:]) and not any(padding):
            xs = x[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in stride)]
            a = xs[(slice(None), slice(None)) + tuple(slice(0, o) for o in g.shape[2:])]
            return torch.bmm(gt, a.to(dt).reshape(b, fan_in, -1).transpose(1, 2)).view((b,) + tuple(weight_shape))
        if fan_in <= 64:
            a = unfold_patches(x.to(dt), weight_shape[2:], stride, padding, dilation, 1)[:, 0]  # [B, D, T]
            return torch.bmm(gt, a.transpose(1, 2)).view((b,) + tuple(weight_shape))
    pe = torch.ops.aten.convolution_backward(
        g.to(dt).reshape(1, b * g.shape[1], *g.shape[2:]), x.to(dt).reshape(1, b * x.shape[1], *x.shape[2:]),
        torch.zeros((b * weight_shape[0],) + tuple(weight_shape[1:]), dtype=dt, device=x.device), None, stride,
        padding, dilation, False, [0] * n, b * groups, [False, True, False])[1]
    return pe.view((b,) + tuple(weight_shape))


def conv_weight_sq_norms(x: Tensor, g: Tensor, weight_shape: Sequence[int], stride, padding, dilation,
                         groups: int, route: str) -> Tensor:
    """Per-example ``‖∂W_i‖²`` of a convolution (all groups) by the given route: [B]."""
    B = x.shape[0]
    if route == "instantiate":
        per_example = math.prod(weight_shape)
        parts = [row_sq_norms(conv_per_example_grads(x[sl], g[sl], weight_shape, stride, padding, dilation, groups))
                 for sl in batch_chunks(B, per_example)]
        return torch.cat(parts) if len(parts) != 1 else parts[0]
    if route == "ghost":
        a, gg = conv_patches_and_grads([x], [g], weight_shape[2:], stride, padding, dilation, groups)
        return sq_norms_ghost(a, gg, torch.float64).view(B, groups).sum(1).to(accum_dtype(x))
    raise ValueError(f"unknown per-sample norm route {route!r}; expected 'ghost' or 'instantiate'")


def conv_bias_per_example_grads(g: Tensor) -> Tensor:
    """``Σ_t g_{i,:,t}``: [B, C_out, *S] -> [B, C_out]."""
    return g.to(accum_dtype(g)).flatten(2).sum(2)


def conv_weight_clipped_sum(x: Tensor, g: Tensor, scale: Tensor, weight_shape: Sequence[int], stride, padding,
                            dilation, groups: int) -> Tensor:
    """``Σ_i s_i ∂W_i``: the convolution weight-gradient of the per-example-scaled output gradient, one per
    block of :func:`clipped_sum_examples_per_block` examples, the block results added in order."""
    return conv_clipped_sum(x, g, scale, weight_shape, stride, padding, dilation, groups, with_bias=False)[0]


def conv_clipped_sum(x: Tensor, g: Tensor, scale: Tensor, weight_shape: Sequence[int], stride, padding, dilation,
                     groups: int, with_bias: bool) -> tuple[Tensor, Tensor | None]:
    """``(Σ_i s_i ∂W_i, Σ_i s_i ∂b_i or None)`` of a convolution, blocked like the Linear clipped sum: blocks of
    whole examples (:func:`clipped_sum_examples_per_block`), one convolution weight-gradient and one GEMV
    over the per-example bias gradients per block, the block partials added in order."""
    n = len(weight_shape) - 2
    dt = accum_dtype(x)
    B = x.shape[0]
    gs = g.to(dt) * scale.to(dt).view(-1, *([1] * (n + 1)))
    xs = x.to(dt)
    w_shape = torch.empty((), dtype=dt, device=x.device).expand(*weight_shape)  # shape only
    w = torch.zeros(tuple(weight_shape), dtype=dt, device=x.device)
    b = torch.zeros(weight_shape[0], dtype=dt, device=x.device) if with_bias else None
    bias = conv_bias_per_example_grads(g) if with_bias else None
    step = clipped_sum_examples_per_block(math.prod(g.shape[2:]))
    for start in range(0, B, step):
        blk = slice(start, start + step)
        w += torch.ops.aten.convolution_backward(gs[blk], xs[blk], w_shape, None, stride, padding, dilation, False,
                                                 [0] * n, groups, [False, True, False])[1]
        if with_bias:
            b += bias[blk].t().mv(scale[blk].to(dt))
    return w, b
