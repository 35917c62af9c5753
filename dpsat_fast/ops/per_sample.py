"""Per-sample gradient ops: squared norms and clipped noisy sums of layer gradients (docs/algorithms.md §3–4).

Each op is a ``torch.ops.dpsat_fast`` op declared once, in csrc/dpsat_fast.cpp, with a fake (meta)
implementation registered here, so ``torch.compile`` can trace code that calls it. Implementations per
device: the C++ kernels of the extension for CPU tensors (csrc/cpu/per_sample.cpp); Triton for CUDA
tensors (:mod:`.triton`, chosen by :mod:`.backend`); pure PyTorch (:mod:`.torch_impl`) where neither
runs: CUDA tensors Triton does not take (fp64, Conv3d), and CPU tensors when the extension is not built
(the ops are then defined here, from :data:`SCHEMAS`). The typed wrappers below are the public surface;
they validate arguments and turn the ops' empty placeholder outputs into ``None``.

Weight ops take the tensors that define ``G_i = g_iᵀ a_i``: Linear ``a`` [B, T, D] and ``g`` [B, T, P];
a convolution's input ``x`` [B, C, *S] and output gradient ``g`` [B, C_out, *S_out] with its geometry
(numeric symmetric padding). Results are fp32 (fp64 for fp64 inputs); every implementation accumulates
so that :mod:`.error_bounds` bounds its rounding error against ``S_i = Σ_t ‖a_{i,t}‖·‖g_{i,t}‖`` (squared
norms and the ghost double sum in fp64, clipped sums in blocks of ``CLIPPED_SUM_BLOCK_ROWS`` rows). Noise
``ξ[j] = tl.randn(seed, offset + j)`` is added in row-major order of the parameter; ``noise_std = 0`` adds
none.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import torch_impl
from ._ext import EXTENSION_AVAILABLE
from .backend import use_triton
from .noise import _check_seed_offset, add_noise_and_scale_
from .torch_impl import accum_dtype

__all__ = [
    "affine_per_example_grads",
    "choose_route",
    "conv_clipped_sum_with_noise",
    "conv_per_example_grads",
    "conv_weight_sq_norms",
    "linear_clipped_sum_with_noise",
    "linear_weight_sq_norms",
    "per_example_clipped_sum_with_noise",
]

_LIB = "dpsat_fast"
_ROUTES = ("ghost", "instantiate")


def _empty(like: Tensor) -> Tensor:
    return torch.empty(0, dtype=accum_dtype(like), device=like.device)


def _noise_(t: Tensor, seed: int, offset: int, noise_std: float) -> Tensor:
    if noise_std != 0.0:
        add_noise_and_scale_(t, seed, offset, noise_std, 1.0)
    return t


def _conv_triton_ok(x: Tensor, weight_shape: Sequence[int]) -> bool:
    return len(weight_shape) in (3, 4) and use_triton(x)


def _conv_geometry(weight_shape, stride, padding, dilation, groups):
    from .triton.weight_grads import Conv2dGeometry

    return Conv2dGeometry.from_nd(list(weight_shape[2:]), list(stride), list(padding), list(dilation), groups)


# ------------------------------------------------------------------------------------------------------
# op registration
# ------------------------------------------------------------------------------------------------------

# The schemas as csrc/dpsat_fast.cpp declares them. They define the ops here only when the compiled
# extension is not loaded; tests/test_cpu_kernels.py checks that the two copies agree.
SCHEMAS = {
    "linear_weight_sq_norms": "linear_weight_sq_norms(Tensor a, Tensor g, str route, bool with_bias) -> (Tensor, Tensor)",
    "conv_weight_sq_norms": "conv_weight_sq_norms(Tensor x, Tensor g, int[] weight_shape, int[] stride, int[] padding, "
                            "int[] dilation, int groups, str route, bool with_bias) -> (Tensor, Tensor)",
    "conv_per_example_grads": "conv_per_example_grads(Tensor x, Tensor g, int[] weight_shape, int[] stride, "
                              "int[] padding, int[] dilation, int groups, bool with_bias) -> (Tensor, Tensor, Tensor, "
                              "Tensor)",
    "linear_clipped_sum_with_noise": "linear_clipped_sum_with_noise(Tensor a, Tensor g, Tensor scale, bool with_bias, "
                                     "int seed, int weight_offset, int bias_offset, float noise_std) -> (Tensor, Tensor)",
    "conv_clipped_sum_with_noise": "conv_clipped_sum_with_noise(Tensor x, Tensor g, Tensor scale, int[] weight_shape, "
                                   "int[] stride, int[] padding, int[] dilation, int groups, bool with_bias, int seed, "
                                   "int weight_offset, int bias_offset, float noise_std) -> (Tensor, Tensor)",
    "affine_per_example_grads": "affine_per_example_grads(Tensor xhat, Tensor g, bool with_weight, bool with_bias) -> "
                                "(Tensor, Tensor, Tensor, Tensor)",
    "per_example_clipped_sum_with_noise": "per_example_clipped_sum_with_noise(Tensor grads, Tensor scale, int seed, "
                                          "int offset, float noise_std) -> Tensor",
}

# -- pure PyTorch implementations: CPU without the extension; CUDA where Triton does not run --------------


def _torch_linear_weight_sq_norms(a, g, route, with_bias):
    w = torch_impl.weight_sq_norms(a, g, route)
    b = torch_impl.row_sq_norms(torch_impl.bias_per_example_grads(g)) if with_bias else _empty(a)
    return w, b


def _torch_conv_weight_sq_norms(x, g, weight_shape, stride, padding, dilation, groups, route, with_bias):
    w = torch_impl.conv_weight_sq_norms(x, g, weight_shape, stride, padding, dilation, groups, route)
    b = torch_impl.row_sq_norms(torch_impl.conv_bias_per_example_grads(g)) if with_bias else _empty(x)
    return w, b


def _torch_conv_per_example_grads(x, g, weight_shape, stride, padding, dilation, groups, with_bias):
    pe = torch_impl.conv_per_example_grads(x, g, weight_shape, stride, padding, dilation, groups)
    db = torch_impl.conv_bias_per_example_grads(g) if with_bias else _empty(x)
    return pe, db, torch_impl.row_sq_norms(pe), torch_impl.row_sq_norms(db) if with_bias else _empty(x)


def _torch_linear_clipped_sum(a, g, scale, with_bias, seed, weight_offset, bias_offset, noise_std):
    w, b = torch_impl.linear_clipped_sum(a, g, scale, with_bias)
    w = _noise_(w, seed, weight_offset, noise_std)
    b = _noise_(b, seed, bias_offset, noise_std) if with_bias else _empty(a)
    return w, b


def _torch_conv_clipped_sum(x, g, scale, weight_shape, stride, padding, dilation, groups, with_bias, seed,
                            weight_offset, bias_offset, noise_std):
    w, b = torch_impl.conv_clipped_sum(x, g, scale, weight_shape, stride, padding, dilation, groups, with_bias)
    w = _noise_(w.contiguous(), seed, weight_offset, noise_std)
    b = _noise_(b, seed, bias_offset, noise_std) if with_bias else _empty(x)
    return w, b


def _torch_affine_grads(xhat, g, with_weight, with_bias):
    dt = accum_dtype(g)
    gd = g.to(dt)
    dw = (xhat.to(dt) * gd).sum(1) if with_weight else _empty(g)
    db = gd.sum(1) if with_bias else _empty(g)
    return (dw, db, torch_impl.row_sq_norms(dw) if with_weight else _empty(g),
            torch_impl.row_sq_norms(db) if with_bias else _empty(g))


def _torch_per_example_clipped_sum(grads, scale, seed, offset, noise_std):
    dt = accum_dtype(grads)
    return _noise_(scale.to(dt) @ grads.to(dt), seed, offset, noise_std)


TORCH_IMPLS = {
    "linear_weight_sq_norms": _torch_linear_weight_sq_norms,
    "conv_weight_sq_norms": _torch_conv_weight_sq_norms,
    "conv_per_example_grads": _torch_conv_per_example_grads,
    "linear_clipped_sum_with_noise": _torch_linear_clipped_sum,
    "conv_clipped_sum_with_noise": _torch_conv_clipped_sum,
    "affine_per_example_grads": _torch_affine_grads,
    "per_example_clipped_sum_with_noise": _torch_per_example_clipped_sum,
}

# -- Triton implementations (CUDA; CPU tensors only under the interpreter) ------------------------------


def _triton_linear_weight_sq_norms(a, g, route, with_bias):
    from .triton.weight_grads import weight_sq_norms

    w, b = weight_sq_norms(a, g, route, with_bias)
    return w, (b if with_bias else _empty(a))


def _triton_conv_weight_sq_norms(x, g, weight_shape, stride, padding, dilation, groups, route, with_bias):
    if not _conv_triton_ok(x, weight_shape):
        return _torch_conv_weight_sq_norms(x, g, weight_shape, stride, padding, dilation, groups, route, with_bias)
    from .triton.weight_grads import weight_sq_norms

    geometry = _conv_geometry(weight_shape, stride, padding, dilation, groups)
    w, b = weight_sq_norms(x, g, route, with_bias, geometry)
    return w, (b if with_bias else _empty(x))


def _triton_linear_clipped_sum(a, g, scale, with_bias, seed, weight_offset, bias_offset, noise_std):
    from .triton.weight_grads import clipped_sum_with_noise

    w, b = clipped_sum_with_noise(a, g, scale, with_bias, seed, weight_offset, bias_offset, noise_std)
    return w, (b if with_bias else _empty(a))


def _triton_conv_clipped_sum(x, g, scale, weight_shape, stride, padding, dilation, groups, with_bias, seed,
                             weight_offset, bias_offset, noise_std):
    if not _conv_triton_ok(x, weight_shape):
        return _torch_conv_clipped_sum(x, g, scale, weight_shape, stride, padding, dilation, groups, with_bias,
                                       seed, weight_offset, bias_offset, noise_std)
    from .triton.weight_grads import clipped_sum_with_noise

    geometry = _conv_geometry(weight_shape, stride, padding, dilation, groups)
    w, b = clipped_sum_with_noise(x, g, scale, with_bias, seed, weight_offset, bias_offset, noise_std, geometry)
    return w.view(tuple(weight_shape)), (b if with_bias else _empty(x))


def _triton_affine_grads(xhat, g, with_weight, with_bias):
    from .triton.affine import affine_per_example_grads as triton_affine

    outs = triton_affine(xhat, g, with_weight, with_bias)
    return tuple(o if o is not None else _empty(g) for o in outs)


def _triton_per_example_clipped_sum(grads, scale, seed, offset, noise_std):
    from .triton.noise import per_example_clipped_sum

    return per_example_clipped_sum(grads, scale, seed, offset, noise_std)


TRITON_IMPLS = {
    "linear_weight_sq_norms": _triton_linear_weight_sq_norms,
    "conv_weight_sq_norms": _triton_conv_weight_sq_norms,
    "linear_clipped_sum_with_noise": _triton_linear_clipped_sum,
    "conv_clipped_sum_with_noise": _triton_conv_clipped_sum,
    "affine_per_example_grads": _triton_affine_grads,
    "per_example_clipped_sum_with_noise": _triton_per_example_clipped_sum,
}


def _device_impl(name: str):
    """Triton where it runs on these tensors (its own checks fall back to PyTorch), else PyTorch."""
    torch_fn, triton_fn = TORCH_IMPLS[name], TRITON_IMPLS.get(name)

    def impl(first, *args):
        if triton_fn is not None and use_triton(first):
            return triton_fn(first, *args)
        return torch_fn(first, *args)

    impl.__name__ = f"{name}_device"
    return impl


# -- fakes: output shapes and dtypes, and the preconditions torch.compile can check ---------------------


def _fake_linear_weight_sq_norms(a, g, route, with_bias):
    torch._check(a.dim() == 3 and g.dim() == 3, lambda: "linear_weight_sq_norms: a and g must be [B, T, *]")
    torch._check(route in _ROUTES, lambda: f"linear_weight_sq_norms: route must be one of {_ROUTES}")
    dt = accum_dtype(a)
    return a.new_empty(a.shape[0], dtype=dt), a.new_empty(a.shape[0] if with_bias else 0, dtype=dt)


def _fake_conv_weight_sq_norms(x, g, weight_shape, stride, padding, dilation, groups, route, with_bias):
    torch._check(x.dim() == len(weight_shape), lambda: "conv_weight_sq_norms: x and the weight differ in rank")
    torch._check(route in _ROUTES, lambda: f"conv_weight_sq_norms: route must be one of {_ROUTES}")
    dt = accum_dtype(x)
    return x.new_empty(x.shape[0], dtype=dt), x.new_empty(x.shape[0] if with_bias else 0, dtype=dt)


def _fake_conv_per_example_grads(x, g, weight_shape, stride, padding, dilation, groups, with_bias):
    torch._check(x.dim() == len(weight_shape), lambda: "conv_per_example_grads: x and the weight differ in rank")
    dt, B = accum_dtype(x), x.shape[0]
    return (x.new_empty((B, *weight_shape), dtype=dt),
            x.new_empty((B, weight_shape[0]) if with_bias else (0,), dtype=dt),
            x.new_empty(B, dtype=dt), x.new_empty(B if with_bias else 0, dtype=dt))


def _fake_linear_clipped_sum(a, g, scale, with_bias, seed, weight_offset, bias_offset, noise_std):
    torch._check(a.dim() == 3 and g.dim() == 3, lambda: "linear_clipped_sum_with_noise: a, g must be [B, T, *]")
    torch._check(scale.shape == (a.shape[0],), lambda: "linear_clipped_sum_with_noise: scale must be [B]")
    dt = accum_dtype(a)
    return a.new_empty(g.shape[2], a.shape[2], dtype=dt), a.new_empty(g.shape[2] if with_bias else 0, dtype=dt)


def _fake_conv_clipped_sum(x, g, scale, weight_shape, stride, padding, dilation, groups, with_bias, seed,
                           weight_offset, bias_offset, noise_std):
    torch._check(scale.shape == (x.shape[0],), lambda: "conv_clipped_sum_with_noise: scale must be [B]")
    dt = accum_dtype(x)
    return x.new_empty(tuple(weight_shape), dtype=dt), x.new_empty(weight_shape[0] if with_bias else 0, dtype=dt)


def _fake_affine_grads(xhat, g, with_weight, with_bias):
    torch._check(g.dim() == 3, lambda: "affine_per_example_grads: g must be [B, T, C]")
    torch._check(xhat.shape == g.shape, lambda: "affine_per_example_grads: xhat and g must have one shape")
    dt = accum_dtype(g)
    B, _, C = g.shape
    grads = [g.new_empty((B, C) if flag else (0,), dtype=dt) for flag in (with_weight, with_bias)]
    norms = [g.new_empty(B if flag else 0, dtype=dt) for flag in (with_weight, with_bias)]
    return grads[0], grads[1], norms[0], norms[1]


def _fake_per_example_clipped_sum(grads, scale, seed, offset, noise_std):
    torch._check(grads.dim() == 2, lambda: "per_example_clipped_sum_with_noise: grads must be [B, K]")
    torch._check(scale.shape == (grads.shape[0],), lambda: "per_example_clipped_sum_with_noise: scale must be [B]")
    return grads.new_empty(grads.shape[1], dtype=accum_dtype(grads))


_FAKES = {
    "linear_weight_sq_norms": _fake_linear_weight_sq_norms,
    "conv_weight_sq_norms": _fake_conv_weight_sq_norms,
    "conv_per_example_grads": _fake_conv_per_example_grads,
    "linear_clipped_sum_with_noise": _fake_linear_clipped_sum,
    "conv_clipped_sum_with_noise": _fake_conv_clipped_sum,
    "affine_per_example_grads": _fake_affine_grads,
    "per_example_clipped_sum_with_noise": _fake_per_example_clipped_sum,
}


def _register() -> torch.library.Library:
    """CPU: the C++ kernels of the extension (or, without it, PyTorch, with the schemas defined here);
    CUDA: Triton or PyTorch (:func:`_device_impl`); Meta/fake: :data:`_FAKES`."""
    lib = torch.library.Library(_LIB, "FRAGMENT")
    for name, schema in SCHEMAS.items():
        if not EXTENSION_AVAILABLE:
            lib.define(schema)
            lib.impl(name, TORCH_IMPLS[name], "CPU")
        lib.impl(name, _device_impl(name), "CUDA")
        torch.library.register_fake(f"{_LIB}::{name}", _FAKES[name], lib=lib)
    return lib


_lib = _register()


def _call(name: str, like: Tensor, *args):
    """The op ``dpsat_fast::name``, except that CPU tensors under the Triton backend (the interpreter: how
    the Triton kernels are tested without a GPU) go straight to the Triton implementation."""
    if like.device.type == "cpu" and name in TRITON_IMPLS and use_triton(like):
        return TRITON_IMPLS[name](like, *args)
    return getattr(torch.ops.dpsat_fast, name)(like, *args)


# ------------------------------------------------------------------------------------------------------
# routes
# ------------------------------------------------------------------------------------------------------

_measured_routes: Dict[tuple, str] = {}


def choose_route(T: int, D: int, P: int) -> str:
    """The FLOP model: 'ghost' when 2T²(D+P) < 2TDP, else 'instantiate' (T = 1 is always ghost)."""
    return torch_impl.choose_route(T, D, P)


def _cuda_time_ms(fn, reps: int = 3) -> float:
    """Mean CUDA-event time of ``fn()`` after one warm-up call (which also autotunes)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _measured_route(key: tuple, run, time_ms=_cuda_time_ms) -> str:
    """On CUDA with Triton: time both routes once per layer shape and keep the faster (cached by ``key``)."""
    route = _measured_routes.get(key)
    if route is None:
        times = {r: time_ms(lambda r=r: run(r)) for r in _ROUTES}
        route = min(times, key=times.get)
        _measured_routes[key] = route
    return route


