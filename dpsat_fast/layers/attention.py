"""A DP-compatible multi-head attention with nn.MultiheadAttention's interface, and batch-first transformers.

nn.MultiheadAttention applies its packed ``in_proj_weight`` inside one functional call, so no per-layer rule
can see its inputs. :class:`DPMultiheadAttention` computes the same function with four nn.Linear
projections (q, k, v, out) whose per-example gradients the Linear rule handles exactly;
:func:`convert_multihead_attention` swaps it in, copying the weights.

nn.Transformer and its encoder/decoder (layers) default to ``batch_first=False``: their Linear and LayerNorm
layers then see [T, B, D] tensors, whose first dimension is not the batch, so no per-example rule applies.
:func:`convert_sequence_first_transformers` makes such a module batch-first inside and wraps it in a
:class:`SequenceFirstAdapter`, which keeps the sequence-first interface (same call, same outputs).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DPMultiheadAttention(nn.Module):
    """Drop-in for nn.MultiheadAttention (same arguments and outputs; add_bias_kv/add_zero_attn unsupported)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("DPMultiheadAttention does not support add_bias_kv or add_zero_attn")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        # What torch's transformer code reads on its ``self_attn`` (the fast paths of nn.TransformerEncoderLayer,
        # nn.TransformerEncoder): with no packed projection (``in_proj_bias is None``) they take the regular
        # path, which calls this module's forward.
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.in_proj_weight = None
        self.in_proj_bias = None
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "DPMultiheadAttention":
        """Same function as ``mha``, weights copied."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("cannot convert nn.MultiheadAttention with add_bias_kv/add_zero_attn")
        p = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device=p.device, dtype=p.dtype)
        E = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.split(E)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in ((new.q_proj, wq), (new.k_proj, wk), (new.v_proj, wv)):
                lin.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for lin, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.split(E)):
                    lin.bias.copy_(b)
                new.out_proj.bias.copy_(mha.out_proj.bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
        # frozen stays frozen: each projection trains iff the packed tensor it came from did
        in_weights = ((mha.in_proj_weight,) * 3 if mha._qkv_same_embed_dim
                      else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        for lin, w in zip((new.q_proj, new.k_proj, new.v_proj), in_weights):
            lin.weight.requires_grad_(w.requires_grad)
            if lin.bias is not None:
                lin.bias.requires_grad_(mha.in_proj_bias.requires_grad)
        new.out_proj.weight.requires_grad_(mha.out_proj.weight.requires_grad)
        if new.out_proj.bias is not None:
            new.out_proj.bias.requires_grad_(mha.out_proj.bias.requires_grad)
        new.train(mha.training)
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if query.dim() != 3:
            raise ValueError("DPMultiheadAttention needs batched 3-D inputs")
        if not self.batch_first:  # projections see batch-first inputs: the batch is dimension 0
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, _ = query.shape
        S = key.shape[1]
        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, L, H, hd).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(key).view(B, S, H, hd).transpose(1, 2)  # [B, H, S, hd]
        v = self.v_proj(value).view(B, S, H, hd).transpose(1, 2)  # [B, H, S, hd]
        scores = q.matmul(k.transpose(-2, -1)) / math.sqrt(hd)  # [B, H, L, S]
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(B, H, L, S)
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(B, 1, 1, S)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        weights = scores.softmax(-1)
        dropped = F.dropout(weights, self.dropout, self.training) if self.dropout > 0 else weights
        out = dropped.matmul(v).transpose(1, 2).reshape(B, L, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def convert_multihead_attention(module: nn.Module) -> nn.Module:
    """Replace every nn.MultiheadAttention in ``module`` (in place; the root too) by DPMultiheadAttention."""
    if type(module) is nn.MultiheadAttention:
        return DPMultiheadAttention.from_torch(module)
    for name, child in module.named_children():
        setattr(module, name, convert_multihead_attention(child))
    return module


def _swap_batch_and_sequence(t):
    """[T, B, D] <-> [B, T, D] (its own inverse); other values (unbatched inputs, masks, flags) pass unchanged."""
    return t.transpose(0, 1) if isinstance(t, Tensor) and t.dim() == 3 else t


class SequenceFirstAdapter(nn.Module):
    """The sequence-first ([T, B, D]) interface of ``module``, which runs batch-first inside.

    ``forward`` takes the wrapped module's arguments, positional or by keyword, moves the batch of the
    sequence arguments (``sequence_args``: (name, position) pairs, e.g. ``src``/``tgt``/``memory``) to the front,
    calls ``module`` and moves it back in the output. Masks need nothing: key padding masks are [B, S] and
    attention masks [L, S] or [B·H, L, S] in both layouts. Every Linear/LayerNorm inside then sees the batch
    first, so its per-example gradients are exact. Attributes it does not have itself (``layers``,
    ``self_attn``, ``generate_square_subsequent_mask``, …) are read from ``module``; ``batch_first`` is False
    (the interface), while the attention modules inside are batch-first. Parameter names gain a
    ``module.`` prefix.
    """

    def __init__(self, module: nn.Module, sequence_args: Sequence[Tuple[str, int]]):
        super().__init__()
        self.module = module
        self.sequence_args = tuple((str(n), int(i)) for n, i in sequence_args)
        self.batch_first = False

    def forward(self, *args, **kwargs):
        args = list(args)
        for name, i in self.sequence_args:
            if i < len(args):
                args[i] = _swap_batch_and_sequence(args[i])
            elif name in kwargs:
                kwargs[name] = _swap_batch_and_sequence(kwargs[name])
        return _swap_batch_and_sequence(self.module(*args, **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)


_SEQUENCE_ARGS = {
    nn.TransformerEncoderLayer: (("src", 0),),
    nn.TransformerDecoderLayer: (("tgt", 0), ("memory", 1)),
    nn.TransformerEncoder: (("src", 0),),
    nn.TransformerDecoder: (("tgt", 0), ("memory", 1)),
    nn.Transformer: (("src", 0), ("tgt", 1)),
}
_ATTENTIONS = {nn.TransformerEncoderLayer: ("self_attn",), nn.TransformerDecoderLayer: ("self_attn", "multihead_attn")}
#: final norms of an encoder/decoder that act on each position alone, so the layout does not change them
_POSITIONWISE = (nn.LayerNorm, nn.RMSNorm, nn.Identity)


def _sequence_first_layer(m: nn.Module) -> bool:
    names = _ATTENTIONS.get(type(m))
    if names is None:
        return False
    attns = [getattr(m, n, None) for n in names]
    return all(isinstance(a, (nn.MultiheadAttention, DPMultiheadAttention)) and not a.batch_first for a in attns)


def _convertible(m: nn.Module) -> bool:
    """``m`` is a torch transformer (layer) with the sequence-first layout whose function the conversion keeps."""
    t = type(m)
    if t in _ATTENTIONS:
        return _sequence_first_layer(m)
    if t in (nn.TransformerEncoder, nn.TransformerDecoder):
        layer_type = nn.TransformerEncoderLayer if t is nn.TransformerEncoder else nn.TransformerDecoderLayer
        return (len(m.layers) > 0 and all(type(layer) is layer_type and _sequence_first_layer(layer)
                                          for layer in m.layers)
                and (m.norm is None or type(m.norm) in _POSITIONWISE))
    if t is nn.Transformer:
        return (not m.batch_first and type(m.encoder) is nn.TransformerEncoder
                and type(m.decoder) is nn.TransformerDecoder and _convertible(m.encoder) and _convertible(m.decoder))
    return False


def convert_sequence_first_transformers(module: nn.Module) -> nn.Module:
    """Replace every sequence-first nn.Transformer / TransformerEncoder / TransformerDecoder /
    TransformerEncoderLayer / TransformerDecoderLayer in ``module`` (in place; the root too), outermost first,
    by a :class:`SequenceFirstAdapter` around the same module made batch-first inside (its attention modules
    and, for nn.Transformer, its ``batch_first`` flag). The function is unchanged. An encoder/decoder whose
    final norm is not position-wise, or nn.Transformer with a custom encoder/decoder, is left as it is and its
    layers are converted one by one."""
    if _convertible(module):
        for sub in module.modules():
            if isinstance(sub, (nn.MultiheadAttention, DPMultiheadAttention)):
                sub.batch_first = True
        if type(module) is nn.Transformer:
            module.batch_first = True
        return SequenceFirstAdapter(module, _SEQUENCE_ARGS[type(module)])
    for name, child in module.named_children():
        setattr(module, name, convert_sequence_first_transformers(child))
    return module
