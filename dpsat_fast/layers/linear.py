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
from .base import NO_NOISE, LayerRule, ModuleRecord, NoiseRequest, Use, as_batch_positions_features


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias, record: ModuleRecord) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.record = record
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        ctx.record.add_use(ctx, a=as_batch_positions_features(x), g=as_batch_positions_features(grad_out))
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _cat_uses(uses: List[Use]):
    a = torch.cat([u["a"] for u in uses], 1) if len(uses) > 1 else uses[0]["a"]
    g = torch.cat([u["g"] for u in uses], 1) if len(uses) > 1 else uses[0]["g"]
    return a, g


class LinearRule(LayerRule):
    module_types = (nn.Linear,)

    def __init__(self, route: str | None = None):
        self.route = route  # None: per layer (measured on CUDA, FLOP model elsewhere)

    def forward(self, module: nn.Linear, record: ModuleRecord, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"{record.name}: DP Linear needs a batch dimension first, got input of shape "
                             f"{tuple(x.shape)}")
        return _LinearFunction.apply(x, module.weight, module.bias, record)

    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        a, g = _cat_uses(uses)
        if "weight" not in names:
            return {"bias": torch_impl.bias_per_example_grads(g).pow(2).sum(1)}
        w, b = ops.linear_weight_sq_norms(a, g, self.route, with_bias="bias" in names)
        return {"weight": w, "bias": b} if b is not None else {"weight": w}

    def clipped_sums(self, record, uses, scale, names, noise: Optional[NoiseRequest] = None):
        a, g = _cat_uses(uses)
        if "weight" not in names:
            return {"bias": torch_impl.bias_per_example_grads(g).t().mv(scale.to(torch_impl.accum_dtype(g)))}, set()
        if noise is None or not noise.covers(names):
            noise = NO_NOISE
        with_bias = "bias" in names
        w, b = ops.linear_clipped_sum_with_noise(a, g, scale, with_bias, noise.seed, noise.offsets.get("weight", 0),
                                                 noise.offsets.get("bias", 0), noise.std)
        return ({"weight": w, "bias": b} if with_bias else {"weight": w}), set(noise.offsets) & set(names)

    def per_example_grads(self, record, uses: List[Use], names: Sequence[str]) -> Dict[str, Tensor]:
        a, g = _cat_uses(uses)
        out = {}
        if "weight" in names:
            out["weight"] = torch_impl.weight_per_example_grads(a, g)
        if "bias" in names:
            out["bias"] = torch_impl.bias_per_example_grads(g)
        return out
