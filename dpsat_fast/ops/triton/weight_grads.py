"""Triton kernels for weight gradients of the form ``G_i = g_iᵀ a_i`` (Linear, Conv1d/2d), never materialized.

Per example i and group k, ``a_i ∈ R^{T×D}`` is the layer input at T positions (for a convolution the
patches of the input, read in place: implicit im2col with stride, padding, dilation and groups) and
``g_i ∈ R^{T×P}`` the output gradient (docs/algorithms.md §3). Three kernels:

* :func:`_ghost_sq_norms_kernel`: ``‖G_i‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s)``, one ``[BLOCK_T, BLOCK_T]`` tile
  pair of both Gram matrices per program, built in registers and reduced at once (the pair (s, t) counts
  twice, only s ≥ t is computed). The bias ``Σ_t g_t`` is summed directly (the diagonal programs store
  the column sums of their ``g`` tile), not as ``Σ_{t,s} g_t·g_s``, which cancels like the weight does.
* :func:`_instantiate_sq_norms_kernel`: one ``[BLOCK_P, BLOCK_D]`` tile of ``G_i`` per program,
  accumulated over T in registers and reduced to the sum of its squares.
* :func:`_clipped_sum_kernel`: ``Σ_i c_i G_i`` as one reduction over the B·T rows with the per-example
  scale applied to ``g`` on the fly, plus ``σC·ξ`` from ``tl.randn(seed, offset + j)`` (j the row-major
  index in the weight) in the epilogue; the bias ``Σ_i c_i Σ_t g_{i,t}`` from the same ``g`` tiles. The
  rows are reduced in blocks of ``K0 =`` :data:`~dpsat_fast.ops.torch_impl.CLIPPED_SUM_BLOCK_ROWS`: a block
  accumulator is added to the running one every K0 rows. Long reductions are split over programs; the
  splits are then summed in fp64 (and noised) by :func:`dpsat_fast.ops.triton.noise._sum_noise_scale_kernel`,
  so every output is written once, deterministically (no atomics).

Accumulation (:mod:`dpsat_fast.ops.error_bounds` derives its worst-case error from what follows): dots in
fp32 (``tl.dot``); fp32 operands use ``dot_precision`` (exact in the interpreter, three-pass TF32 on
GPUs), 16-bit operands multiply exactly into fp32, and the scaled gradient of a 16-bit layer is split into
a high and a low 16-bit part so the per-example scale keeps ~16 bits more than one rounding would. Every
sum of squares that makes a squared norm, and the ghost route's ``Σ_{t,s} Â_ts·Ĝ_ts``, is reduced in fp64
(exact fp64 products of the fp32 tile values) into fp64 per-program partial sums that the host adds up in
fp64 (deterministic) and rounds to fp32 once.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..torch_impl import CLIPPED_SUM_BLOCK_ROWS
from ._common import cdiv, dot_precision, interpreter_on
from .noise import sum_noise_scale

# ------------------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _load_g(g_ptr, ib, t, p, k, P, row_mask, col_mask, s_gb, s_gt, s_gp):
    """Output-gradient tile ``g[ib, t, k·P + p]`` → [R, BLOCK_P]."""
    ptrs = g_ptr + ib[:, None] * s_gb + t[:, None] * s_gt + (k * P + p)[None, :] * s_gp
    return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _load_a(a_ptr, ib, t, d, k, row_mask, col_mask, s_ab, s_a1, s_a2, s_a3,
            C_G, H, W, W_OUT, KH, KW, SH, SW, PH, PW, DH, DW, IS_CONV: tl.constexpr):
    """Input tile ``a[ib, t, d]`` → [R, BLOCK_D]. Linear: strides (s_ab, s_a1, s_a2) of [B, T, D]. Conv:
    the patch element d = (c, kh, kw) (weight layout) of output position t = (oh, ow) of group k, read
    from x [B, C, H, W] with strides (s_ab, s_a1, s_a2, s_a3); padding reads as zero."""
    if IS_CONV:
        c = d // (KH * KW)
        r = d % (KH * KW)
        kh = r // KW
        kw = r % KW
        oh = t // W_OUT
        ow = t % W_OUT
        ih = oh[:, None] * SH - PH + kh[None, :] * DH  # [R, BLOCK_D]
        iw = ow[:, None] * SW - PW + kw[None, :] * DW  # [R, BLOCK_D]
        mask = row_mask[:, None] & col_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ptrs = a_ptr + ib[:, None] * s_ab + (k * C_G + c)[None, :] * s_a1 + ih * s_a2 + iw * s_a3
    else:
        mask = row_mask[:, None] & col_mask[None, :]
        ptrs = a_ptr + ib[:, None] * s_ab + t[:, None] * s_a1 + d[None, :] * s_a2
    return tl.load(ptrs, mask=mask, other=0.0)


# ------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _ghost_sq_norms_kernel(
    a_ptr, g_ptr, w_part_ptr, b_part_ptr,
    T, D, P, G, n_part, n_tb_part,
    s_ab, s_a1, s_a2, s_a3, C_G, H, W, W_OUT, KH, KW, SH, SW, PH, PW, DH, DW,
    s_gb, s_gt, s_gp,
    IS_CONV: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_bg = tl.program_id(0).to(tl.int64)
    pid_pair = tl.program_id(1)
    n_tb = tl.cdiv(T, BLOCK_T)
    tb = pid_pair // n_tb
    sb = pid_pair % n_tb
    if tb < n_tb:
        if sb >= tb:
            i = pid_bg // G
            k = pid_bg % G
            ib = tl.zeros([BLOCK_T], dtype=tl.int64) + i
            t = tb * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
            s = sb * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
            t_mask = t < T
            s_mask = s < T
            gram_a = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                d_mask = d < D
                a_t = _load_a(a_ptr, ib, t, d, k, t_mask, d_mask, s_ab, s_a1, s_a2, s_a3,
                              C_G, H, W, W_OUT, KH, KW, SH, SW, PH, PW, DH, DW, IS_CONV)  # [BLOCK_T, BLOCK_D]
                a_s = _load_a(a_ptr, ib, s, d, k, s_mask, d_mask, s_ab, s_a1, s_a2, s_a3,
                              C_G, H, W, W_OUT, KH, KW, SH, SW, PH, PW, DH, DW, IS_CONV)  # [BLOCK_T, BLOCK_D]
                gram_a = tl.dot(a_t, tl.trans(a_s), gram_a, input_precision=PREC)
            gram_g = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
            for p0 in range(0, P, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
                p_mask = p < P
                g_t = _load_g(g_ptr, ib, t, p, k, P, t_mask, p_mask, s_gb, s_gt, s_gp)  # [BLOCK_T, BLOCK_P]
                g_s = _load_g(g_ptr, ib, s, p, k, P, s_mask, p_mask, s_gb, s_gt, s_gp)  # [BLOCK_T, BLOCK_P]
                gram_g = tl.dot(g_t, tl.trans(g_s), gram_g, input_precision=PREC)
                if HAS_BIAS:
                    # Σ_{t in tile} g_t, by the diagonal programs: [BLOCK_P] of the bias of example i, group k
                    tl.store(b_part_ptr + (pid_bg * n_tb_part + tb) * P + p, tl.sum(g_t.to(tl.float32), 0),
                             mask=p_mask & ((p * 0 + sb) == tb))
            # exact fp64 products and an fp64 sum: the T² terms cancel where G_i is small
            prod = gram_a.to(tl.float64) * gram_g.to(tl.float64)  # [BLOCK_T, BLOCK_T]
            # the tile pair (s, t) equals the transpose of (t, s): count off-diagonal pairs twice
            weight = 1.0 + (sb > tb).to(tl.float64)
            tl.store(w_part_ptr + pid_bg * n_part + pid_pair, tl.sum(tl.sum(prod, 1), 0) * weight)


@triton.jit
def _instantiate_sq_norms_kernel(
    a_ptr, g_ptr, w_part_ptr, b_part_ptr,
    T, D, P, G, n_part,
    s_ab, s_a1, s_a2, s_a3, C_G, H, W, W_OUT, KH, KW, SH, SW, PH, PW, DH, DW,
    s_gb, s_gt, s_gp,
    IS_CONV: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_bg = tl.program_id(0).to(tl.int64)
    pid_tile = tl.program_id(1)
    n_d = tl.cdiv(D, BLOCK_D)
    tp = pid_tile // n_d
    td = pid_tile % n_d
    if tp < tl.cdiv(P, BLOCK_P):
        i = pid_bg // G
        k = pid_bg % G
        ib = tl.zeros([BLOCK_T], dtype=tl.int64) + i
        p = tp * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        d = td * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        p_mask = p < P
        d_mask = d < D
        acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        bias_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            t_mask = t < T
            g = _load_g(g_ptr, ib, t, p, k, P, t_mask, p_mask, s_gb, s_gt, s_gp)  # [BLOCK_T, BLOCK_P]
            a = _load_a(a_ptr, ib, t, d, k, t_mask, d_mask, s_ab, s_a1, s_a2, s_a3,
                        C_G, H, W, W_OUT, KH, KW, SH, SW, PH, PW, DH, DW, IS_CONV)  # [BLOCK_T, BLOCK_D]
            acc = tl.dot(tl.trans(g), a, acc, input_precision=PREC)  # [BLOCK_P, BLOCK_D]
            if HAS_BIAS:
                bias_acc += tl.sum(g.to(tl.float32), 0)
        acc64 = acc.to(tl.float64)  # exact squares and an fp64 sum
        tl.store(w_part_ptr + pid_bg * n_part + pid_tile, tl.sum(tl.sum(acc64 * acc64, 1), 0))
        if HAS_BIAS:
            bias64 = bias_acc.to(tl.float64)
            tl.store(b_part_ptr + pid_bg * n_part + pid_tile, tl.sum(bias64 * bias64, 0), mask=td == 0)


@triton.jit
def _clipped_sum_kernel(
    a_ptr, g_ptr, scale_ptr, w_out_ptr, b_out_ptr,
    T, D, P, G, n_rows, rows_per_split,
    s_ab, s_a1, s_a2, s_a3, C_G, H, W, W_OUT, KH, KW, SH, SW, PH, PW, DH, DW,
    s_gb, s_gt, s_gp,
    seed, w_offset, b_offset, noise_std,
    IS_CONV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_SPLITS: tl.constexpr,
    LOW_PRECISION: tl.constexpr, PREC: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    n_p = tl.cdiv(P, BLOCK_P)
    n_d = tl.cdiv(D, BLOCK_D)
    if pid < G * n_p * n_d:
        k = pid // (n_p * n_d)
        tp = (pid % (n_p * n_d)) // n_d
        td = pid % n_d
        p = tp * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        d = td * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        p_mask = p < P
        d_mask = d < D
        acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        bias_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        r_start = split * rows_per_split
        r_end = tl.minimum(r_start + rows_per_split, n_rows)
        # blocks of BLOCK_ROWS rows (a multiple of BLOCK_T): each summed apart, then added to the running sum
        for b0 in range(r_start, r_end, BLOCK_ROWS):
            b_end = tl.minimum(b0 + BLOCK_ROWS, r_end)
            blk = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
            bias_blk = tl.zeros([BLOCK_P], dtype=tl.float32)
            for r0 in range(b0, b_end, BLOCK_T):
                r = r0 + tl.arange(0, BLOCK_T).to(tl.int64)
                r_mask = r < b_end
                ib = r // T
                t = r % T
                c = tl.load(scale_ptr + ib, mask=r_mask, other=0.0)  # [BLOCK_T]
                g = _load_g(g_ptr, ib, t, p, k, P, r_mask, p_mask, s_gb, s_gt, s_gp).to(tl.float32) * c[:, None]
                a = _load_a(a_ptr, ib, t, d, k, r_mask, d_mask, s_ab, s_a1, s_a2, s_a3,
                            C_G, H, W, W_OUT, KH, KW, SH, SW, PH, PW, DH, DW, IS_CONV)  # [BLOCK_T, BLOCK_D]
                if LOW_PRECISION:
                    g_hi = g.to(a.dtype)
                    g_lo = (g - g_hi.to(tl.float32)).to(a.dtype)
                    blk = tl.dot(tl.trans(g_hi), a, blk)
                    blk = tl.dot(tl.trans(g_lo), a, blk)
                else:
                    blk = tl.dot(tl.trans(g), a, blk, input_precision=PREC)  # [BLOCK_P, BLOCK_D]
                if HAS_BIAS:
                    bias_blk += tl.sum(g, 0)
            acc += blk
            if HAS_BIAS:
                bias_acc += bias_blk
        row = k * P + p  # [BLOCK_P] rows of the weight [G·P, D]
        idx = row[:, None] * D + d[None, :]  # [BLOCK_P, BLOCK_D] row-major index in the weight
        mask = p_mask[:, None] & d_mask[None, :]
        bias_mask = p_mask & ((p * 0 + td) == 0)
        if WRITE_SPLITS:
            tl.store(w_out_ptr + split * G * P * D + idx, acc, mask=mask)  # int64 (split is): no i32 G·P·D
            if HAS_BIAS:
                tl.store(b_out_ptr + split * (G * P) + row, bias_acc, mask=bias_mask)
        else:
            if HAS_NOISE:
                acc += noise_std * tl.randn(seed, w_offset + idx)
            tl.store(w_out_ptr + idx, acc, mask=mask)
            if HAS_BIAS:
                if HAS_NOISE:
                    bias_acc += noise_std * tl.randn(seed, b_offset + row)
                tl.store(b_out_ptr + row, bias_acc, mask=bias_mask)


# ------------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------------

_INTERPRETER_BLOCKS = dict(BLOCK_T=16, BLOCK_D=16, BLOCK_P=16)
# (BLOCK_T, BLOCK_D, BLOCK_P, num_warps, num_stages) tried by the GPU autotuner, per kernel. fp32 operands
# (three-pass TF32 dots) need the most registers: compiled for sm_80/sm_90, dots with a reduction dimension (K:
# BLOCK_D and BLOCK_P of the ghost Gram matrices, BLOCK_T of the others) of 64 spilled, and so did the clipped
# sum's [BLOCK_P, BLOCK_D] = [64, 64] fp32 convolution tiles on sm_80. bench/triton_aot.py compiles every
# config for sm_80 and sm_90 and checks that none spills.
_GHOST_GPU_CONFIGS = [(32, 16, 16, 4, 2), (32, 32, 32, 8, 3), (64, 16, 16, 8, 3)]
_GPU_CONFIGS = [(32, 32, 64, 8, 3), (32, 32, 32, 8, 3), (32, 64, 32, 8, 3)]
# .maxnreg 255: without it ptxas may cap the registers for occupancy (128 or 168 at 4 warps on sm_80) and spill
_MAXNREG = 255
# the smallest tile sizes bound the number of partial sums (the partial buffers are sized for them): the ghost
# route's row tiles (BLOCK_T), the instantiate route's weight tiles (BLOCK_P x BLOCK_D), the clipped sum's splits
_MIN_BLOCKS = (16, 16, 16) if interpreter_on() else tuple(min(c[i] for c in _GPU_CONFIGS) for i in range(3))
assert interpreter_on() or min(c[0] for c in _GHOST_GPU_CONFIGS) >= _MIN_BLOCKS[0]
# a clipped-sum block is made of whole row tiles
assert all(CLIPPED_SUM_BLOCK_ROWS % c[0] == 0 for c in _GPU_CONFIGS + [(_INTERPRETER_BLOCKS["BLOCK_T"],)])


def _configs(gpu_configs):
    if interpreter_on():
        return [triton.Config(_INTERPRETER_BLOCKS)]
    configs = []
    for t, d, p, w, s in gpu_configs:
        blocks = dict(BLOCK_T=t, BLOCK_D=d, BLOCK_P=p)
        try:
            configs.append(triton.Config(blocks, num_warps=w, num_stages=s, maxnreg=_MAXNREG))
        except TypeError:  # a triton whose Config has no maxnreg
            configs.append(triton.Config(blocks, num_warps=w, num_stages=s))
    return configs


_ghost = triton.autotune(_configs(_GHOST_GPU_CONFIGS), key=["T", "D", "P", "IS_CONV"])(_ghost_sq_norms_kernel)
_instantiate = triton.autotune(_configs(_GPU_CONFIGS), key=["T", "D", "P", "IS_CONV"])(_instantiate_sq_norms_kernel)
_clipped = triton.autotune(_configs(_GPU_CONFIGS), key=["T", "D", "P", "n_rows", "IS_CONV"])(_clipped_sum_kernel)


# ------------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv2dGeometry:
    """Convolution geometry of a Conv1d/Conv2d weight-gradient (numeric symmetric padding only)."""

    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    @staticmethod
    def from_nd(kernel_size, stride, padding, dilation, groups) -> "Conv2dGeometry":
        """1-D geometries become 2-D ones with a unit first dimension."""
        if len(kernel_size) == 1:
            return Conv2dGeometry((1, kernel_size[0]), (1, stride[0]), (0, padding[0]), (1, dilation[0]), groups)
        return Conv2dGeometry(tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups)

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


class _Operands:
    """The kernels' view of one layer use: a loader for ``a``, a strided ``g`` [B, T, G·P] and sizes."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor, conv: Optional[Conv2dGeometry]):
        dtype = torch.promote_types(a.dtype, g.dtype)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"Triton weight-gradient kernels take float32/float16/bfloat16, got {dtype}")
        a, g = a.to(dtype), g.to(dtype)
        self.dtype = dtype
        self.B = a.shape[0]
        if conv is None:
            self.G, self.T, self.D, self.P = 1, a.shape[1], a.shape[2], g.shape[2]
            self.a_strides = (a.stride(0), a.stride(1), a.stride(2), 0)
            self.conv_args = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1)
            self.g, self.g_strides = g, (g.stride(0), g.stride(1), g.stride(2))
        else:
            if a.dim() == 3:  # Conv1d: [B, C, L] -> [B, C, 1, L]
                a, g = a.unsqueeze(2), g.unsqueeze(2)
            _, C, H, W = a.shape
            h_out, w_out = g.shape[2], g.shape[3]
            if conv.output_size(H, W) != (h_out, w_out):
                raise ValueError(f"output gradient of spatial size {(h_out, w_out)} does not match the convolution "
                                 f"of an input of size {(H, W)} ({conv})")
            self.G = conv.groups
            self.T = h_out * w_out
            self.D = C // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
            self.P = g.shape[1] // conv.groups
            self.a_strides = tuple(a.stride())
            self.conv_args = (C // conv.groups, H, W, w_out, *conv.kernel_size, *conv.stride, *conv.padding,
                              *conv.dilation)
            g = g.reshape(g.shape[0], g.shape[1], self.T)  # [B, G·P, T] (a view unless g is oddly strided)
            self.g, self.g_strides = g, (g.stride(0), g.stride(2), g.stride(1))
        self.a = a
        self.is_conv = conv is not None
        # 16-bit operands multiply exactly into fp32 whatever the setting: keep Triton's default for them
        self.prec = dot_precision(a.device) if dtype == torch.float32 else ("tf32" if a.device.type == "cuda" else "ieee")

    def args(self):
        return (*self.a_strides, *self.conv_args, *self.g_strides)


