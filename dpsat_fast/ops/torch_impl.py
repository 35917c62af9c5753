"""Pure-PyTorch implementations of the per-sample gradient ops: the CPU path, and the fallback on other
devices (fp64 inputs, Conv3d, Triton unavailable).

Weight gradients of the form G_i = g_iᵀ a_i.

Every layer with a weight matrix (Linear, each group of a Conv, attention projections) has a per-example
weight gradient ``G_i = g_iᵀ a_i`` with ``a_i ∈ R^{T×D}`` the layer input at T positions and
``g_i ∈ R^{T×P}`` the gradient of the layer output (DESIGN.md §2.3). Two exact ways to get ``‖G_i‖²_F``:

* ghost:        ``‖G_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩_F``      cost ≈ 2T²(D+P), memory T² per example;
* instantiate:  form ``G_i`` and sum its squares         cost ≈ 2TDP,     memory DP per example.

``T = 1`` collapses the ghost route to ``‖a_i‖²·‖g_i‖²``. :func:`choose_route` picks the cheaper one.
The clipped sum ``Σ_i s_i G_i = (diag(s) g)ᵀ a`` is one GEMM with a per-row scale.

Convolutions: for group k the layer is a matrix product on unfolded patches, ``a_i ∈ R^{T×D_k}`` with
``D_k = (C_in/groups)·∏kernel``; every group is counted. The conv instantiate route and the conv clipped
sum never unfold: both are convolution weight-gradients (the former with the batch folded into the
groups, the latter of the per-example-scaled output gradient).

All results are accumulated in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Per-chunk element budget for temporaries ([chunk, T, T] Grams or [chunk, P, D] per-example grads).
_CHUNK_ELEMENTS = 1 << 24


def accum_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def choose_route(T: int, D: int, P: int) -> str:
    """'ghost' when 2T²(D+P) < 2TDP (the Gram route is cheaper), else 'instantiate'."""
    if T == 1:
        return "ghost"
    return "ghost" if T * (D + P) < D * P else "instantiate"


def batch_chunks(batch: int, per_example: int):
    """Slices of the batch whose temporaries stay under the element budget (at least one slice)."""
    step = max(1, _CHUNK_ELEMENTS // max(per_example, 1))
    if batch == 0:
        yield slice(0, 0)
    for start in range(0, batch, step):
        yield slice(start, min(start + step, batch))


def sq_norms_ghost(a: Tensor, g: Tensor) -> Tensor:
    """``‖g_iᵀ a_i‖²`` via Gram matrices. a: [B, T, D], g: [B, T, P] -> [B]."""
    dt = accum_dtype(a)
    B, T, _ = a.shape
    if T == 1:
        return a.to(dt).pow(2).sum((1, 2)) * g.to(dt).pow(2).sum((1, 2))
    out = torch.empty(B, dtype=dt, device=a.device)
    for sl in batch_chunks(B, T * T):
        ac, gc = a[sl].to(dt), g[sl].to(dt)
        gram_a = torch.bmm(ac, ac.transpose(1, 2))  # [b, T, T]
        gram_g = torch.bmm(gc, gc.transpose(1, 2))  # [b, T, T]
        out[sl] = (gram_a * gram_g).sum((1, 2))
    return out


def sq_norms_instantiate(a: Tensor, g: Tensor) -> Tensor:
    """``‖g_iᵀ a_i‖²`` by forming each G_i (in chunks). a: [B, T, D], g: [B, T, P] -> [B]."""
    dt = accum_dtype(a)
    B, _, D = a.shape
    P = g.shape[2]
    out = torch.empty(B, dtype=dt, device=a.device)
    for sl in batch_chunks(B, D * P):
        per_example = torch.bmm(g[sl].to(dt).transpose(1, 2), a[sl].to(dt))  # [b, P, D]
        out[sl] = per_example.pow(2).sum((1, 2))
    return out


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
    """``Σ_i s_i g_iᵀ a_i`` as one GEMM: a: [B,T,D], g: [B,T,P], scale: [B] -> [P, D]."""
    dt = accum_dtype(a)
    B, T, D = a.shape
    P = g.shape[2]
    scaled = g.to(dt) * scale.to(dt).view(B, 1, 1)
    return scaled.reshape(B * T, P).t().mm(a.to(dt).reshape(B * T, D))


def bias_per_example_grads(g: Tensor) -> Tensor:
    """Per-example bias gradient ``Σ_t g_{i,t}``: g [B, T, P] -> [B, P]."""
    return g.to(accum_dtype(g)).sum(1)


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
        parts = [conv_per_example_grads(x[sl], g[sl], weight_shape, stride, padding, dilation, groups)
                 .flatten(1).pow(2).sum(1) for sl in batch_chunks(B, per_example)]
        return torch.cat(parts) if len(parts) != 1 else parts[0]
    if route == "ghost":
        a, gg = conv_patches_and_grads([x], [g], weight_shape[2:], stride, padding, dilation, groups)
        return sq_norms_ghost(a, gg).view(B, groups).sum(1)
    raise ValueError(f"unknown per-sample norm route {route!r}; expected 'ghost' or 'instantiate'")


def conv_bias_per_example_grads(g: Tensor) -> Tensor:
    """``Σ_t g_{i,:,t}``: [B, C_out, *S] -> [B, C_out]."""
    return g.to(accum_dtype(g)).flatten(2).sum(2)


def conv_weight_clipped_sum(x: Tensor, g: Tensor, scale: Tensor, weight_shape: Sequence[int], stride, padding,
                            dilation, groups: int) -> Tensor:
    """``Σ_i s_i ∂W_i``: the convolution weight-gradient of the per-example-scaled output gradient."""
    n = len(weight_shape) - 2
    dt = accum_dtype(x)
    gs = g.to(dt) * scale.to(dt).view(-1, *([1] * (n + 1)))
    w = torch.empty((), dtype=dt, device=x.device).expand(*weight_shape)  # shape only
    return torch.ops.aten.convolution_backward(gs, x.to(dt), w, None, stride, padding, dilation, False,
                                               [0] * n, groups, [False, True, False])[1]
