"""nn.Conv1d/2d/3d: stride, padding (numbers, 'valid', 'same', non-zero padding modes), dilation, groups.

For group k the layer is a matrix product on unfolded patches: ``a_i ∈ R^{T×D_k}`` with T output positions
and ``D_k = (C_in/groups)·∏kernel``, ``g_i ∈ R^{T×P_k}`` with ``P_k = C_out/groups``; the per-example weight
gradient of the group is ``g_iᵀ a_i`` and ``‖∂W_i‖² = Σ_k ‖g_{i,k}ᵀ a_{i,k}‖²`` (docs/algorithms.md §3). Every group
is counted: treating a grouped conv as dense gives wrong norms. Norms and clipped noisy sums are the ops
``conv_weight_sq_norms`` / ``conv_clipped_sum_with_noise`` (Triton with implicit im2col on CUDA, convolution
weight-gradients on CPU); a module used several times in one forward is handled exactly in PyTorch.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import torch_impl
from ..ops import error_bounds
from ..ops.routes import kernel_backend_of, resolve_conv_route
from . import bounds
from .base import NO_NOISE, LayerRule, ModuleRecord, NoiseRequest, Use, materialized_sq_norms, sum_over_uses


# Per layer, per-example weight gradients up to this many elements (fp32: 64 MiB) are kept between the norms
# and the clipped sum on the PyTorch path; larger ones are recomputed as a convolution weight-gradient.
PER_EXAMPLE_CACHE_ELEMENTS = 1 << 24


class _ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, record: ModuleRecord, stride, padding, dilation, groups, w_eff, b_eff):
        # weight/bias: graph edges only; the convolution runs with w_eff/b_eff (DP-SAT: w + ε)
        ctx.save_for_backward(x, w_eff)
        ctx.record = record
        ctx.geometry = (stride, padding, dilation, groups)
        n = w_eff.dim() - 2
        return torch.convolution(x, w_eff, b_eff, stride, padding, dilation, False, [0] * n, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        ctx.record.add_use(ctx, x=x, g=grad_out)
        grad_x = None
        if ctx.needs_input_grad[0]:
            n = weight.dim() - 2
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight.to(grad_out.dtype), None, stride, padding, dilation, False, [0] * n,
                groups, [True, False, False])[0]
        return grad_x, None, None, None, None, None, None, None, None, None


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
        return _ConvFunction.apply(x, module.weight, module.bias, record, *record.geometry,
                                   record.effective(module.weight), record.effective(module.bias))

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _args(record) -> tuple:
        stride, padding, dilation, groups = record.geometry
        return tuple(record.module.weight.shape), stride, padding, dilation, groups

    @staticmethod
    def _bias_grads(uses: List[Use]) -> Tensor:
        return sum_over_uses([torch_impl.conv_bias_per_example_grads(u["g"]) for u in uses])

    def _weight_grads(self, record, uses: List[Use], sl: slice = slice(None)) -> Tensor:
        return sum_over_uses([torch_impl.conv_per_example_grads(u["x"][sl], u["g"][sl], *self._args(record))
                              for u in uses])

    def _keep_per_example(self, record, use: Use) -> bool:
        """PyTorch path, instantiate route, and the per-example gradients fit the cache budget."""
        x, g = use["x"], use["g"]
        if ops.use_triton(x):
            return False
        shape, groups = record.module.weight.shape, record.geometry[3]
        route = self.route or ops.choose_route(math.prod(g.shape[2:]), math.prod(shape[1:]), shape[0] // groups)
        return route == "instantiate" and x.shape[0] * math.prod(shape) <= PER_EXAMPLE_CACHE_ELEMENTS

    # -- rule ----------------------------------------------------------------------------------
    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        record.cache.clear()
        out = {}
        if "bias" in names:
            db = self._bias_grads(uses)
            record.cache["bias_per_example"] = db
            out["bias"] = materialized_sq_norms(db)
        if "weight" in names:
            out["weight"] = self._weight_sq_norms(record, uses)
        return out

    def _weight_sq_norms(self, record, uses: List[Use]) -> Tensor:
        shape, stride, padding, dilation, groups = self._args(record)
        x0, g0 = uses[0]["x"], uses[0]["g"]
        dtype = torch.promote_types(x0.dtype, g0.dtype)
        backend = kernel_backend_of(x0, len(shape) - 2)
        if len(uses) == 1 and self._keep_per_example(record, uses[0]):
            # CPU instantiate route: keep the per-example gradients for the clipped sum (Σ_i c_i G_i is then
            # one pass over them instead of a second convolution weight-gradient); norm and sum then come
            # from the same tensors, so the norm needs no rounding certificate beyond its own sum
            pe, _, w_sq, _ = ops.conv_per_example_grads(x0, g0, *self._args(record), with_bias=False)
            record.cache["weight_per_example"] = pe
            return w_sq.double() * (1.0 + error_bounds.materialized_sq_norm_error(math.prod(shape), dtype, backend))
        B = x0.shape[0]
        Ts = [math.prod(u["g"].shape[2:]) for u in uses]
        T, D, P = sum(Ts), math.prod(shape[1:]), shape[0] // groups
        if len(uses) == 1:
            route = resolve_conv_route(self.route, x0, g0, shape, stride, padding, dilation, groups)
            h, _ = ops.conv_weight_sq_norms(x0, g0, shape, stride, padding, dilation, groups, route, with_bias=False)
        else:
            # one module used several times: the per-example gradient is the sum over uses (cross terms)
            route = self.route or ops.choose_route(T, D, P)
            if route == "instantiate":
                parts = [materialized_sq_norms(self._weight_grads(record, uses, sl))
                         for sl in torch_impl.batch_chunks(B, math.prod(shape))]
                h = torch.cat(parts) if len(parts) != 1 else parts[0]
            else:
                a, g = torch_impl.conv_patches_and_grads([u["x"] for u in uses], [u["g"] for u in uses], shape[2:],
                                                         stride, padding, dilation, groups)
                h = torch_impl.sq_norms_ghost(a, g).double().view(B, groups).sum(1)
        S = bounds.conv_position_products([u["x"] for u in uses], [u["g"] for u in uses], shape, stride, padding,
                                          dilation, groups)
        kappa = max(error_bounds.clipped_sum_error(B, t, dtype, backend) for t in Ts)
        if route == "ghost":
            alpha = error_bounds.ghost_sq_norm_error(T, D, P, dtype, groups=groups, backend=backend)
            nsq, loose = bounds.certified_norms(h, S, alpha=alpha, kappa=kappa)
        else:
            beta, rho = error_bounds.instantiate_norm_error(T, D, P, dtype, groups=groups, backend=backend)
            nsq, loose = bounds.certified_norms(h, S, beta=beta, rho=rho, kappa=kappa)
        if bool(loose.any()):
            idx = loose.nonzero().flatten()
            pe = sum_over_uses([torch_impl.conv_per_example_grads(u["x"][idx].double(), u["g"][idx].double(), shape,
                                                                  stride, padding, dilation, groups) for u in uses])
            nsq[idx] = bounds.exact_sq_norms(pe, T, S[idx])
            record.cache["weight_fallback"] = (idx, pe)
            bounds.record_fallback(record.name, idx.numel())
        return nsq

    def clipped_sums(self, record, uses, scale, names, noise: Optional[NoiseRequest] = None):
        noise = noise or NO_NOISE
        out = {}
        if "bias" in names:
            db = record.cache.pop("bias_per_example", None)
            db = self._bias_grads(uses) if db is None else db
            out["bias"] = ops.per_example_clipped_sum_with_noise(db, scale, *noise.of("bias"))
        if "weight" in names:
            seed, offset, std = noise.of("weight")
            pe = record.cache.pop("weight_per_example", None)
            if pe is not None:
                out["weight"] = ops.per_example_clipped_sum_with_noise(pe.flatten(1), scale, seed, offset,
                                                                       std).view(pe.shape[1:])
            else:
                fallback = record.cache.pop("weight_fallback", None)
                fused_scale = scale if fallback is None else bounds.scale_without(scale, fallback[0])
                parts = []
                for k, u in enumerate(uses):  # the noise goes into the sum once
                    w, _ = ops.conv_clipped_sum_with_noise(u["x"], u["g"], fused_scale, *self._args(record), False,
                                                           seed, offset, 0, std if k == 0 else 0.0)
                    parts.append(w)
                w = sum_over_uses(parts)
                if fallback is not None:  # the exactly recomputed examples, from their float64 gradients
                    idx, pe64 = fallback
                    w = w + torch.tensordot(scale[idx].double(), pe64, dims=1).to(w.dtype)
                out["weight"] = w
        return out, set(noise.offsets) & set(names)

    def per_example_grads(self, record, uses, names) -> Dict[str, Tensor]:
        out = {}
        if "weight" in names:
            out["weight"] = self._weight_grads(record, uses)
        if "bias" in names:
            out["bias"] = self._bias_grads(uses)
        return out
