"""Worst-case rounding-error bounds of the per-sample gradient kernels.

Clipping needs a norm that is provably at least the true one. The ghost route cancels: with two identical
positions and ``g_1 ≈ v``, ``g_2 ≈ −v + δ``, float32 returns ``‖G_i‖² ≈ 0`` for a huge norm. Every
bound here is therefore stated against ``S_i = Σ_t ‖a_{i,t}‖·‖g_{i,t}‖`` (for a grouped convolution
``S_i² := Σ_k S_{i,k}²``), which no cancellation can shrink, and is valid for EVERY implementation of the
ops in :mod:`.per_sample` (the C++ CPU kernels, the pure-PyTorch ones of :mod:`.torch_impl` and the Triton
kernels): each function returns the maximum over them, or the bound of one of them with ``backend=``
(``"cpu"``, ``"torch"``, ``"triton"``; ``"triton_interpreter"``: the Triton kernels in the CPU interpreter,
fp32 only, whose ``tl.dot`` is IEEE, a bound below the GPU one; :func:`backend_for` names the one that runs).

Model. Inputs are what the kernel reads (bf16/fp16 values are exact in float32). ``u`` is the unit
roundoff of the accumulation dtype (:func:`unit_roundoff`). Summing n terms x_k in ANY order (recursive,
pairwise, lane-parallel, tiled, with or without FMA) gives ``|fl(Σ x_k) − Σ x_k| ≤ γ_{n−1}·Σ|x_k|``
with ``γ_n = n·u / (1 − n·u)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1,
§4.2); a dot product of length n, products rounded or not, ``≤ γ_n·Σ|x_k y_k|`` (Higham (3.5)). Successive
relative errors compose as ``(1 + e_1)(1 + e_2) − 1``. Underflow and overflow are excluded, as usual.

What is assumed of the libraries and hardware:

* ATen/BLAS GEMMs (``mm``, ``bmm``, ``mv``) and ATen's convolution weight-gradients compute every output
  entry as a sum of the products of its inputs in some order, in the accumulation dtype: no Winograd,
  FFT or Strassen. On CPU this holds for weight-gradients (oneDNN direct convolution, or im2col + GEMM).
  The pure-PyTorch path on CUDA (fp64 inputs, Conv3d) runs cuBLAS/cuDNN, whose algorithm choice (TF32 for
  fp32 convolutions unless ``torch.backends.cudnn.allow_tf32`` is off, FFT weight-gradients) this model
  does not cover.
* Triton on a GPU, ``tl.dot`` (``dot_precision``): 16-bit operands multiply exactly into fp32.
  fp32 operands use three-pass TF32: ``x = x_hi + x_lo`` with ``x_hi`` rounded to nearest TF32
  (``|x − x_hi| ≤ 2⁻¹¹|x|``) and ``x_lo = x − x_hi`` truncated to TF32 by the tensor core (relative error
  < 2⁻¹⁰, so a residual ``≤ 2⁻²¹|x|``); ``x·y`` becomes the three exact products ``x_hi y_hi + x_hi y_lo +
  x_lo y_hi``, whose sum misses ``x·y`` by at most ``(5·2⁻²² + 2⁻⁴²)|x y|`` (:data:`TF32X3_PRODUCT_ERROR`),
  and whose magnitudes add up to at most ``(1 + 2⁻¹¹)(1 + 3·2⁻¹¹)|x y|``; a dot of length n thus adds
  3n exact products into the accumulator. Tensor cores accumulate the exact products in fp32, but not in
  IEEE round-to-nearest: Fasi, Higham, Mikaitis and Pranesh (PeerJ CS 7:e330, 2021) measured blocks of
  k ≥ 4 products added to the accumulator with alignment and normalization by truncation. Each such
  block errs by less than ``2u(k + 1)·Σ|addends|``: ``2.5u`` per product, which replaces ``u`` in γ
  (:data:`TENSOR_CORE_ROUNDOFF`). Everything else (``tl.sum``, ``+``, fp64 arithmetic) is IEEE.
  In the interpreter ``tl.dot`` is numpy's fp32 matmul (the CPU model), which the GPU bound covers.
* The 16-bit clipped sum splits the scaled gradient ``c_i·g`` (rounded once in fp32) into 16-bit
  ``hi + lo`` (round to nearest, fp32 range for bf16; fp16 needs ``|c_i g|`` in its normal range), which
  misses it by ``≤ u₁₆²|c_i g|`` (u₁₆ = 2⁻⁸ for bf16, 2⁻¹¹ for fp16); both halves multiply exactly, 2 products
  per term.

How the kernels accumulate (csrc/cpu/per_sample.cpp, :mod:`.torch_impl`, :mod:`.triton.weight_grads`):
Grams, per-example gradients and clipped sums are fp32 GEMMs / weight-gradients / ``tl.dot`` (fp64 for
fp64 inputs); every sum of squares that makes a squared norm is wide (C++: fp32 partial sums of at most
:data:`WIDE_BLOCK` squares added in fp64; PyTorch and Triton: exact fp64 squares and an fp64 sum); the ghost
route's ``Σ_{t,s} Â_ts·Ĝ_ts`` takes exact fp64 products and an fp64 sum; a per-example result is rounded to
fp32 once (fp64 inputs: kept in fp64). Clipped sums reduce the B·T rows in blocks of at most
``K0 =`` :data:`CLIPPED_SUM_BLOCK_ROWS` rows (C++/PyTorch convolutions: ``max(1, K0 // T)`` whole examples,
so ``max(K0, T)`` rows), then add the block partials in fp32; Triton adds its split partials in fp64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .torch_impl import CLIPPED_SUM_BLOCK_ROWS, clipped_sum_examples_per_block

__all__ = [
    "BACKENDS",
    "CLIPPED_SUM_BLOCK_ROWS",
    "TENSOR_CORE_ROUNDOFF",
    "TF32X3_PRODUCT_ERROR",
    "TRITON_INTERPRETER",
    "WIDE_BLOCK",
    "affine_norm_error",
    "backend_for",
    "clipped_sum_error",
    "dot_error",
    "gamma",
    "ghost_sq_norm_error",
    "instantiate_norm_error",
    "materialized_sq_norm_error",
    "per_example_clipped_sum_error",
    "unit_roundoff",
]

BACKENDS = ("cpu", "torch", "triton")
# accepted by backend=, covered by "triton" (the default maximum does not need it)
TRITON_INTERPRETER = "triton_interpreter"
# float32 squares summed in float32 before the float64 total in the C++ wide sums (kWideBlock).
WIDE_BLOCK = 256
# |x·y − (x_hi y_hi + x_hi y_lo + x_lo y_hi)| / |x·y| for three-pass TF32 (see the module docstring).
TF32X3_PRODUCT_ERROR = 5 * 2.0**-22 + 2.0**-42
# Σ of the three products' magnitudes is at most (1 + TF32X3_TERM_GROWTH)·|x·y|.
TF32X3_TERM_GROWTH = (1 + 2.0**-11) * (1 + 3 * 2.0**-11) - 1
# Roundoff per product accumulated by a tensor core, in units of u (truncating block FMA, k >= 4).
TENSOR_CORE_ROUNDOFF = 2.5

_U32, _U64 = 2.0**-24, 2.0**-53
_U16 = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of the dtype the kernels accumulate inputs of ``dtype`` in: 2⁻⁵³ for float64; 2⁻²⁴ for float32,
    bfloat16 and float16, which all accumulate in float32."""
    return _U64 if dtype == torch.float64 else _U32


