"""The published rounding-error bounds (dpsat_fast/ops/error_bounds.py) hold for every implementation of the
per-sample ops, and are not vacuous.

Implementations: the C++ CPU kernels (``torch.ops.dpsat_fast.*`` on CPU tensors), the pure-PyTorch ones
(``per_sample.TORCH_IMPLS``) and the Triton kernels (``per_sample.TRITON_IMPLS``; in the interpreter without a
GPU, where 16-bit arithmetic is not faithful, so bf16 runs there only on a GPU). Inputs are fp32 or bf16;
the exact references are computed in float64 from the same (rounded) inputs.

* Crafted cancellations (identical positions, ``g ≈ ±v`` with a small δ, |v| ~ 1e3–1e4) on Linear (T = 2, 7)
  and Conv1d/Conv2d (stride, groups), both routes: ``|ĥ − h| ≤ α·S²`` (ghost), ``‖G‖ ≤ sqrt(ĥ(1 + ρ)) + β·S``
  (instantiate, and the bias), and ĥ really is far from h: with α/100 (β/100) the bound fails somewhere.
* Ordinary random inputs: the same bounds, and the relative inflation ``α·S²/h``, ``β·S/‖G‖`` below 1 %.
* Clipped sums with an adversarial example: ``‖fl(Σ c_i G_i) − Σ c_i G_i‖ ≤ κ·Σ c_i S_i``; and the block
  structure itself (a large first row does not swallow the rows of later blocks).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from dpsat_fast import ops
from dpsat_fast.ops import error_bounds as eb
from dpsat_fast.ops import per_sample, torch_impl
from dpsat_fast.ops.triton import triton_can_run

IMPLS = ["cpu", "torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# float64 reference error, far below every bound (which are multiples of 2^-24)
REF_SLACK = 1e-12


def skip_unless_runs(impl: str, dtype: torch.dtype) -> None:
    if impl == "cpu" and not ops.EXTENSION_AVAILABLE:
        pytest.skip("the compiled extension is not built")
    if impl == "triton":
        if not triton_can_run(TRITON_DEVICE):
            pytest.skip("Triton cannot run here (no CUDA, no interpreter)")
        if dtype != torch.float32 and TRITON_DEVICE.type != "cuda":
            pytest.skip("16-bit Triton arithmetic is only faithful on a GPU")


def model(impl: str) -> str:
    """The error model an implementation is checked against: its own; in the interpreter, Triton's
    ``tl.dot`` is IEEE float32 (numpy), a tighter model than the GPU's (three-pass TF32 on tensor cores)."""
    return eb.TRITON_INTERPRETER if impl == "triton" and TRITON_DEVICE.type != "cuda" else impl


def run(impl: str, name: str, first, *args):
    """One implementation of op ``name``; CPU results (float64 for the comparisons)."""
    if impl == "cpu":
        with ops.kernel_backend_as("torch"):
            out = getattr(torch.ops.dpsat_fast, name)(first, *args)
    elif impl == "torch":
        out = per_sample.TORCH_IMPLS[name](first, *args)
    else:
        args = [x.to(TRITON_DEVICE) if isinstance(x, torch.Tensor) else x for x in args]
        with ops.kernel_backend_as("triton"):
            out = per_sample.TRITON_IMPLS[name](first.to(TRITON_DEVICE), *args)
    return tuple(o.double().cpu() if o.numel() else None for o in out)


# ---------------------------------------------------------------------------------------------------
# layers: inputs, exact references, S
# ---------------------------------------------------------------------------------------------------

class Linear:
    """a [B, T, D], g [B, T, P]."""

    def __init__(self, a, g):
        self.a, self.g = a, g
        self.B, self.T, self.D = a.shape
        self.P, self.groups = g.shape[2], 1
        self.patches = (a.double(), g.double())  # [B·groups, T, D], [B·groups, T, P]

    def sq_norms(self, impl, route):
        return run(impl, "linear_weight_sq_norms", self.a, self.g, route, True)

    def clipped_sum(self, impl, scale):
        w, b = run(impl, "linear_clipped_sum_with_noise", self.a, self.g, scale, True, 0, 0, 0, 0.0)
        return w, b

    def bias_terms(self):
        return self.g.double()  # [B, T, C_out]


