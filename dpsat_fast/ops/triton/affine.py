"""Triton kernel for the per-example gradients of a normalization layer's affine part (docs/algorithms.md §3).

For ``y = x̂ ⊙ w + b`` (LayerNorm, GroupNorm, InstanceNorm, RMSNorm) with x̂ and the output gradient g
viewed as [B, T, C] (C the parameter elements, T everything else per example):
``∂w_i = Σ_t x̂_{i,t} ⊙ g_{i,t}``, ``∂b_i = Σ_t g_{i,t}`` and their squared norms, in one pass over x̂
and g. Gradients accumulate in fp32; the squared norms are reduced in fp64 (exact squares) into per-program
partial sums that the host adds in fp64 (deterministic) and rounds to fp32 once.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreter_on

# launch tiles (num_warps/num_stages: Triton's defaults); bench/triton_aot.py compiles the GPU ones
_GPU_BLOCKS = dict(BLOCK_T=16, BLOCK_C=128)
_INTERPRETER_BLOCKS = dict(BLOCK_T=16, BLOCK_C=32)


@triton.jit
def _affine_grads_kernel(x_ptr, g_ptr, dw_ptr, db_ptr, w_sq_ptr, b_sq_ptr, T, C, n_cb,
                         s_xb, s_xt, s_xc, s_gb, s_gt, s_gc,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = c < C
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = (t < T)[:, None] & c_mask[None, :]
        g = tl.load(g_ptr + i * s_gb + t[:, None] * s_gt + c[None, :] * s_gc, mask=mask,
                    other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_C]
        if HAS_WEIGHT:
            x = tl.load(x_ptr + i * s_xb + t[:, None] * s_xt + c[None, :] * s_xc, mask=mask,
                        other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_C]
            dw += tl.sum(x * g, 0)
        if HAS_BIAS:
            db += tl.sum(g, 0)
    if HAS_WEIGHT:
        tl.store(dw_ptr + i * C + c, dw, mask=c_mask)
        dw64 = dw.to(tl.float64)
        tl.store(w_sq_ptr + i * n_cb + cb, tl.sum(dw64 * dw64, 0))
    if HAS_BIAS:
        tl.store(db_ptr + i * C + c, db, mask=c_mask)
        db64 = db.to(tl.float64)
        tl.store(b_sq_ptr + i * n_cb + cb, tl.sum(db64 * db64, 0))


def affine_per_example_grads(xhat: torch.Tensor, g: torch.Tensor, with_weight: bool, with_bias: bool
                             ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                                        Optional[torch.Tensor], Optional[torch.Tensor]]:
    """xhat, g: [B, T, C] (any strides) -> (∂w [B, C], ∂b [B, C], ‖∂w_i‖² [B], ‖∂b_i‖² [B]), fp32, None for
    what was not asked for."""
    B, T, C = g.shape
    blocks = _INTERPRETER_BLOCKS if interpreter_on() else _GPU_BLOCKS
    block_c, block_t = blocks["BLOCK_C"], blocks["BLOCK_T"]
    n_cb = cdiv(C, block_c)
    dev = g.device
    f32 = dict(dtype=torch.float32, device=dev)
    f64 = dict(dtype=torch.float64, device=dev)
    dw = torch.empty(B, C, **f32) if with_weight else None
    db = torch.empty(B, C, **f32) if with_bias else None
    w_sq = torch.empty(B, n_cb, **f64) if with_weight else None
    b_sq = torch.empty(B, n_cb, **f64) if with_bias else None
    if B * C > 0:
        dummy = g
        _affine_grads_kernel[(B, n_cb)](
            xhat if with_weight else dummy, g, dw if with_weight else dummy, db if with_bias else dummy,
            w_sq if with_weight else dummy, b_sq if with_bias else dummy, T, C, n_cb,
            *(xhat.stride() if with_weight else g.stride()), *g.stride(),
            HAS_WEIGHT=with_weight, HAS_BIAS=with_bias, BLOCK_T=block_t, BLOCK_C=block_c)
    else:
        for t in (dw, db, w_sq, b_sq):
            if t is not None:
                t.zero_()
    return (dw, db, (w_sq.sum(1).to(torch.float32) if with_weight else None),
            (b_sq.sum(1).to(torch.float32) if with_bias else None))
