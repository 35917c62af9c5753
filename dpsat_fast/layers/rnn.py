"""Recurrent layers built from nn.Linear cells: drop-ins for nn.LSTM, nn.GRU and nn.RNN.

torch's recurrent modules run their whole recurrence in one fused call over packed weights, so no per-layer
rule can see the inputs of the gate matrices. :class:`DPLSTM`, :class:`DPGRU` and :class:`DPRNN` compute the
same function (same constructor arguments, call signature and outputs) from one ``nn.Linear`` per gate matrix
and per layer and direction:

* ``ih_l{k}{suffix}`` (``W_ih``, ``b_ih``) is applied once to the whole sequence ``[B, T, I]`` (one use of T
  positions),
* ``hh_l{k}{suffix}`` (``W_hh``, ``b_hh``) once per time step to the previous hidden state ``[B, H]`` (T uses),
* ``hr_l{k}{suffix}`` (LSTM with ``proj_size > 0``: ``W_hr``, no bias) once per time step,

and the Linear rule clips the sum over all uses exactly (a module used several times in one forward is
exact in the engine: cross terms between time steps included). Internally everything is batch-first, so
every Linear sees the batch as dimension 0 whatever ``batch_first`` says. Parameters are named like
``ih_l0.weight`` (torch: ``weight_ih_l0``); torch-style state dicts load as they are, and
:meth:`torch_state_dict` / :meth:`to_torch` export back. The gate order and the equations are torch's:

* LSTM: ``i, f, g, o = σ, σ, tanh, σ of (W_ih x + b_ih + W_hh h + b_hh)``, ``c' = f c + i g``,
  ``h' = o tanh(c')`` (then ``h' = W_hr h'`` with a projection);
* GRU: ``r, z = σ(W_i{r,z} x + b_i{r,z} + W_h{r,z} h + b_h{r,z})``, ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))``,
  ``h' = (1 − z) n + z h``;
* RNN: ``h' = tanh or relu(W_ih x + b_ih + W_hh h + b_hh)``.

``dropout`` acts on the outputs of every layer but the last (train mode only), as in torch.
A :class:`~torch.nn.utils.rnn.PackedSequence` input is handled exactly: it is unpacked to a padded batch,
each example's state is held fixed past its length (``torch.where`` on a per-step mask, so the padded steps
contribute exactly zero to every per-example gradient; the reverse direction starts at each example's own
last step) and the output is packed again with the input's batch sizes and permutation.

:func:`convert_rnn` swaps these in for ``nn.LSTM``/``nn.GRU``/``nn.RNN`` and for Opacus' ``DPLSTM``/``DPGRU``/
``DPRNN`` (weights copied); ``dpsat_fast.fix_model`` calls it. :class:`OpacusRNNRule` lets an Opacus DP RNN be
made private as it is (its ``RNNLinear`` cells get the Linear rule; its parameters, which Opacus registers
twice under torch's names, are clipped as the sum over their uses).
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .base import LayerRule

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_TORCH_NAME = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")


class _DPRNNBase(nn.Module):
    """Shared machinery of :class:`DPLSTM`, :class:`DPGRU` and :class:`DPRNN` (arguments as nn.RNNBase)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", stacklevel=3)
        for name, value in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        kw = dict(device=device, dtype=dtype)
        gates = _GATES[mode] * hidden_size
        out_size = proj_size or hidden_size
        for layer in range(num_layers):
            for suffix in self._suffixes():
                layer_input = input_size if layer == 0 else out_size * self.num_directions
                setattr(self, f"ih_l{layer}{suffix}", nn.Linear(layer_input, gates, bias=bias, **kw))
                setattr(self, f"hh_l{layer}{suffix}", nn.Linear(out_size, gates, bias=bias, **kw))
                if proj_size:
                    setattr(self, f"hr_l{layer}{suffix}", nn.Linear(hidden_size, proj_size, bias=False, **kw))
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_accept_torch_names)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> Tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def reset_parameters(self) -> None:
        """torch's initialization: every weight and bias uniform in ±1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.mode == "RNN_RELU":
            s += ", nonlinearity='relu'"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False),
                              ("proj_size", 0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    # -- torch-compatible names -------------------------------------------------------------------
    def __getattr__(self, name: str):
        m = _TORCH_NAME.match(name)
        if m is not None and "_modules" in self.__dict__:
            kind, mat, layer, rev = m.groups()
            lin = self.__dict__["_modules"].get(f"{mat}_l{layer}{rev or ''}")
            if lin is not None and getattr(lin, kind, None) is not None:
                return getattr(lin, kind)
        return super().__getattr__(name)

    @property
    def _flat_weights_names(self) -> List[str]:
        """torch's parameter names, in torch's order."""
        names = []
        for layer in range(self.num_layers):
            for suffix in self._suffixes():
                names += [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
                if self.bias:
                    names += [f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"]
                if self.proj_size:
                    names.append(f"weight_hr_l{layer}{suffix}")
        return names

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        """torch's ``all_weights``: the parameters per layer and direction, in torch's order."""
        per = len(self._flat_weights_names) // (self.num_layers * self.num_directions)
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[i:i + per]] for i in range(0, len(names), per)]

    def flatten_parameters(self) -> None:
        """No-op (torch packs its weights for cuDNN; these cells are separate nn.Linear modules)."""

    def torch_state_dict(self) -> dict:
        """The parameters under torch's names (``weight_ih_l0``, …): loads into the torch module."""
        return {n: getattr(self, n).detach().clone() for n in self._flat_weights_names}

    def _torch_type(self):
        return {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(self.mode, nn.RNN)

    def to_torch(self) -> nn.Module:
        """The torch module computing the same function (weights copied), e.g. for fast inference."""
        p = next(self.parameters())
        kw = dict(num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                  bidirectional=self.bidirectional, device=p.device, dtype=p.dtype)
        if self.mode == "LSTM":
            kw["proj_size"] = self.proj_size
        if self.mode.startswith("RNN"):
            kw["nonlinearity"] = "relu" if self.mode == "RNN_RELU" else "tanh"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dropout/num_layers warning was given for this module already
            out = self._torch_type()(self.input_size, self.hidden_size, **kw)
        out.load_state_dict(self.torch_state_dict())
        return out.train(self.training)

    @classmethod
    def from_torch(cls, module: nn.Module) -> "_DPRNNBase":
        """The same function as ``module`` (nn.LSTM/GRU/RNN or Opacus' DPLSTM/DPGRU/DPRNN), weights and their
        ``requires_grad`` copied, same device, dtype and mode."""
        return _convert_one(module, cls)

    # -- the recurrence -----------------------------------------------------------------------------
    def _cell(self, layer: int, suffix: str, xi: Tensor, h: Tensor, c: Optional[Tensor]):
        """One time step from the precomputed input part ``xi = W_ih x_t + b_ih``: ``(h', c')``."""
        gh = getattr(self, f"hh_l{layer}{suffix}")(h)
        if self.mode == "LSTM":
            i, f, g, o = (xi + gh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if self.proj_size:
                h = getattr(self, f"hr_l{layer}{suffix}")(h)
            return h, c
        if self.mode == "GRU":
            xr, xz, xn = xi.chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h, None
        pre = xi + gh
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    def _direction(self, layer: int, suffix: str, x: Tensor, h: Tensor, c: Optional[Tensor],
                   mask: Optional[Tensor]):
        """One layer, one direction over batch-first ``x`` [B, T, I]: (outputs [B, T, H_out], h_T, c_T)."""
        T = x.shape[1]
        xi = getattr(self, f"ih_l{layer}{suffix}")(x)  # [B, T, G·H]: one use over all positions
        steps = range(T - 1, -1, -1) if suffix else range(T)
        outs: List[Optional[Tensor]] = [None] * T
        for t in steps:
            h_new, c_new = self._cell(layer, suffix, xi[:, t], h, c)
            if mask is not None:  # past an example's length its state is held (gradient exactly 0 there)
                m = mask[:, t:t + 1]
                h_new = torch.where(m, h_new, h)
                if c_new is not None:
                    c_new = torch.where(m, c_new, c)
                outs[t] = torch.where(m, h_new, torch.zeros((), dtype=h_new.dtype, device=h_new.device))
            else:
                outs[t] = h_new
            h, c = h_new, c_new
        if T == 0:
            return x.new_zeros(x.shape[0], 0, h.shape[-1]), h, c
        return torch.stack(outs, 1), h, c

    def _initial_state(self, hx, B: int, dtype, device, unbatched: bool):
        L = self.num_layers * self.num_directions
        out_size = self.proj_size or self.hidden_size
        if self.mode == "LSTM":
            if hx is None:
                return (torch.zeros(L, B, out_size, dtype=dtype, device=device),
                        torch.zeros(L, B, self.hidden_size, dtype=dtype, device=device))
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise RuntimeError("LSTM expects hx as a tuple (h_0, c_0)")
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            self._check_state(h0, (L, B, out_size), "h_0")
            self._check_state(c0, (L, B, self.hidden_size), "c_0")
            return h0, c0
        if hx is None:
            return torch.zeros(L, B, self.hidden_size, dtype=dtype, device=device), None
        if isinstance(hx, (tuple, list)):
            raise RuntimeError(f"{type(self).__name__} expects hx as a single tensor h_0")
        h0 = hx.unsqueeze(1) if unbatched else hx
        self._check_state(h0, (L, B, self.hidden_size), "h_0")
        return h0, None

    @staticmethod
    def _check_state(t: Tensor, shape, name: str) -> None:
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"Expected hidden size {tuple(shape)}, got {list(t.shape)} ({name})")

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        unbatched = False
        mask = None
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=True)  # [B, T, I] in the original batch order
            steps = torch.arange(x.shape[1], device=x.device)
            mask = steps.unsqueeze(0) < lengths.to(x.device).unsqueeze(1)  # [B, T]
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            unbatched = input.dim() == 2
            if unbatched:
                x = input.unsqueeze(0)  # a batch of one example: [1, T, I]
            else:
                x = input if self.batch_first else input.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.shape[-1]}")
        B = x.shape[0]
        h0, c0 = self._initial_state(hx, B, x.dtype, x.device, unbatched)  # [L·dirs, B, H]: h0[k] is batch-first
        hs, cs = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for d, suffix in enumerate(self._suffixes()):
                k = layer * self.num_directions + d
                out, h, c = self._direction(layer, suffix, layer_input, h0[k], None if c0 is None else c0[k], mask)
                outs.append(out)
                hs.append(h)
                cs.append(c)
            layer_input = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        output = layer_input
        h_n = torch.stack(hs, 0)  # [L·dirs, B, H]
        c_n = torch.stack(cs, 0) if self.mode == "LSTM" else None
        if packed:
            output = _repack(output, input)
        elif unbatched:
            output, h_n = output.squeeze(0), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif not self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if self.mode == "LSTM" else h_n)


