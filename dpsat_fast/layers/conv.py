"""nn.Conv1d/2d/3d: stride, padding (numbers, 'valid', 'same', non-zero padding modes), dilation, groups.

For group k the layer is a matrix product on unfolded patches: ``a_i ∈ R^{T×D_k}`` with T output positions
and ``D_k = (C_in/groups)·∏kernel``, ``g_i ∈ R^{T×P_k}`` with ``P_k = C_out/groups``; the per-example weight
gradient of the group is ``g_iᵀ a_i`` and ``‖∂W_i‖² = Σ_k ‖g_{i,k}ᵀ a_{i,k}‖²`` (DESIGN.md §2.3). Every group
is counted: treating a grouped conv as dense gives wrong norms. The clipped sum never unfolds: it is
the convolution weight-gradient of the per-example-scaled output gradient.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ghost
from .base import LayerRule, ModuleRecord, Use, sum_over_uses


def unfold_patches(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int) -> Tensor:
    """im2col for N-d convolution: x [B, C, *S] -> [B, groups, T, (C/groups)·∏k] (weight layout order)."""
    n = len(kernel_size)
    if any(padding):
        x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    for d in range(n):
        span = dilation[d] * (kernel_size[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])  # appends a window dimension
    x = x[(slice(None),) * (2 + n) + tuple(slice(None, None, dl) for dl in dilation)]  # [B, C, *T, *k]
    B, C = x.shape[:2]
    T = math.prod(x.shape[2:2 + n])
    K = math.prod(kernel_size)
    x = x.reshape(B, groups, C // groups, T, K).permute(0, 1, 3, 2, 4)
    return x.reshape(B, groups, T, (C // groups) * K)


class _ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, record: ModuleRecord, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.record = record
        ctx.geometry = (stride, padding, dilation, groups)
        n = weight.dim() - 2
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * n, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        ctx.record.add_use(x=x, g=grad_out)
        grad_x = None
        if ctx.needs_input_grad[0]:
            n = weight.dim() - 2
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight.to(grad_out.dtype), None, stride, padding, dilation, False, [0] * n,
                groups, [True, False, False])[0]
        return grad_x, None, None, None, None, None, None, None


class ConvRule(LayerRule):
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(self, route: str | None = None):
        self.route = route

    def _prepare(self, module: nn.modules.conv._ConvNd, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """Apply padding the conv op cannot express (modes, asymmetric 'same'); return numeric padding."""
        n = module.weight.dim() - 2
        zero = (0,) * n
        if module.padding_mode != "zeros":
            return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), zero
        if isinstance(module.padding, str):
            if module.padding == "valid":
                return x, zero
            rp = module._reversed_padding_repeated_twice
            left, right = tuple(rp[0::2][::-1]), tuple(rp[1::2][::-1])
            if left == right:
                return x, left
            return F.pad(x, rp), zero
        return x, tuple(module.padding)

    def forward(self, module, record: ModuleRecord, x: Tensor) -> Tensor:
        n = module.weight.dim() - 2
        if x.dim() != n + 2:
            raise ValueError(f"{record.name}: DP Conv{n}d needs batched input of {n + 2} dims, got "
                             f"shape {tuple(x.shape)}")
        x, padding = self._prepare(module, x)
        record.geometry = (tuple(module.stride), padding, tuple(module.dilation), module.groups)
        return _ConvFunction.apply(x, module.weight, module.bias, record, *record.geometry)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _patches_and_grads(record, uses: List[Use]):
        """Unfolded inputs [B*groups, T, D_k] and output grads [B*groups, T, P_k], uses along T."""
        stride, padding, dilation, groups = record.geometry
        ks = record.module.weight.shape[2:]
        a_parts, g_parts = [], []
        for u in uses:
            a = unfold_patches(u["x"], ks, stride, padding, dilation, groups)  # [B, G, T, D_k]
            g = u["g"]
            B, C_out = g.shape[:2]
            g = g.reshape(B, groups, C_out // groups, math.prod(g.shape[2:])).transpose(2, 3)  # [B, G, T, P_k]
            a_parts.append(a)
            g_parts.append(g)
        a = torch.cat(a_parts, 2) if len(a_parts) > 1 else a_parts[0]
        g = torch.cat(g_parts, 2) if len(g_parts) > 1 else g_parts[0]
        B, G, T = a.shape[:3]
        return a.reshape(B * G, T, a.shape[3]), g.reshape(B * G, T, g.shape[3]), B, G

    @staticmethod
    def _bias_grads(uses: List[Use]) -> Tensor:
        return sum_over_uses([u["g"].to(ghost.accum_dtype(u["g"])).flatten(2).sum(2) for u in uses])

    # -- rule ----------------------------------------------------------------------------------
    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        out = {}
        if "weight" in names:
            a, g, B, G = self._patches_and_grads(record, uses)
            out["weight"] = ghost.weight_sq_norms(a, g, self.route).view(B, G).sum(1)
        if "bias" in names:
            out["bias"] = self._bias_grads(uses).pow(2).sum(1)
        return out

    def clipped_sums(self, record, uses, scale, names) -> Dict[str, Tensor]:
        stride, padding, dilation, groups = record.geometry
        out = {}
        if "weight" in names:
            weight = record.module.weight.detach()
            n = weight.dim() - 2
            parts = []
            for u in uses:
                dt = ghost.accum_dtype(u["x"])
                g = u["g"].to(dt) * scale.to(dt).view(-1, *([1] * (n + 1)))
                parts.append(torch.ops.aten.convolution_backward(
                    g, u["x"].to(dt), weight.to(dt), None, stride, padding, dilation, False,
                    [0] * n, groups, [False, True, False])[1])
            out["weight"] = sum_over_uses(parts)
        if "bias" in names:
            bias = self._bias_grads(uses)
            out["bias"] = bias.t().mv(scale.to(bias.dtype))
        return out

    def per_example_grads(self, record, uses, names) -> Dict[str, Tensor]:
        out = {}
        if "weight" in names:
            a, g, B, G = self._patches_and_grads(record, uses)
            pe = ghost.weight_per_example_grads(a, g)  # [B*G, P_k, D_k]
            out["weight"] = pe.reshape(B, *record.module.weight.shape)
        if "bias" in names:
            out["bias"] = self._bias_grads(uses)
        return out