class Conv:
    """x [B, C, *S], g [B, C_out, *S_out] and the geometry (numeric padding)."""

    def __init__(self, x, g, weight_shape, stride, padding, dilation, groups):
        self.x, self.g = x, g
        self.args = (list(weight_shape), list(stride), list(padding), list(dilation), groups)
        self.B, self.groups = x.shape[0], groups
        a, gg = torch_impl.conv_patches_and_grads([x.double()], [g.double()], weight_shape[2:], stride, padding,
                                                  dilation, groups)
        self.patches = (a, gg)  # [B·groups, T, D], [B·groups, T, P]: exact copies of the inputs
        self.T, self.D, self.P = a.shape[1], a.shape[2], gg.shape[2]

    def sq_norms(self, impl, route):
        return run(impl, "conv_weight_sq_norms", self.x, self.g, *self.args, route, True)

    def clipped_sum(self, impl, scale):
        w, b = run(impl, "conv_clipped_sum_with_noise", self.x, self.g, scale, *self.args, True, 0, 0, 0, 0.0)
        return w.reshape(self.args[0][0], -1), b

    def bias_terms(self):
        return self.g.double().flatten(2).transpose(1, 2)  # [B, T, C_out]


def exact(layer):
    """Per-example G [B, groups·P, D], h = ‖G‖², S (S² = Σ_groups S_k²), bias b [B, C_out], S_bias."""
    a, g = layer.patches
    G = torch.einsum("ntp,ntd->npd", g, a).reshape(layer.B, layer.groups * layer.P, layer.D)
    S_k = (a.norm(dim=2) * g.norm(dim=2)).sum(1).view(layer.B, layer.groups)
    bt = layer.bias_terms()
    return G, G.pow(2).sum((1, 2)), S_k.pow(2).sum(1).sqrt(), bt.sum(1), bt.norm(dim=2).sum(1)


def rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype)


# ---------------------------------------------------------------------------------------------------
# crafted cancellations: identical positions, g ≈ v and −v + δ
# ---------------------------------------------------------------------------------------------------

def _cancelling_rows(n_pos: int, B: int, width: int, gen, small: float):
    """[B, n_pos, width]: pairs (v, −v + δ) with |v| ~ 1e3–1e4 and |δ| ~ small·(1e-2–1); an odd last
    position gets a small row of its own."""
    rows = torch.zeros(B, n_pos, width, dtype=torch.float64)
    for i in range(B):
        for t in range(0, n_pos - 1, 2):
            v = torch.randn(width, generator=gen, dtype=torch.float64) * 10 ** (3 + torch.rand(1, generator=gen).item())
            delta_scale = small * 10 ** (-2 * torch.rand(1, generator=gen).item())
            delta = torch.randn(width, generator=gen, dtype=torch.float64) * delta_scale
            rows[i, t], rows[i, t + 1] = v, -v + delta
        if n_pos % 2:
            rows[i, -1] = torch.randn(width, generator=gen, dtype=torch.float64) * small
    return rows


def linear_attacks(dtype):
    gen = torch.Generator().manual_seed(12)
    cases = []
    for T, D, P in [(2, 3, 4), (2, 5, 2), (7, 4, 3), (7, 9, 6), (2, 16, 12)]:
        for small in (1.0, 1e-2):
            B = 4
            a = (torch.randn(B, 1, D, generator=gen, dtype=torch.float64) * 10).expand(B, T, D).contiguous()
            g = _cancelling_rows(T, B, P, gen, small)
            cases.append(Linear(rounded(a, dtype), rounded(g, dtype)))
    # one dominant position among T = 256 (D = P = 1): the T² terms L², L·s, s² with s = u·L/2; a float32 sum
    # of them drops (ties to even) the L·s terms that meet L² in a partial sum, beyond α ≈ 3u
    B, T = 2, 256
    g = torch.full((B, T, 1), 2.0**-25)
    g[:, 0] = 1.0
    cases.append(Linear(rounded(torch.ones(B, T, 1), dtype), rounded(g, dtype)))
    return cases


