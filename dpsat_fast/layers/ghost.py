"""Per-example squared norms and clipped sums of weight gradients of the form G_i = g_iᵀ a_i.

Every layer with a weight matrix (Linear, each group of a Conv, attention projections) has a per-example
weight gradient ``G_i = g_iᵀ a_i`` with ``a_i ∈ R^{T×D}`` the layer input at T positions and
``g_i ∈ R^{T×P}`` the gradient of the layer output (DESIGN.md §2.3). Two exact ways to get ``‖G_i‖²_F``:

* ghost:        ``‖G_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩_F``      cost ≈ 2T²(D+P), memory T² per example;
* instantiate:  form ``G_i`` and sum its squares         cost ≈ 2TDP,     memory DP per example.

``T = 1`` collapses the ghost route to ``‖a_i‖²·‖g_i‖²``. :func:`choose_route` picks the cheaper one.
The clipped sum ``Σ_i s_i G_i = (diag(s) g)ᵀ a`` is one GEMM with a per-row scale.

All results are accumulated in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
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