def gamma(n: float, u: float) -> float:
    """``γ_n = n·u / (1 − n·u)``: the worst-case relative error of a sum of n + 1 terms (or of a dot product
    of length n) in any order, relative to the sum of the magnitudes (Higham, Lemma 3.1). inf once
    ``n·u ≥ 1``."""
    if n <= 0:
        return 0.0
    nu = n * u
    return math.inf if nu >= 1.0 else nu / (1.0 - nu)


def _compose(*errors: float) -> float:
    """Relative error of successive steps with relative errors ``e_k``: ``Π(1 + e_k) − 1``."""
    out = 1.0
    for e in errors:
        out *= 1.0 + e
    return out - 1.0


def backend_for(t: torch.Tensor) -> str:
    """The implementation the per-sample ops run on tensors like ``t`` (its error model): ``"triton"``
    where :func:`~dpsat_fast.ops.backend.use_triton` says so (``"triton_interpreter"`` for CPU tensors),
    else ``"cpu"`` for CPU tensors with the compiled extension, else ``"torch"``. Conv3d never takes
    Triton: pass ``backend="torch"`` (or None) for it."""
    from ._ext import EXTENSION_AVAILABLE
    from .backend import use_triton

    if use_triton(t):
        return "triton" if t.device.type == "cuda" else TRITON_INTERPRETER
    return "cpu" if t.device.type == "cpu" and EXTENSION_AVAILABLE else "torch"


