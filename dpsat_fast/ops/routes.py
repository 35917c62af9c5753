"""Which route (ghost or instantiate) the per-sample norm ops take for a layer: the caller's choice, the
route measured once per shape on CUDA with Triton, or the FLOP model. Layer rules resolve it before calling
the norm op, because the rounding-error bound of the result depends on the route."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor

from .error_bounds import backend_for
from .per_sample import _call, _resolve_route


def resolve_linear_route(route: Optional[str], a: Tensor, g: Tensor) -> str:
    """The route ``linear_weight_sq_norms(a, g, route)`` takes (a [B, T, D], g [B, T, P])."""
    B, T, D = a.shape
    P = g.shape[2]
    return _resolve_route(route, ("linear", B, T, D, P, a.dtype), a, T, D, P,
                          lambda r: _call("linear_weight_sq_norms", a, g, r, False))


def resolve_conv_route(route: Optional[str], x: Tensor, g: Tensor, weight_shape: Sequence[int], stride, padding,
                       dilation, groups: int) -> str:
    """The route ``conv_weight_sq_norms(x, g, ..., route)`` takes."""
    args = (list(weight_shape), list(stride), list(padding), list(dilation), int(groups))
    T = math.prod(g.shape[2:])
    D, P = math.prod(weight_shape[1:]), weight_shape[0] // groups
    key = ("conv", tuple(x.shape), *map(tuple, args[:4]), groups, x.dtype)
    return _resolve_route(route, key, x, T, D, P,
                          lambda r: _call("conv_weight_sq_norms", x, g, *args, r, False))


def kernel_backend_of(t: Tensor, conv_dims: Optional[int] = None) -> str:
    """Which implementation the per-sample ops run on ``t`` (for :mod:`.error_bounds`): that of
    :func:`.error_bounds.backend_for`, except that Conv3d never takes Triton (it runs the PyTorch ops)."""
    backend = backend_for(t)
    return "torch" if conv_dims == 3 and backend.startswith("triton") else backend