# (C_in, C_out, kernel, stride, groups, spatial): no padding, so a spatially constant input has identical patches
CONV_ATTACKS = [
    (2, 3, (3,), (1,), 1, (9,)),
    (4, 4, (3,), (2,), 2, (11,)),
    (2, 3, (3, 3), (1, 1), 1, (5, 6)),
    (4, 6, (3, 2), (2, 1), 2, (7, 6)),
    (3, 3, (2, 2), (1, 1), 3, (4, 5)),  # depthwise
]


def conv_attacks(dtype):
    gen = torch.Generator().manual_seed(34)
    cases = []
    for c_in, c_out, k, s, groups, spatial in CONV_ATTACKS:
        for small in (1.0, 1e-2):
            B = 3
            x = torch.randn(B, c_in, *([1] * len(spatial)), generator=gen, dtype=torch.float64) * 10
            x = x.expand(B, c_in, *spatial).contiguous()
            out = [(n - kk) // st + 1 for n, kk, st in zip(spatial, k, s)]
            T = math.prod(out)
            g = _cancelling_rows(T, B, c_out, gen, small)  # [B, T, C_out]
            g = g.transpose(1, 2).reshape(B, c_out, *out).contiguous()
            weight_shape = [c_out, c_in // groups, *k]
            cases.append(Conv(rounded(x, dtype), rounded(g, dtype), weight_shape, s, [0] * len(k), [1] * len(k),
                              groups))
    return cases


def ordinary_cases(dtype):
    gen = torch.Generator().manual_seed(56)

    def rnd(*shape):
        return rounded(torch.randn(*shape, generator=gen, dtype=torch.float64), dtype)

    cases = [Linear(rnd(3, 13, 19), rnd(3, 13, 6)), Linear(rnd(2, 37, 5), rnd(2, 37, 33)),
             Linear(rnd(4, 1, 64), rnd(4, 1, 10))]
    for c_in, c_out, k, s, p, groups, spatial in [(3, 8, (3, 3), (1, 1), (1, 1), 1, (9, 8)),
                                                 (8, 6, (3, 3), (2, 2), (1, 1), 2, (9, 9)),
                                                 (4, 5, (5,), (1,), (2,), 1, (17,))]:
        x = rnd(3, c_in, *spatial)
        out = [(n + 2 * pp - kk) // st + 1 for n, kk, st, pp in zip(spatial, k, s, p)]
        cases.append(Conv(x, rnd(3, c_out, *out), [c_out, c_in // groups, *k], s, p, [1] * len(k), groups))
    return cases


def attack_cases(dtype):
    return linear_attacks(dtype) + conv_attacks(dtype)


# ---------------------------------------------------------------------------------------------------
# the bounds themselves
# ---------------------------------------------------------------------------------------------------

def ghost_excess(layer, h_hat, h, S, alpha):
    """max over examples of |ĥ − h| / (α·S²) (the bound holds iff ≤ 1)."""
    return ((h_hat - h).abs() / (alpha * S.pow(2) + REF_SLACK * S.pow(2) + 1e-300)).max().item()


def instantiate_excess(h_hat, norm, S, beta, rho):
    """max over examples of (‖G‖ − sqrt(ĥ(1 + ρ))) / (β·S) (the bound holds iff ≤ 1)."""
    gap = norm - (h_hat.clamp_min(0) * (1 + rho)).sqrt()
    return (gap / (beta * S + REF_SLACK * S + 1e-300)).max().item()


def check_norm_bounds(layer, impl, dtype, route):
    """Asserts the bounds on one layer; returns (max excess with the published constants, max relative error
    |ĥ − h|/h of the weight norm)."""
    G, h, S, bias, S_b = exact(layer)
    w_hat, b_hat = layer.sq_norms(impl, route)
    T, D, P, groups = layer.T, layer.D, layer.P, layer.groups
    if route == "ghost":
        alpha = eb.ghost_sq_norm_error(T, D, P, dtype, groups, backend=model(impl))
        excess = ghost_excess(layer, w_hat, h, S, alpha)
        assert excess <= 1, f"{impl} ghost: |ĥ − h| = {excess:.3g}·α·S² (α = {alpha:.3g})"
    else:
        beta, rho = eb.instantiate_norm_error(T, D, P, dtype, groups, backend=model(impl))
        excess = instantiate_excess(w_hat, h.sqrt(), S, beta, rho)
        assert excess <= 1, f"{impl} instantiate: ‖G‖ − sqrt(ĥ(1+ρ)) = {excess:.3g}·β·S (β = {beta:.3g})"
    # the bias, Σ_t g_t summed directly by every implementation: the instantiate form with D = 1
    beta_b, rho_b = eb.instantiate_norm_error(T, 1, bias.shape[1], dtype, backend=model(impl))
    b_excess = instantiate_excess(b_hat, bias.norm(dim=1), S_b, beta_b, rho_b)
    assert b_excess <= 1, f"{impl} {route} bias: ‖b‖ − sqrt(ĥ(1+ρ)) = {b_excess:.3g}·β·S"
    rel = ((w_hat - h).abs() / h.clamp_min(1e-300)).max().item()
    return excess, rel


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("route", ["ghost", "instantiate"])
def test_norm_bounds_hold_under_cancellation_and_are_not_vacuous(route, impl, dtype):
    skip_unless_runs(impl, dtype)
    results = [check_norm_bounds(layer, impl, dtype, route) for layer in attack_cases(dtype)]
    worst_excess = max(e for e, _ in results)
    worst_rel = max(r for _, r in results)
    # the attack works: some ĥ is far from h (in relative terms) ...
    assert worst_rel > (0.5 if route == "ghost" else 1e-3), f"{impl} {route}: the crafted inputs did not cancel"
    # ... and a bound 100 times smaller would have been violated: the published constant is not vacuous
    assert worst_excess > 1e-2, f"{impl} {route}: bound/100 still holds everywhere (max excess {worst_excess:.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("route", ["ghost", "instantiate"])
def test_norm_bounds_on_ordinary_inputs_inflate_little(route, impl, dtype):
    skip_unless_runs(impl, dtype)
    for layer in ordinary_cases(dtype):
        check_norm_bounds(layer, impl, dtype, route)
        _, h, S, _, _ = exact(layer)
        T, D, P, groups = layer.T, layer.D, layer.P, layer.groups
        # the published constants (every implementation): the clipping norm grows by well under 1 %
        if route == "ghost":
            inflation = (eb.ghost_sq_norm_error(T, D, P, dtype, groups) * S.pow(2) / h).max().item()
        else:
            beta, rho = eb.instantiate_norm_error(T, D, P, dtype, groups)
            inflation = (beta * S / h.sqrt()).max().item() + rho
        assert inflation < 1e-2, f"{route} T={T} D={D} P={P}: inflation {inflation:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_affine_norm_bounds_under_cancellation(impl, dtype):
    """Norm layers: ∂w_i = Σ_t x̂_t ⊙ g_t and ∂b_i = Σ_t g_t with identical x̂_t and g ≈ ±v cancel too."""
    skip_unless_runs(impl, dtype)
    gen = torch.Generator().manual_seed(90)
    B, T, C = 4, 7, 37
    xhat = rounded(torch.randn(B, 1, C, generator=gen, dtype=torch.float64).expand(B, T, C).contiguous(), dtype)
    g = rounded(_cancelling_rows(T, B, C, gen, 1.0), dtype)
    x64, g64 = xhat.double(), g.double()
    dw, db, w_sq, b_sq = run(impl, "affine_per_example_grads", xhat, g, True, True)
    for grad, sq, terms, name in ((dw, w_sq, x64 * g64, "weight"), (db, b_sq, g64, "bias")):
        ref = terms.sum(1)
        S = terms.norm(dim=2).sum(1)
        beta, rho = eb.affine_norm_error(T, C, dtype, backend=model(impl))
        assert ((grad - ref).norm(dim=1) <= (beta + REF_SLACK) * S).all(), f"{impl} {name} gradient"
        excess = instantiate_excess(sq, ref.norm(dim=1), S, beta, rho)
        assert excess <= 1, f"{impl} {name}: ‖∂‖ − sqrt(ĥ(1+ρ)) = {excess:.3g}·β·S"


# ---------------------------------------------------------------------------------------------------
# clipped sums
# ---------------------------------------------------------------------------------------------------

def clipped_sum_cases(dtype):
    """Layers with one crafted example among ordinary ones, and B·T above K0 (several blocks)."""
    gen = torch.Generator().manual_seed(78)
    B, T, D, P = 160, 9, 5, 4  # 1440 rows: two blocks of K0
    a = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    g = torch.randn(B, T, P, generator=gen, dtype=torch.float64)
    a[7] = a[7, :1].expand(T, D) * 10
    g[7, :8] = _cancelling_rows(8, 1, P, gen, 1.0)[0]
    cases = [Linear(rounded(a, dtype), rounded(g, dtype))]
    attacks = conv_attacks(dtype)
    for index in 1, 3:
        conv = attacks[2 * index]
        ordinary = torch.randn(conv.x.shape, generator=gen, dtype=torch.float64)
        copies = math.ceil(3 * torch_impl.CLIPPED_SUM_BLOCK_ROWS / (conv.B * conv.T))  # several blocks
        x = torch.cat([conv.x.double(), ordinary.repeat(copies, *([1] * (conv.x.dim() - 1)))])
        g = torch.cat([conv.g.double(), torch.randn((x.shape[0] - conv.B, *conv.g.shape[1:]), generator=gen,
                                                    dtype=torch.float64)])
        cases.append(Conv(rounded(x, dtype), rounded(g, dtype), *conv.args))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_clipped_sum_bound_with_an_adversarial_example(impl, dtype):
    skip_unless_runs(impl, dtype)
    for layer in clipped_sum_cases(dtype):
        G, _, S, bias, S_b = exact(layer)
        scale = torch.rand(layer.B, dtype=torch.float64).float()
        c = scale.double()
        w_hat, b_hat = layer.clipped_sum(impl, scale)
        kappa = eb.clipped_sum_error(layer.B, layer.T, dtype, backend=model(impl))
        w_err = (w_hat - torch.einsum("b,bpd->pd", c, G)).norm().item()
        b_err = (b_hat - c @ bias).norm().item()
        assert w_err <= (kappa + REF_SLACK) * (c * S).sum().item(), f"{impl}: weight error {w_err:.3g}"
        assert b_err <= (kappa + REF_SLACK) * (c * S_b).sum().item(), f"{impl}: bias error {b_err:.3g}"


def _one_large_row_then_small_ones(n_rows: int, large: float, small: float):
    """Linear with T = 1, D = P = 1, a = 1: g = large in row 0, small in every other row."""
    g = torch.full((n_rows, 1, 1), small)
    g[0] = large
    return torch.ones(n_rows, 1, 1), g


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_clipped_sum_blocks_keep_small_rows_after_a_large_one(impl):
    """2^20 rows: 2^24 then 0.5s. A sum of 0.5 into 2^24 is lost (half an ulp, ties to even); within a block
    of K0 rows the 0.5s add up exactly and their block sum survives. Without the blocks the lane of the
    GEMM that holds 2^24 loses its share of the 0.5s, far beyond κ."""
    skip_unless_runs(impl, torch.float32)
    n = 1 << 20
    a, g = _one_large_row_then_small_ones(n, 2.0**24, 0.5)
    w, _ = run(impl, "linear_clipped_sum_with_noise", a, g, torch.ones(n), False, 0, 0, 0, 0.0)
    exact_sum = 2.0**24 + 0.5 * (n - 1)
    kappa = eb.clipped_sum_error(n, 1, torch.float32, backend=impl)
    err, bound = abs(w.item() - exact_sum), kappa * (2.0**24 + 0.5 * (n - 1))
    assert err <= bound, f"{impl}: error {err:.4g} above κ·Σ c_i S_i = {bound:.4g}"


def test_triton_clipped_sum_flushes_a_block_every_k0_rows(monkeypatch):
    """One split, 2·K0 rows: 2^24 then 2^-5s. Every 16-row tile sum (0.5) added to 2^24 is lost, so the first
    block returns 2^24; the second block's K0·2^-5 = 32 is exact and survives only if blocks are flushed."""
    skip_unless_runs("triton", torch.float32)
    from dpsat_fast.ops.triton import weight_grads

    monkeypatch.setattr(weight_grads, "_splits", lambda *args: 1)
    k0 = torch_impl.CLIPPED_SUM_BLOCK_ROWS
    a, g = _one_large_row_then_small_ones(2 * k0, 2.0**24, 2.0**-5)
    w, _ = run("triton", "linear_clipped_sum_with_noise", a, g, torch.ones(2 * k0), False, 0, 0, 0, 0.0)
    assert w.item() == 2.0**24 + k0 * 2.0**-5


def test_block_rows_agree_across_implementations():
    """K0 is defined once in Python (torch_impl, used by Triton and the error bounds) and mirrored in C++."""
    source = (Path(__file__).resolve().parent.parent / "csrc" / "cpu" / "per_sample.cpp").read_text()
    match = re.search(r"constexpr int64_t kClippedSumBlockRows = (\d+);", source)
    assert match and int(match.group(1)) == torch_impl.CLIPPED_SUM_BLOCK_ROWS == eb.CLIPPED_SUM_BLOCK_ROWS
    match = re.search(r"constexpr int64_t kWideBlock = (\d+);", source)
    assert match and int(match.group(1)) == eb.WIDE_BLOCK


# ---------------------------------------------------------------------------------------------------
# the formulas
# ---------------------------------------------------------------------------------------------------

def test_gamma_and_unit_roundoff():
    assert eb.unit_roundoff(torch.float32) == eb.unit_roundoff(torch.bfloat16) == 2.0**-24
    assert eb.unit_roundoff(torch.float64) == 2.0**-53
    u = 2.0**-24
    assert eb.gamma(0, u) == 0.0 and eb.gamma(10, u) == pytest.approx(10 * u, rel=1e-6)
    assert eb.gamma(2**24, u) == math.inf


def test_bounds_grow_with_the_sizes_and_cover_every_backend():
    f32 = torch.float32
    for fn, args in [(eb.ghost_sq_norm_error, (16, 64, 32)), (lambda *a, **k: eb.instantiate_norm_error(*a, **k)[0],
                                                              (16, 64, 32))]:
        base = fn(*args, f32)
        assert all(base >= fn(*args, f32, backend=b) for b in eb.BACKENDS)
        assert fn(2 * args[0], *args[1:], f32) >= base
    assert eb.ghost_sq_norm_error(16, 128, 32, f32) > eb.ghost_sq_norm_error(16, 64, 32, f32)
    # CPU: about (D + P)·u for the ghost route, T·u for the instantiate route
    assert eb.ghost_sq_norm_error(16, 64, 32, f32, backend="cpu") == pytest.approx(98 * 2.0**-24, rel=0.05)
    assert eb.instantiate_norm_error(16, 64, 32, f32, backend="cpu")[0] == pytest.approx(16 * 2.0**-24, rel=1e-3)
    kappa = eb.clipped_sum_error(256, 1024, f32, backend="cpu")
    assert kappa == pytest.approx((1024 + 2 + 256) * 2.0**-24, rel=0.01)
    assert eb.clipped_sum_error(256, 1024, f32) >= kappa
    assert eb.clipped_sum_error(4, 3000, f32, backend="cpu") > eb.clipped_sum_error(4, 1000, f32, backend="cpu")
    # float64 never takes Triton
    assert eb.ghost_sq_norm_error(16, 64, 32, torch.float64) == eb.ghost_sq_norm_error(16, 64, 32, torch.float64,
                                                                                        backend="cpu")
    # the interpreter's IEEE dots are covered by the GPU model
    for T in (1, 30, 2000):
        assert eb.clipped_sum_error(64, T, f32, backend=eb.TRITON_INTERPRETER) <= eb.clipped_sum_error(64, T, f32)
        assert eb.ghost_sq_norm_error(T, 9, 5, f32, backend=eb.TRITON_INTERPRETER) <= eb.ghost_sq_norm_error(T, 9, 5,
                                                                                                           f32)
    with pytest.raises(ValueError, match="backend"):
        eb.ghost_sq_norm_error(16, 64, 32, f32, backend="gpu")
