"""LayerNorm, GroupNorm, InstanceNorm{1,2,3}d (affine), RMSNorm.

Each is ``y = x̂ ⊙ w + b`` with ``x̂`` the per-example normalized input (no cross-example coupling). The
normalization goes through autograd as usual; only the affine part is a custom function whose backward
forms the small per-example gradients and their squared norms directly, in one pass over x̂ and g (the op
``affine_per_example_grads``, DESIGN.md §2.3): ``∂w_i = Σ_t x̂_{i,t} ⊙ g_{i,t}``, ``∂b_i = Σ_t g_{i,t}``
(t over all non-parameter dimensions). The clipped sum adds the DP noise in the same kernel.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .base import LayerRule, ModuleRecord, NoiseRequest, Use, sum_over_uses


class _AffineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xhat, weight, bias, record: ModuleRecord, param_view, channel_first):
        ctx.save_for_backward(xhat, weight)
        ctx.record, ctx.param_view, ctx.channel_first = record, param_view, channel_first
        out = xhat * weight.view(param_view) if weight is not None else xhat
        return out + bias.view(param_view) if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight = ctx.saved_tensors
        B = grad_out.shape[0]
        param_shape = (weight if weight is not None else ctx.record.module.bias).shape
        if ctx.channel_first:  # [B, C, *S] -> [B, T, C] (a transposed view)
            as_btc = lambda t: t.reshape(B, t.shape[1], math.prod(t.shape[2:])).transpose(1, 2)  # noqa: E731
        else:  # [B, *, *param_shape] -> [B, T, K]
            as_btc = lambda t: t.reshape(B, math.prod(t.shape[1:]) // math.prod(param_shape), math.prod(param_shape))  # noqa: E731
        with_w, with_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dw, db, w_sq, b_sq = ops.affine_per_example_grads(as_btc(xhat), as_btc(grad_out), with_w, with_b)
        use = {}
        if with_w:
            use.update(weight=dw.view(B, *param_shape), weight_sq_norm=w_sq)
        if with_b:
            use.update(bias=db.view(B, *param_shape), bias_sq_norm=b_sq)
        ctx.record.add_use(**use)
        grad_xhat = None
        if ctx.needs_input_grad[0]:
            grad_xhat = grad_out * weight.view(ctx.param_view).to(grad_out.dtype) if weight is not None else grad_out
        return grad_xhat, None, None, None, None, None


class _NormRule(LayerRule):
    """Shared machinery: subclasses give ``normalize`` and where the parameters sit in the input."""

    channel_first = False  # True: params on dim 1 (GroupNorm/InstanceNorm); False: trailing dims

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, module, record: ModuleRecord, x: Tensor) -> Tensor:
        param = module.weight if module.weight is not None else module.bias
        k = param.dim()
        if x.dim() < k + 1 + int(self.channel_first):
            raise ValueError(f"{record.name}: DP {type(module).__name__} needs a batch dimension first, got "
                             f"input of shape {tuple(x.shape)}")
        xhat = self.normalize(module, x)
        if self.channel_first:
            param_view = (param.shape[0],) + (1,) * (x.dim() - 2)
        else:
            param_view = tuple(param.shape)
        return _AffineFunction.apply(xhat, module.weight, getattr(module, "bias", None), record, param_view,
                                     self.channel_first)

    def per_example_grads(self, record, uses: List[Use], names: Sequence[str]) -> Dict[str, Tensor]:
        return {n: sum_over_uses([u[n] for u in uses]) for n in names}

    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        if len(uses) == 1:
            return {n: uses[0][n + "_sq_norm"] for n in names}
        return {n: g.flatten(1).pow(2).sum(1) for n, g in self.per_example_grads(record, uses, names).items()}

    def clipped_sums(self, record, uses, scale, names, noise: Optional[NoiseRequest] = None):
        out, noised = {}, set()
        for n, g in self.per_example_grads(record, uses, names).items():
            if noise is not None and n in noise.offsets:
                seed, offset, std = noise.seed, noise.offsets[n], noise.std
                noised.add(n)
            else:
                seed, offset, std = 0, 0, 0.0
            out[n] = ops.per_example_clipped_sum_with_noise(g.flatten(1), scale, seed, offset, std).view(g.shape[1:])
        return out, noised


class LayerNormRule(_NormRule):
    module_types = (nn.LayerNorm,)

    def normalize(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormRule(_NormRule):
    module_types = (nn.RMSNorm,)

    def normalize(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class GroupNormRule(_NormRule):
    module_types = (nn.GroupNorm,)
    channel_first = True

    def normalize(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class InstanceNormRule(_NormRule):
    module_types = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    channel_first = True

    def problems(self, module) -> List[str]:
        if module.track_running_stats and module.training:
            return ["track_running_stats=True accumulates un-noised running statistics of the private data "
                    "into buffers that are released with the model; set track_running_stats=False"]
        return []

    def normalize(self, module, x):
        use_input_stats = module.training or not module.track_running_stats
        return F.instance_norm(x, module.running_mean, module.running_var, None, None, use_input_stats,
                               module.momentum if module.momentum is not None else 0.0, module.eps)