def _repack(padded: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack batch-first ``padded`` [B, T, F] (original batch order) with the batch sizes and permutation of
    ``like``: row r of the packed data is (time t, sorted position b) in time-major order, as torch packs."""
    batch_sizes = like.batch_sizes
    sorted_idx = like.sorted_indices
    dev = padded.device
    t_idx = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes).to(dev)
    b_sorted = torch.cat([torch.arange(int(n)) for n in batch_sizes]).to(dev)
    b_orig = sorted_idx.to(dev)[b_sorted] if sorted_idx is not None else b_sorted
    return PackedSequence(padded[b_orig, t_idx], batch_sizes, like.sorted_indices, like.unsorted_indices)


class DPLSTM(_DPRNNBase):
    """Drop-in for nn.LSTM (same arguments, inputs, outputs and function) from nn.Linear cells.

    ``DPLSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None)``; ``forward(input, (h_0, c_0)=None)`` returns
    ``output, (h_n, c_n)``; input ``[T, B, I]`` (``[B, T, I]`` with ``batch_first``), ``[T, I]`` unbatched, or a
    PackedSequence."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)


class DPGRU(_DPRNNBase):
    """Drop-in for nn.GRU (same arguments, inputs, outputs and function) from nn.Linear cells.

    ``DPGRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, device=None, dtype=None)``; ``forward(input, h_0=None)`` returns ``output, h_n``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"DPGRU got unexpected arguments {sorted(kwargs)}")
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype)


class DPRNN(_DPRNNBase):
    """Drop-in for nn.RNN (same arguments, in torch's order, inputs, outputs and function) from nn.Linear cells.

    ``DPRNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None)``; ``forward(input, h_0=None)`` returns
    ``output, h_n``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"DPRNN got unexpected arguments {sorted(kwargs)}")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, 0, device, dtype)