def _resolve_route(route: Optional[str], key: tuple, like: Tensor, T: int, D: int, P: int, run) -> str:
    if route is not None:
        if route not in _ROUTES:
            raise ValueError(f"unknown per-sample norm route {route!r}; expected one of {_ROUTES}")
        return route
    if like.device.type == "cuda" and use_triton(like) and T > 1:
        return _measured_route(key, run)
    return choose_route(T, D, P)


# ------------------------------------------------------------------------------------------------------
# public wrappers
# ------------------------------------------------------------------------------------------------------


def _bias_or_none(b: Tensor, with_bias: bool) -> Optional[Tensor]:
    return b if with_bias else None


def linear_weight_sq_norms(a: Tensor, g: Tensor, route: Optional[str] = None, with_bias: bool = False
                           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-example ``‖g_iᵀ a_i‖²`` and (``with_bias``) ``‖Σ_t g_{i,t}‖²``: a [B, T, D], g [B, T, P] -> [B].

    ``route``: "ghost", "instantiate" or None (measured on CUDA, the FLOP model elsewhere)."""
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(f"linear_weight_sq_norms: a [B, T, D] and g [B, T, P] must agree, got "
                         f"{tuple(a.shape)} and {tuple(g.shape)}")
    B, T, D = a.shape
    P = g.shape[2]
    route = _resolve_route(route, ("linear", B, T, D, P, a.dtype), a, T, D, P,
                           lambda r: _call("linear_weight_sq_norms", a, g, r, with_bias))
    w, b = _call("linear_weight_sq_norms", a, g, route, with_bias)
    return w, _bias_or_none(b, with_bias)


def _check_conv(op: str, x: Tensor, g: Tensor, weight_shape, stride, padding, dilation, groups) -> None:
    n = len(weight_shape) - 2
    if not (1 <= n <= 3 and x.dim() == n + 2 and g.dim() == n + 2 and x.shape[0] == g.shape[0]):
        raise ValueError(f"{op}: x {tuple(x.shape)} and g {tuple(g.shape)} do not fit a weight {tuple(weight_shape)}")
    if not (len(stride) == len(padding) == len(dilation) == n):
        raise ValueError(f"{op}: stride, padding and dilation need {n} entries each")
    if x.shape[1] != weight_shape[1] * groups or g.shape[1] != weight_shape[0] or weight_shape[0] % groups:
        raise ValueError(f"{op}: channels of x {x.shape[1]} / g {g.shape[1]} do not match weight "
                         f"{tuple(weight_shape)} with groups={groups}")


def conv_weight_sq_norms(x: Tensor, g: Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                         padding: Sequence[int], dilation: Sequence[int], groups: int, route: Optional[str] = None,
                         with_bias: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-example ``‖∂W_i‖²`` (all groups) of a Conv1d/2d/3d and (``with_bias``) ``‖∂b_i‖²``: [B]."""
    _check_conv("conv_weight_sq_norms", x, g, weight_shape, stride, padding, dilation, groups)
    args = (list(weight_shape), list(stride), list(padding), list(dilation), int(groups))
    T = math.prod(g.shape[2:])
    D, P = math.prod(weight_shape[1:]), weight_shape[0] // groups
    key = ("conv", tuple(x.shape), *map(tuple, args[:4]), groups, x.dtype)
    route = _resolve_route(route, key, x, T, D, P,
                           lambda r: _call("conv_weight_sq_norms", x, g, *args, r, with_bias))
    w, b = _call("conv_weight_sq_norms", x, g, *args, route, with_bias)
    return w, _bias_or_none(b, with_bias)


def _check_noise(op: str, seed: int, offsets: Sequence[Tuple[int, int]], noise_std: float) -> None:
    for offset, numel in offsets:
        _check_seed_offset(op, seed, offset, numel)
    if not (math.isfinite(noise_std) and noise_std >= 0.0):
        raise ValueError(f"{op}: noise_std must be finite and >= 0, got {noise_std}")


def linear_clipped_sum_with_noise(a: Tensor, g: Tensor, scale: Tensor, with_bias: bool = False, seed: int = 0,
                                  weight_offset: int = 0, bias_offset: int = 0, noise_std: float = 0.0
                                  ) -> Tuple[Tensor, Optional[Tensor]]:
    """``Σ_i scale_i g_iᵀ a_i + noise_std·ξ`` ([P, D]) and (``with_bias``) ``Σ_i scale_i Σ_t g_{i,t} +
    noise_std·ξ'`` ([P]), ``ξ`` from ``(seed, weight_offset)``, ``ξ'`` from ``(seed, bias_offset)``."""
    op = "linear_clipped_sum_with_noise"
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2] or scale.shape != (a.shape[0],):
        raise ValueError(f"{op}: need a [B, T, D], g [B, T, P], scale [B]; got {tuple(a.shape)}, {tuple(g.shape)}, "
                         f"{tuple(scale.shape)}")
    P, D = g.shape[2], a.shape[2]
    _check_noise(op, seed, [(weight_offset, P * D), (bias_offset, P if with_bias else 0)], float(noise_std))
    w, b = _call("linear_clipped_sum_with_noise", a, g, scale, with_bias, seed, weight_offset, bias_offset,
                 float(noise_std))
    return w, _bias_or_none(b, with_bias)