def weight_sq_norms(a: torch.Tensor, g: torch.Tensor, route: str, with_bias: bool,
                    conv: Optional[Conv2dGeometry] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-example ``‖G_i‖²`` (summed over groups) and, with ``with_bias``, ``‖Σ_t g_{i,t}‖²``: fp32 [B].

    Linear: a [B, T, D], g [B, T, P]. Conv (``conv`` given): a = input [B, C, (H,) W], g = output
    gradient [B, C_out, (H_out,) W_out]. The per-program partial sums are fp64 and added in fp64."""
    ops = _Operands(a, g, conv)
    B, G, T, D, P = ops.B, ops.G, ops.T, ops.D, ops.P
    bt, bd, bp = _MIN_BLOCKS
    n_tb = cdiv(T, bt)
    if route == "ghost":
        n_part, kernel = n_tb ** 2, _ghost
    elif route == "instantiate":
        n_part, kernel = cdiv(P, bp) * cdiv(D, bd), _instantiate
    else:
        raise ValueError(f"unknown per-sample norm route {route!r}; expected 'ghost' or 'instantiate'")
    dev = ops.a.device
    w_part = torch.zeros(B * G, n_part, dtype=torch.float64, device=dev)
    if not with_bias:
        b_part = w_part
    elif route == "ghost":  # per row tile: Σ_{t in tile} g_t, [B·G, n_tb, P]
        b_part = torch.zeros(B * G, n_tb, P, dtype=torch.float32, device=dev)
    else:
        b_part = torch.zeros(B * G, n_part, dtype=torch.float64, device=dev)
    if B * G > 0 and T > 0:
        if route == "ghost":
            grid = lambda meta: (B * G, cdiv(T, meta["BLOCK_T"]) ** 2)  # noqa: E731
            kernel[grid](ops.a, ops.g, w_part, b_part, T, D, P, G, n_part, n_tb, *ops.args(),
                         IS_CONV=ops.is_conv, HAS_BIAS=with_bias, PREC=ops.prec)
        else:
            grid = lambda meta: (B * G, cdiv(P, meta["BLOCK_P"]) * cdiv(D, meta["BLOCK_D"]))  # noqa: E731
            kernel[grid](ops.a, ops.g, w_part, b_part, T, D, P, G, n_part, *ops.args(),
                         IS_CONV=ops.is_conv, HAS_BIAS=with_bias, PREC=ops.prec)
    w_sq = w_part.view(B, G * n_part).sum(1).to(torch.float32)
    if not with_bias:
        return w_sq, None
    if route == "ghost":
        bias = b_part.view(B, G, n_tb, P).sum(2, dtype=torch.float64)  # [B, G, P]
        return w_sq, bias.square_().view(B, G * P).sum(1).to(torch.float32)
    return w_sq, b_part.view(B, G * n_part).sum(1).to(torch.float32)


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(n_tiles: int, n_rows: int, device: torch.device) -> int:
    """Split the B·T reduction so that the GPU has enough programs (about 4 per SM), never below 256 rows
    per split; one split in the interpreter unless the reduction is long. At most ``max(1, n_rows // 256)``
    splits, whose results :func:`sum_noise_scale` adds in fp64."""
    if device.type != "cuda":
        return max(1, min(4, n_rows // 512))
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(cdiv(4 * sms, max(n_tiles, 1)), n_rows // 256))


def clipped_sum_with_noise(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, with_bias: bool,
                           seed: int, weight_offset: int, bias_offset: int, noise_std: float,
                           conv: Optional[Conv2dGeometry] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``Σ_i scale_i G_i + noise_std·ξ`` as fp32 [G·P, D] (Linear: [P, D]; conv: reshape to the weight), and
    the bias ``Σ_i scale_i Σ_t g_{i,t} + noise_std·ξ'`` ([G·P]). ``ξ[j] = tl.randn(seed, weight_offset + j)``
    over the weight in row-major order, ``ξ'[j] = tl.randn(seed, bias_offset + j)``; no noise when
    ``noise_std == 0``."""
    ops = _Operands(a, g, conv)
    B, G, T, D, P = ops.B, ops.G, ops.T, ops.D, ops.P
    dev = ops.a.device
    scale = scale.to(device=dev, dtype=torch.float32).contiguous()
    n_rows = B * T
    has_noise = noise_std != 0.0
    bt, bd, bp = _MIN_BLOCKS
    n_split = _splits(G * cdiv(P, bp) * cdiv(D, bd), n_rows, dev)
    rows_per_split = cdiv(cdiv(n_rows, n_split), bt) * bt
    n_split = max(1, cdiv(n_rows, rows_per_split))
    weight = torch.empty(G * P, D, dtype=torch.float32, device=dev)
    bias = torch.empty(G * P, dtype=torch.float32, device=dev) if with_bias else None
    if n_split > 1:
        w_target = torch.empty(n_split, G * P, D, dtype=torch.float32, device=dev)
        b_target = torch.empty(n_split, G * P, dtype=torch.float32, device=dev) if with_bias else w_target
    else:
        w_target, b_target = weight, (bias if with_bias else weight)
    if G * P * D > 0:
        grid = lambda meta: (G * cdiv(P, meta["BLOCK_P"]) * cdiv(D, meta["BLOCK_D"]), n_split)  # noqa: E731
        _clipped[grid](ops.a, ops.g, scale, w_target, b_target, T, D, P, G, n_rows, rows_per_split, *ops.args(),
                       seed, weight_offset, bias_offset, float(noise_std),
                       IS_CONV=ops.is_conv, HAS_BIAS=with_bias, HAS_NOISE=has_noise, WRITE_SPLITS=n_split > 1,
                       LOW_PRECISION=ops.dtype != torch.float32, PREC=ops.prec, BLOCK_ROWS=CLIPPED_SUM_BLOCK_ROWS)
    if n_split > 1:
        sum_noise_scale(w_target.view(n_split, -1), weight.view(-1), seed, weight_offset, noise_std, 1.0)
        if with_bias:
            sum_noise_scale(b_target, bias, seed, bias_offset, noise_std, 1.0)
    elif G * P * D == 0 and with_bias:
        sum_noise_scale(torch.zeros(1, G * P, device=dev), bias, seed, bias_offset, noise_std, 1.0)
    return weight, bias