def _accept_torch_names(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    """Load-state-dict pre-hook: torch-style keys (``weight_ih_l0``; also what Opacus' DP RNNs save) are renamed
    to this module's (``ih_l0.weight``) before loading."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        m = _TORCH_NAME.match(key[len(prefix):])
        if m is not None:
            kind, mat, layer, rev = m.groups()
            state_dict[f"{prefix}{mat}_l{layer}{rev or ''}.{kind}"] = state_dict.pop(key)


# -- conversion ----------------------------------------------------------------------------------------

_OPACUS_RNN_MODULE = "opacus.layers.dp_rnn"
_OPACUS_RNNS = ("DPLSTM", "DPGRU", "DPRNN")


def is_opacus_rnn(module: nn.Module) -> bool:
    """An Opacus ``DPLSTM``/``DPGRU``/``DPRNN`` (recognized by class and module path; opacus is not imported)."""
    t = type(module)
    return t.__module__ == _OPACUS_RNN_MODULE and t.__name__ in _OPACUS_RNNS


def is_opacus_rnn_linear(module: nn.Module) -> bool:
    """Opacus' ``RNNLinear``: an nn.Linear subclass with nn.Linear's forward (checked)."""
    t = type(module)
    return (t.__module__ == _OPACUS_RNN_MODULE and t.__name__ == "RNNLinear" and isinstance(module, nn.Linear)
            and t.forward is nn.Linear.forward and t.__call__ is nn.Module.__call__)


def convertible_rnn(module: nn.Module) -> bool:
    """``module`` is one that :func:`convert_rnn` replaces: exactly nn.LSTM/GRU/RNN or an Opacus DP RNN."""
    return type(module) in (nn.LSTM, nn.GRU, nn.RNN) or is_opacus_rnn(module)


def _target_type(module: nn.Module):
    t = type(module)
    if t is nn.LSTM or (is_opacus_rnn(module) and t.__name__ == "DPLSTM"):
        return DPLSTM
    if t is nn.GRU or (is_opacus_rnn(module) and t.__name__ == "DPGRU"):
        return DPGRU
    return DPRNN


def _convert_one(module: nn.Module, cls=None) -> _DPRNNBase:
    if not convertible_rnn(module):
        raise TypeError(f"cannot convert {type(module).__name__}: expected nn.LSTM, nn.GRU, nn.RNN or Opacus' "
                        f"DPLSTM/DPGRU/DPRNN")
    target = _target_type(module)
    if cls is not None and cls is not _DPRNNBase and cls is not target:
        raise TypeError(f"{cls.__name__}.from_torch got a {type(module).__name__}; use {target.__name__}.from_torch")
    opacus = is_opacus_rnn(module)
    proj = 0 if opacus else int(getattr(module, "proj_size", 0))
    ref = next(module.parameters())
    kw = dict(num_layers=module.num_layers, bias=bool(module.bias), batch_first=bool(module.batch_first),
              dropout=float(module.dropout), bidirectional=bool(module.bidirectional), device=ref.device,
              dtype=ref.dtype)
    if target is DPLSTM:
        kw["proj_size"] = proj
    if target is DPRNN:
        if opacus:
            kw["nonlinearity"] = module.cell_params.get("nonlinearity", "tanh")
        else:
            kw["nonlinearity"] = module.nonlinearity
    if opacus and module.dropout > 0:
        warnings.warn(f"converting Opacus' {type(module).__name__} with dropout={module.dropout}: Opacus applies "
                      f"dropout to the hidden state at every time step of every layer (inside the recurrence), "
                      f"the converted module between layers only, as nn.{target.__name__[2:]} does. The function "
                      f"is the same in eval mode; in train mode the dropout differs", stacklevel=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch module warned about dropout/num_layers already
        new = target(module.input_size, module.hidden_size, **kw)
    with torch.no_grad():
        for name in new._flat_weights_names:
            src = getattr(module, name)
            dst = getattr(new, name)
            dst.copy_(src)
            dst.requires_grad_(src.requires_grad)
    return new.train(module.training)


def convert_rnn(module: nn.Module) -> nn.Module:
    """Replace every nn.LSTM/nn.GRU/nn.RNN and every Opacus DPLSTM/DPGRU/DPRNN in ``module`` (in place; the root
    too) by :class:`DPLSTM`/:class:`DPGRU`/:class:`DPRNN` computing the same function, weights copied."""
    if convertible_rnn(module):
        return _convert_one(module)
    for name, child in module.named_children():
        setattr(module, name, convert_rnn(child))
    return module


# -- Opacus' DP RNNs used as they are ----------------------------------------------------------------

class _OpacusAliasNames:
    """The names under which Opacus' DP RNNs register their cells' parameters a second time (torch's)."""

    def __contains__(self, name) -> bool:
        m = _TORCH_NAME.match(str(name))
        return m is not None and m.group(2) in ("ih", "hh")

    def __iter__(self):
        return iter(["weight_ih_l*", "weight_hh_l*", "bias_ih_l*", "bias_hh_l*"])


class OpacusRNNRule(LayerRule):
    """Opacus' ``DPLSTM``/``DPGRU``/``DPRNN`` passed as they are (without ``fix_model``).

    Opacus registers every parameter of its ``RNNLinear`` cells a second time on the RNN module under torch's
    name (``weight_ih_l0`` is ``l0.ih.weight``). The cells get the Linear rule (exact over the time steps); this
    rule owns the second names only, runs Opacus' own forward, and never records anything: the engine sees
    each such parameter shared by two modules and clips the sum of the per-example gradients over its uses
    (materialized, as Opacus does). A PackedSequence is refused (Opacus feeds the cells a shrinking batch at
    each time step): ``fix_model`` converts the module to :class:`DPLSTM` etc., which handle it exactly."""

    owned_params = _OpacusAliasNames()

    def problems(self, module: nn.Module) -> List[str]:
        cell_params = {id(p) for name, p in module.named_parameters(remove_duplicate=False) if "." in name}
        stray = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in cell_params]
        if stray:
            return [f"parameters {stray} are not the parameters of its RNNLinear cells, so no rule computes their "
                    f"per-example gradients; convert the module: model = dpsat_fast.fix_model(model)"]
        return []

    def forward(self, module: nn.Module, record, input, state_init=None):
        if isinstance(input, PackedSequence):
            raise ValueError(
                f"{record.name}: Opacus' {type(module).__name__} with a PackedSequence feeds its RNNLinear cells a "
                f"batch that shrinks at every time step, so the rows of a Linear would not be the examples; convert "
                f"it exactly with model = dpsat_fast.fix_model(model) (dpsat_fast.layers.{type(module).__name__} "
                f"handles PackedSequence exactly)")
        return type(module).forward(module, input, state_init)

    def per_example_grads(self, record, uses, names):
        raise RuntimeError("Opacus' DP RNN parameters are computed by the rules of its RNNLinear cells")


__all__ = ["DPLSTM", "DPGRU", "DPRNN", "convert_rnn", "convertible_rnn", "is_opacus_rnn", "is_opacus_rnn_linear",
           "OpacusRNNRule"]
