"""nn.Embedding: per-example gradient rows add up for repeated indices.

For example i with indices ``x_{i,t}`` and output gradients ``g_{i,t}``, row v of the per-example gradient
is ``Σ_{t: x_{i,t}=v} g_{i,t}`` (rows of ``padding_idx`` get nothing). The squared norm sums the squares of
these accumulated rows: duplicates are added before squaring, so the norm is exact. Cost O(B·T·D), the
per-example gradient is never materialized.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.torch_impl import accum_dtype
from .base import LayerRule, ModuleRecord, Use, as_batch_positions_features


class _EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, padding_idx, record: ModuleRecord, w_eff):
        ctx.save_for_backward(idx)
        ctx.record = record
        return F.embedding(idx, w_eff, padding_idx)  # weight: graph edge only; w_eff = w (+ ε under DP-SAT)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        ctx.record.add_use(ctx, idx=idx.reshape(idx.shape[0], math.prod(idx.shape[1:])),
                           g=as_batch_positions_features(grad_out))
        return None, None, None, None, None


class EmbeddingRule(LayerRule):
    module_types = (nn.Embedding,)
    owned_params = ("weight",)

    def problems(self, module: nn.Embedding) -> List[str]:
        out = []
        if module.max_norm is not None:
            out.append("max_norm renormalizes the weight in place from the batch's indices; set max_norm=None")
        if module.scale_grad_by_freq:
            out.append("scale_grad_by_freq couples examples through batch frequencies; set it to False")
        if module.sparse:
            out.append("sparse gradients are not supported; set sparse=False")
        return out

    def forward(self, module: nn.Embedding, record: ModuleRecord, idx: Tensor) -> Tensor:
        if idx.dim() < 1:
            raise ValueError(f"{record.name}: DP Embedding needs a batch dimension first")
        return _EmbeddingFunction.apply(idx, module.weight, module.padding_idx, record, record.effective(module.weight))

    @staticmethod
    def _flat(record: ModuleRecord, uses: List[Use]):
        idx = torch.cat([u["idx"] for u in uses], 1)  # [B, T]
        g = torch.cat([u["g"] for u in uses], 1)  # [B, T, D]
        g = g.to(accum_dtype(g))
        pad = record.module.padding_idx
        if pad is not None:
            g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
        return idx, g

    def _rows(self, record: ModuleRecord, uses: List[Use]):
        """Per (example, index) accumulated gradient rows: ``(example of each row, index of each row, rows)``;
        computed once per backward and used for both the norm and the clipped sum."""
        cached = record.cache.get("rows")
        if cached is not None:
            return cached
        idx, g = self._flat(record, uses)
        B, T = idx.shape
        V = record.module.num_embeddings
        example = torch.arange(B, device=idx.device).unsqueeze(1).expand(B, T)
        keys = (example * V + idx).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        rows = torch.zeros(unique.numel(), g.shape[-1], dtype=g.dtype, device=g.device)
        rows.index_add_(0, inverse, g.reshape(B * T, g.shape[-1]))  # one row per (example, index)
        record.cache["rows"] = (unique // V, unique % V, rows)
        return record.cache["rows"]

    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        # the squares of the accumulated rows (duplicates added before squaring), exactly in float64: the
        # clipped sum adds these same rows, so this bounds what it adds for each example
        example, _, rows = self._rows(record, uses)
        B = uses[0]["idx"].shape[0]
        out = torch.zeros(B, dtype=torch.float64, device=rows.device)
        out.index_add_(0, example, rows.double().pow(2).sum(1))
        return {"weight": out * (1.0 + (rows.shape[1] * max(1, uses[0]["idx"].shape[1]) + 2) * 2.0 ** -53)}

    def clipped_sums(self, record, uses, scale, names, noise=None):
        example, index, rows = self._rows(record, uses)
        record.cache.pop("rows", None)
        weight = record.module.weight
        out = torch.zeros(weight.shape, dtype=rows.dtype, device=rows.device)
        out.index_add_(0, index, rows * scale.to(rows.dtype)[example].unsqueeze(1))
        return {"weight": out}, set()

    def per_example_grads(self, record, uses, names) -> Dict[str, Tensor]:
        idx, g = self._flat(record, uses)
        B = idx.shape[0]
        out = torch.zeros(B, *record.module.weight.shape, dtype=g.dtype, device=g.device)
        out.scatter_add_(1, idx.unsqueeze(-1).expand_as(g), g)
        return {"weight": out}