def _backends(backend: Optional[str], dtype: torch.dtype) -> Sequence[str]:
    if backend is None:
        # Triton does not take float64 inputs (they run the pure-PyTorch ops)
        return ("cpu", "torch") if dtype == torch.float64 else BACKENDS
    if backend not in BACKENDS + (TRITON_INTERPRETER,):
        raise ValueError(f"error_bounds: backend must be one of {BACKENDS + (TRITON_INTERPRETER,)} or None, "
                         f"got {backend!r}")
    return ("torch",) if backend.startswith("triton") and dtype == torch.float64 else (backend,)


def _check(op: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if int(value) != value or value < 0:
            raise ValueError(f"{op}: {name} must be a non-negative integer, got {value!r}")


def _output_roundoff(dtype: torch.dtype) -> float:
    """A per-example result accumulated wide is rounded once to float32 (float64 inputs: not at all)."""
    return 0.0 if dtype == torch.float64 else _U32


def _tensor_core_sum(n_products: int) -> float:
    """Relative error of n exact products accumulated by tensor cores in fp32 (:data:`TENSOR_CORE_ROUNDOFF`)."""
    return gamma(n_products, TENSOR_CORE_ROUNDOFF * _U32)


def dot_error(n: int, dtype: torch.dtype, backend: Optional[str] = None) -> float:
    """e with ``|fl(Σ_{k≤n} x_k y_k) − Σ x_k y_k| ≤ e·Σ_k |x_k y_k|`` for one output entry of a GEMM, a
    convolution weight-gradient or a ``tl.dot`` chain over n terms, with operands of ``dtype``.

    CPU and PyTorch: ``γ_n`` in the accumulation dtype (any order, products rounded or exact). Triton on
    fp32 operands: ``ε₃ + (1 + μ)·γ^TC_{3n}`` with ε₃ = :data:`TF32X3_PRODUCT_ERROR`, μ =
    :data:`TF32X3_TERM_GROWTH` and γ^TC the tensor-core accumulation of the 3n exact products; 16-bit
    operands: ``γ^TC_n`` (exact products)."""
    _check("dot_error", n=n)
    worst = 0.0
    for b in _backends(backend, dtype):
        if b != "triton":  # IEEE dots (the interpreter's tl.dot is numpy's float32 matmul)
            e = gamma(n, unit_roundoff(dtype))
        elif dtype == torch.float32:
            e = TF32X3_PRODUCT_ERROR + (1 + TF32X3_TERM_GROWTH) * _tensor_core_sum(3 * n)
        else:
            e = _tensor_core_sum(n)
        worst = max(worst, e)
    return worst


def _wide_sq_sum_error(n: int, dtype: torch.dtype, backend: str) -> float:
    """Relative error of ``Σ_{k≤n} x_k²`` by the wide sum, rounded to the output dtype (x exact inputs)."""
    if dtype == torch.float64:
        return gamma(n, _U64)  # every implementation: float64 squares and sum
    if backend == "cpu":  # float32 blocks of at most WIDE_BLOCK squares, a float64 total
        return _compose(gamma(min(n, WIDE_BLOCK), _U32), gamma(math.ceil(n / WIDE_BLOCK), _U64), _U32)
    return _compose(gamma(n, _U64), _U32)  # exact float64 squares and a float64 sum


def materialized_sq_norm_error(n: int, dtype: torch.dtype, backend: Optional[str] = None) -> float:
    """ρ for the squared norm ĥ of a materialized tensor x of n elements (a per-example gradient the kernels
    hold: ``conv_per_example_grads``, ``affine_per_example_grads``, a bias gradient) computed by the wide
    sum: ``|ĥ − ‖x‖²| ≤ ρ·‖x‖²`` and ``‖x‖² ≤ ĥ·(1 + ρ)``.

    Derivation: the C++ sum adds at most :data:`WIDE_BLOCK` float32 squares in float32 (a dot product:
    ``γ^{32}_{256}``), the ``⌈n/256⌉`` block sums in float64 (``γ^{64}``), and rounds once to float32
    (``u``); PyTorch and Triton square exactly in float64 and sum in float64. With ``ρ_s`` the worst of
    these, ``|ĥ − h| ≤ ρ_s·h`` and ``h ≤ ĥ/(1 − ρ_s)``; the function returns ``ρ = ρ_s/(1 − ρ_s) ≥ ρ_s``,
    which gives both. About 1.5e-5 for float32 (n ≥ 256)."""
    _check("materialized_sq_norm_error", n=n)
    rho_s = max(_wide_sq_sum_error(n, dtype, b) for b in _backends(backend, dtype))
    return rho_s / (1.0 - rho_s)


def ghost_sq_norm_error(T: int, D: int, P: int, dtype: torch.dtype, groups: int = 1,
                        backend: Optional[str] = None) -> float:
    """α with ``|ĥ_i − ‖G_i‖²| ≤ α·S_i²`` for the ghost route (``*_weight_sq_norms(route="ghost")``), T
    positions, D = fan-in and P = outputs per group, ``groups`` groups (``S_i² = Σ_k S_{i,k}²``).

    Derivation: each Gram entry is a dot product, ``|Â_ts − a_t·a_s| ≤ e_D Σ_d |a_td||a_sd| ≤ e_D‖a_t‖‖a_s‖``
    (Cauchy-Schwarz; e_n = :func:`dot_error`), likewise ``Ĝ_ts`` with e_P. Hence
    ``|Â_ts Ĝ_ts − A_ts G_ts| ≤ e_G‖a_t‖‖a_s‖‖g_t‖‖g_s‖`` with ``e_G = (1 + e_D)(1 + e_P) − 1``, and also
    ``|Â_ts Ĝ_ts| ≤ (1 + e_G)‖a_t‖‖a_s‖‖g_t‖‖g_s‖``; summed over t, s these give ``e_G·S_i²`` and
    ``(1 + e_G)·S_i²``, since ``Σ_{t,s}‖a_t‖‖a_s‖‖g_t‖‖g_s‖ = S_i²``. The T²·groups products are formed
    exactly in float64 (rounded once for float64 inputs) and summed in float64 in any order (per tile, per
    program, over groups): ``γ^{64}_{T²·groups+1}·(1 + e_G)S_i²``. The float64 total is rounded once to
    float32: ``u·|ĥ₆₄| ≤ u(1 + α₆₄)S_i²``. So ``α = α₆₄ + u(1 + α₆₄)`` with
    ``α₆₄ = e_G + γ^{64}(1 + e_G)``; about ``(D + P)·u`` on CPU and ``7.5(D + P)·u`` for fp32 on Triton
    (TF32x3 adds three products per term; tensor cores truncate). The T = 1 shortcut
    (``‖a_i‖²·‖g_i‖²`` by wide sums) is within the same α."""
    _check("ghost_sq_norm_error", T=T, D=D, P=P, groups=groups)
    worst = 0.0
    for b in _backends(backend, dtype):
        e_gram = _compose(dot_error(D, dtype, b), dot_error(P, dtype, b))
        alpha64 = e_gram + gamma(T * T * groups + 1, _U64) * (1.0 + e_gram)
        worst = max(worst, alpha64 + _output_roundoff(dtype) * (1.0 + alpha64))
    return worst


def instantiate_norm_error(T: int, D: int, P: int, dtype: torch.dtype, groups: int = 1,
                           backend: Optional[str] = None) -> Tuple[float, float]:
    """(β, ρ) with ``‖G_i‖ ≤ sqrt(ĥ_i·(1 + ρ)) + β·S_i`` for the instantiate route
    (``*_weight_sq_norms(route="instantiate")``; also ``conv_per_example_grads``: its gradients satisfy
    ``‖Ĝ_i − G_i‖ ≤ β·S_i`` and its squared norms are within ρ of ``‖Ĝ_i‖²``).

    Derivation: each entry of ``Ĝ_i`` is a dot product over the T positions (a GEMM, a convolution
    weight-gradient or a ``tl.dot`` chain), ``|Ĝ_pd − G_pd| ≤ e_T·Σ_t |g_tp||a_td|`` (e_T = :func:`dot_error`);
    the matrix ``Σ_t |g_t||a_t|ᵀ`` has Frobenius norm ≤ ``Σ_t ‖g_t‖‖a_t‖ = S_i`` (per group; over groups
    ``sqrt(Σ_k S_{i,k}²) = S_i``), so ``‖Ĝ_i − G_i‖ ≤ β·S_i`` with β = e_T. The squared norm of the
    ``groups·P·D`` entries of ``Ĝ_i`` is a wide sum, ``‖Ĝ_i‖² ≤ ĥ_i·(1 + ρ)`` with ρ =
    :func:`materialized_sq_norm_error`; then ``‖G_i‖ ≤ ‖Ĝ_i‖ + β·S_i``. β is about ``T·u`` on CPU (a relative
    inflation of ``T^1.5·u`` when ``S_i ≈ √T·‖G_i‖``) and ``7.5·T·u`` for fp32 on Triton. Applies to bias
    norms with ``D = 1``, ``a ≡ 1``, ``S_i = Σ_t ‖g_{i,t}‖`` (every implementation sums ``Σ_t g_t``
    directly)."""
    _check("instantiate_norm_error", T=T, D=D, P=P, groups=groups)
    beta = dot_error(T, dtype, backend)
    return beta, materialized_sq_norm_error(groups * P * D, dtype, backend)


def affine_norm_error(T: int, C: int, dtype: torch.dtype, backend: Optional[str] = None) -> Tuple[float, float]:
    """(β, ρ) for ``affine_per_example_grads`` over T positions and C channels: ``‖∂w_i‖ ≤ sqrt(ĥ_i(1 + ρ)) +
    β·S_i`` with ``S_i = Σ_t ‖x̂_{i,t} ⊙ g_{i,t}‖`` (and ``‖∂b_i‖`` likewise with ``S_i = Σ_t ‖g_{i,t}‖``); the
    gradients themselves satisfy ``‖∂ŵ_i − ∂w_i‖ ≤ β·S_i``.

    Derivation: each channel is a sum over T of rounded products ``x̂_tc·g_tc`` (or of ``g_tc``) in fp32 on
    every implementation (lane loops, ATen sums, ``tl.sum``: IEEE, no tensor cores), ``γ_T·Σ_t |x̂_tc g_tc|``;
    the vector of these sums has norm ``≤ Σ_t ‖x̂_t ⊙ g_t‖``. ρ = :func:`materialized_sq_norm_error` of C
    elements. These cancel like the ghost route's terms (``g_1 ≈ −g_2``), which is why β multiplies S_i."""
    _check("affine_norm_error", T=T, C=C)
    return gamma(T, unit_roundoff(dtype)), materialized_sq_norm_error(C, dtype, backend)


def per_example_clipped_sum_error(B: int, dtype: torch.dtype) -> float:
    """κ with ``‖fl(Σ_i c_i G_i) − Σ_i c_i G_i‖ ≤ κ·Σ_i |c_i|·‖G_i‖`` for ``per_example_clipped_sum_with_noise`` of
    B materialized per-example gradients G_i (rows of ``grads``), before the noise.

    Derivation: each entry is a dot product of length B (a GEMV on CPU, ``scale @ grads`` in PyTorch, tiles of
    ``tl.sum`` of fp32 products in Triton: IEEE in every case), ``γ_B·Σ_i |c_i||G_i[k]|``, and
    ``‖Σ_i |c_i||G_i|‖ ≤ Σ_i |c_i|‖G_i‖``."""
    _check("per_example_clipped_sum_error", B=B)
    return gamma(B, unit_roundoff(dtype))


def clipped_sum_error(B: int, T: int, dtype: torch.dtype, backend: Optional[str] = None) -> float:
    """κ with ``‖fl(Σ_i c_i G_i) − Σ_i c_i G_i‖_F ≤ κ·Σ_i |c_i|·S_i`` for ``linear_clipped_sum_with_noise`` and
    ``conv_clipped_sum_with_noise`` over B examples of T positions (before the noise is added; the bias
    sum likewise, with ``a ≡ 1``, ``S_i = Σ_t ‖g_{i,t}‖``). The part attributable to example i is at most
    ``κ·|c_i|·S_i``.

    Derivation, per output entry (x_j = c_i g_tp a_td over the rows j = (i, t); ``Σ_j |x_j|`` has Frobenius
    norm ≤ ``Σ_i |c_i| S_i`` as for :func:`instantiate_norm_error`):

    * C++ and PyTorch: a block of n ≤ ``max(K0, T)`` rows is one GEMM / weight-gradient of the pre-scaled
      operand (``fl(c_i g)``: one rounding) or, for the bias, per-example sums over T and a GEMV over the
      block's examples (T + b + 1 ≤ n + 2 roundings deep): ``ε_blk = γ_{n+2}``. The ``n_b`` block partials,
      ``|P̂_b| ≤ (1 + ε_blk)Σ_b|x_j|``, are added in fp32: ``γ_{n_b}``. n_b = ``⌈B / max(1, K0 // T)⌉``
      (whole examples per block; Linear blocks of K0 rows need ``⌈B·T/K0⌉ ≤ n_b``).
    * Triton: blocks of K0 rows (flushed every K0 rows, within a split): per product the scale rounds once
      (u) and the TF32 split (:data:`TF32X3_PRODUCT_ERROR`) or the 16-bit hi/lo split (``u₁₆²``) adds its
      representation error; the 3·K0 (fp32) or 2·K0 (16-bit) exact products of a block are accumulated
      by tensor cores (``γ^TC``, magnitudes grown by ``1 + μ`` or ``(1 + u₁₆)²``). The running sum of a
      split adds at most ``⌈B·T/K0⌉`` blocks in fp32 (``γ``); at most ``B·T`` split partials are added in
      fp64 (``γ^{64}``) and rounded to fp32 once (u).

    κ is the worst of these, about ``(max(K0, T) + n_b)·u`` on CPU and ``(7.5·K0 + ⌈B·T/K0⌉)·u`` for fp32
    on Triton (K0 = :data:`CLIPPED_SUM_BLOCK_ROWS`)."""
    _check("clipped_sum_error", B=B, T=T)
    u = unit_roundoff(dtype)
    k0 = CLIPPED_SUM_BLOCK_ROWS
    worst = 0.0
    for b in _backends(backend, dtype):
        if b in ("cpu", "torch"):
            rows = min(max(k0, T), B * T)  # a block never holds more rows than there are
            n_blocks = math.ceil(B / clipped_sum_examples_per_block(T))
            kappa = _compose(gamma(rows + 2, u), gamma(n_blocks, u))
        else:
            rows = min(k0, B * T)  # rows of one block (fewer when the whole reduction is shorter)
            if b == TRITON_INTERPRETER:  # IEEE dots of the K0 scaled products (rounded once)
                product, growth, terms = 0.0, 0.0, -1
            elif dtype == torch.float32:
                product, growth, terms = TF32X3_PRODUCT_ERROR, TF32X3_TERM_GROWTH, 3 * rows
            else:
                u16 = _U16.get(dtype, 2.0**-8)
                product, growth, terms = u16 * u16, _compose(u16, u16), 2 * rows
            # a block: the scaled products (rounded once, split) accumulated by tensor cores; the bias
            # (fp32 tl.sum of the K0 scaled rows) is within the same bound
            block = gamma(rows + 1, u)
            if terms > 0:
                block = max(block, _compose(u, product) + (1.0 + _compose(u, growth)) * _tensor_core_sum(terms))
            n_blocks = math.ceil(B * T / k0)
            kappa = _compose(block, gamma(n_blocks, u), gamma(B * T, _U64), u)
        worst = max(worst, kappa)
    return worst
