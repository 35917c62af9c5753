"""LayerNorm, GroupNorm, InstanceNorm{1,2,3}d (affine), RMSNorm.

Each is ``y = x̂ ⊙ w + b`` with ``x̂`` the per-example normalized input (no cross-example coupling). The
normalization goes through autograd as usual; only the affine part is a custom function whose backward
forms the small per-example gradients directly (DESIGN.md §2.3):
``∂w_i = Σ_t x̂_{i,t} ⊙ g_{i,t}``, ``∂b_i = Σ_t g_{i,t}`` (t over all non-parameter dimensions).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ghost
from .base import LayerRule, ModuleRecord, Use, sum_over_uses


class _AffineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xhat, weight, bias, record: ModuleRecord, param_view, reduce_dims):
        ctx.save_for_backward(xhat, weight)
        ctx.record, ctx.param_view, ctx.reduce_dims = record, param_view, reduce_dims
        out = xhat * weight.view(param_view) if weight is not None else xhat
        return out + bias.view(param_view) if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight = ctx.saved_tensors
        dt = ghost.accum_dtype(grad_out)
        g = grad_out.to(dt)
        grads = {}
        if ctx.needs_input_grad[1]:
            grads["weight"] = _reduce(xhat.to(dt) * g, ctx.reduce_dims)
        if ctx.needs_input_grad[2]:
            grads["bias"] = _reduce(g, ctx.reduce_dims)
        ctx.record.add_use(**grads)
        grad_xhat = None
        if ctx.needs_input_grad[0]:
            grad_xhat = grad_out * weight.view(ctx.param_view).to(grad_out.dtype) if weight is not None else grad_out
        return grad_xhat, None, None, None, None, None


def _reduce(t: Tensor, dims: Sequence[int]) -> Tensor:
    return t.sum(tuple(dims)) if dims else t


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
            reduce_dims = tuple(range(2, x.dim()))
        else:
            param_view = tuple(param.shape)
            reduce_dims = tuple(range(1, x.dim() - k))
        return _AffineFunction.apply(xhat, module.weight, getattr(module, "bias", None), record, param_view,
                                     reduce_dims)

    def per_example_grads(self, record, uses: List[Use], names: Sequence[str]) -> Dict[str, Tensor]:
        return {n: sum_over_uses([u[n] for u in uses]) for n in names}


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
