"""nn.Linear with any number of leading dimensions: ``y = x Wᵀ + b`` on x of shape [B, *, D].

Per example i, with ``a_i = x_i`` reshaped to [T, D] and ``g_i = ∂L/∂y_i`` to [T, P]:
``∂W_i = g_iᵀ a_i`` and ``∂b_i = Σ_t g_{i,t}``. Several uses of the module concatenate along T, which
gives the exact per-example gradient of a reused layer (cross terms included).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import torch_impl
from ..ops import error_bounds
from ..ops.routes import kernel_backend_of, resolve_linear_route
from . import bounds
from .base import (NO_NOISE, LayerRule, ModuleRecord, NoiseRequest, Use, as_batch_positions_features,
                   materialized_sq_norms)


class _LinearFunction(torch.autograd.Function):
    """``y = x W_effᵀ + b_eff``; ``weight``/``bias`` are the parameters (graph edges only: their gradient is
    the engine's clipped sum), ``w_eff``/``b_eff`` what the forward computes with (DP-SAT: ``w + ε``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias, record: ModuleRecord, w_eff: Tensor, b_eff) -> Tensor:
        ctx.save_for_backward(x, w_eff)
        ctx.record = record
        return F.linear(x, w_eff, b_eff)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        ctx.record.add_use(ctx, a=as_batch_positions_features(x), g=as_batch_positions_features(grad_out))
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def _cat_uses(uses: List[Use]):
    a = torch.cat([u["a"] for u in uses], 1) if len(uses) > 1 else uses[0]["a"]
    g = torch.cat([u["g"] for u in uses], 1) if len(uses) > 1 else uses[0]["g"]
    return a, g


class LinearRule(LayerRule):
    """Weight: norms by the ghost or instantiate route and the clipped sum as one GEMM, both certified
    against their rounding (:mod:`.bounds`); bias: materialized per-example sums, used for both."""

    module_types = (nn.Linear,)

    def __init__(self, route: str | None = None):
        self.route = route  # None: per layer (measured on CUDA, FLOP model elsewhere)

    def forward(self, module: nn.Linear, record: ModuleRecord, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"{record.name}: DP Linear needs a batch dimension first, got input of shape "
                             f"{tuple(x.shape)}")
        return _LinearFunction.apply(x, module.weight, module.bias, record, record.effective(module.weight),
                                     record.effective(module.bias))

    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        a, g = _cat_uses(uses)
        out = {}
        if "bias" in names:
            db = torch_impl.bias_per_example_grads(g)
            record.cache["bias_per_example"] = db
            out["bias"] = materialized_sq_norms(db)
        if "weight" in names:
            out["weight"] = self._weight_sq_norms(record, a, g)
        return out

    def _weight_sq_norms(self, record: ModuleRecord, a: Tensor, g: Tensor) -> Tensor:
        B, T, D = a.shape
        P = g.shape[2]
        route = resolve_linear_route(self.route, a, g)
        h, _ = ops.linear_weight_sq_norms(a, g, route, with_bias=False)
        S = bounds.linear_position_products(a, g)
        dtype, backend = torch.promote_types(a.dtype, g.dtype), kernel_backend_of(a)
        kappa = error_bounds.clipped_sum_error(B, T, dtype, backend)
        if route == "ghost":
            alpha = error_bounds.ghost_sq_norm_error(T, D, P, dtype, backend=backend)
            nsq, loose = bounds.certified_norms(h, S, alpha=alpha, kappa=kappa)
        else:
            beta, rho = error_bounds.instantiate_norm_error(T, D, P, dtype, backend=backend)
            nsq, loose = bounds.certified_norms(h, S, beta=beta, rho=rho, kappa=kappa)
        if bool(loose.any()):
            idx = loose.nonzero().flatten()
            pe = torch.bmm(g[idx].double().transpose(1, 2), a[idx].double())  # [n, P, D], exact products
            nsq[idx] = bounds.exact_sq_norms(pe, T, S[idx])
            record.cache["weight_fallback"] = (idx, pe)
            bounds.record_fallback(record.name, idx.numel())
        return nsq

    def clipped_sums(self, record, uses, scale, names, noise: Optional[NoiseRequest] = None):
        a, g = _cat_uses(uses)
        noise = noise or NO_NOISE
        out = {}
        if "bias" in names:
            db = record.cache.pop("bias_per_example", None)
            db = torch_impl.bias_per_example_grads(g) if db is None else db
            out["bias"] = ops.per_example_clipped_sum_with_noise(db, scale, *noise.of("bias"))
        if "weight" in names:
            fallback = record.cache.pop("weight_fallback", None)
            fused_scale = scale if fallback is None else bounds.scale_without(scale, fallback[0])
            seed, offset, std = noise.of("weight")
            w, _ = ops.linear_clipped_sum_with_noise(a, g, fused_scale, False, seed, offset, 0, std)
            if fallback is not None:  # the exactly recomputed examples, from their float64 gradients
                idx, pe = fallback
                w = w + torch.tensordot(scale[idx].double(), pe, dims=1).to(w.dtype)
            out["weight"] = w
        return out, set(noise.offsets) & set(names)

    def per_example_grads(self, record, uses: List[Use], names: Sequence[str]) -> Dict[str, Tensor]:
        a, g = _cat_uses(uses)
        out = {}
        if "weight" in names:
            out["weight"] = torch_impl.weight_per_example_grads(a, g)
        if "bias" in names:
            out["bias"] = torch_impl.bias_per_example_grads(g)
        return out