def conv_clipped_sum_with_noise(x: Tensor, g: Tensor, scale: Tensor, weight_shape: Sequence[int],
                                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                                with_bias: bool = False, seed: int = 0, weight_offset: int = 0, bias_offset: int = 0,
                                noise_std: float = 0.0) -> Tuple[Tensor, Optional[Tensor]]:
    """``Σ_i scale_i ∂W_i + noise_std·ξ`` (shape ``weight_shape``) and the bias analogue ([C_out])."""
    op = "conv_clipped_sum_with_noise"
    _check_conv(op, x, g, weight_shape, stride, padding, dilation, groups)
    if scale.shape != (x.shape[0],):
        raise ValueError(f"{op}: scale must be [B], got {tuple(scale.shape)}")
    _check_noise(op, seed, [(weight_offset, math.prod(weight_shape)),
                            (bias_offset, weight_shape[0] if with_bias else 0)], float(noise_std))
    w, b = _call(
        "conv_clipped_sum_with_noise", x, g, scale, list(weight_shape), list(stride), list(padding), list(dilation), int(groups), with_bias, seed,
        weight_offset, bias_offset, float(noise_std))
    return w, _bias_or_none(b, with_bias)


def affine_per_example_grads(xhat: Tensor, g: Tensor, with_weight: bool = True, with_bias: bool = True
                             ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Normalization layers: from x̂ and g viewed as [B, T, C], ``(∂w [B, C], ∂b [B, C], ‖∂w_i‖², ‖∂b_i‖²)``
    with ``∂w_i = Σ_t x̂_{i,t} ⊙ g_{i,t}``, ``∂b_i = Σ_t g_{i,t}``; None for what was not asked for."""
    if g.dim() != 3 or xhat.shape != g.shape:
        raise ValueError(f"affine_per_example_grads: xhat and g must both be [B, T, C], got {tuple(xhat.shape)} "
                         f"and {tuple(g.shape)}")
    dw, db, w_sq, b_sq = _call("affine_per_example_grads", xhat, g, with_weight, with_bias)
    return (dw if with_weight else None, db if with_bias else None, w_sq if with_weight else None,
            b_sq if with_bias else None)


def per_example_clipped_sum_with_noise(grads: Tensor, scale: Tensor, seed: int = 0, offset: int = 0,
                                       noise_std: float = 0.0) -> Tensor:
    """``Σ_i scale_i grads_i + noise_std·ξ`` for materialized per-example gradients grads [B, K] -> [K]."""
    op = "per_example_clipped_sum_with_noise"
    if grads.dim() != 2 or scale.shape != (grads.shape[0],):
        raise ValueError(f"{op}: need grads [B, K] and scale [B], got {tuple(grads.shape)}, {tuple(scale.shape)}")
    _check_noise(op, seed, [(offset, grads.shape[1])], float(noise_std))
    return _call("per_example_clipped_sum_with_noise", grads, scale, seed, offset, float(noise_std))


def conv_per_example_grads(x: Tensor, g: Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int], groups: int, with_bias: bool = False
                           ) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """Materialized per-example gradients of a convolution and their squared norms: ``(∂W [B, *weight_shape],
    ∂b [B, C_out] or None, ‖∂W_i‖² [B], ‖∂b_i‖² [B] or None)``. For layers whose per-example gradients are
    cheap to keep (the CPU instantiate route): the clipped sum is then one pass over them."""
    _check_conv("conv_per_example_grads", x, g, weight_shape, stride, padding, dilation, groups)
    pe, db, w_sq, b_sq = _call("conv_per_example_grads", x, g, list(weight_shape), list(stride), list(padding),
                               list(dilation), int(groups), with_bias)
    return pe, _bias_or_none(db, with_bias), w_sq, _bias_or_none(b_sq, with_bias)
