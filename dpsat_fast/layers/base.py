"""The contract between the engine and a per-sample gradient rule for one family of layers.

A rule replaces the forward of a supported module with a custom autograd function whose backward

* returns only the input gradient (autograd never computes the module's parameter gradients), and
* hands the tensors that determine the per-example parameter gradients (e.g. layer input ``a`` and
  output gradient ``g``) to the module's :class:`ModuleRecord`, one entry per use of the module.

After the backward the engine asks the rule, per parameter, for per-example squared norms and for the
clipped sum ``Σ_i s_i G_i``, optionally with the DP noise added in the same pass (:class:`NoiseRequest`). All tensors in a use have the batch as leading dimension, so the engine can
zero the rows of non-finite examples uniformly. A module used several times in one forward gets one
use per call; rules combine uses exactly (the per-example gradient is the sum over uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

Use = Dict[str, Tensor]


@dataclass
class NoiseRequest:
    """Add ``std · ξ`` to the clipped sum of parameter ``name``, ``ξ[j] = tl.randn(seed, offsets[name] + j)``
    in row-major order of the parameter (the DP optimizer's noise, fused into the sum's epilogue)."""

    seed: int
    std: float
    offsets: Dict[str, int]

    def of(self, name: str) -> Tuple[int, int, float]:
        """``(seed, offset, std)`` for parameter ``name`` (std 0: no noise for it in this sum)."""
        if name in self.offsets:
            return self.seed, self.offsets[name], self.std
        return 0, 0, 0.0

    def covers(self, names: Sequence[str]) -> bool:
        """Noise is requested for every one of ``names`` (kernels that write several parameters at once fuse
        only then; otherwise the engine adds the noise afterwards)."""
        return all(n in self.offsets for n in names)


NO_NOISE = NoiseRequest(0, 0.0, {})


ClippedSums = Tuple[Dict[str, Tensor], Set[str]]


class ModuleRecord:
    """What the backward of one hooked module left behind, until the engine consumes it.

    ``accept(record, ctx)`` is the engine's gate, asked by :meth:`add_use` before anything is recorded: it
    returns False for a backward that writes no parameter gradient (``torch.autograd.grad``, ``backward(
    inputs=...)``) and raises for a second backward through the same forward; ``on_record(record)`` is told
    of every recorded use."""

    def __init__(self, name: str, module: nn.Module, rule: "LayerRule", param_names: Sequence[str],
                 on_record: Callable[["ModuleRecord"], None],
                 accept: Optional[Callable[["ModuleRecord", object], bool]] = None):
        self.name = name
        self.module = module
        self.rule = rule
        self.param_names = tuple(param_names)
        self.uses: List[Use] = []
        #: what a rule computed from the uses and wants again later in the same backward (cleared with them)
        self.cache: Dict[str, Tensor] = {}
        #: forwards with gradients recorded since the record was last consumed (uses to expect in the backward)
        self.forward_calls = 0
        self._on_record = on_record
        self._accept = accept
        #: the engine's view of a parameter for the forward (``w + ε`` under a DP-SAT perturbation, else ``w``)
        self.effective: Callable[[Optional[Tensor]], Optional[Tensor]] = lambda p: p

    def accepts(self, ctx=None) -> bool:
        """Asks the engine's gate whether the running backward is to be recorded (see the class docstring; a
        ``ctx`` is marked as recorded, so ask once per backward). For a rule that has work to do before it can
        add its use (a recompute): ask first, then :meth:`add_accepted_use`."""
        return self._accept is None or self._accept(self, ctx)

    def add_use(self, ctx=None, **tensors: Tensor) -> None:
        """Called from a rule's backward (with its autograd ``ctx``) with batch-leading tensors."""
        if self.accepts(ctx):
            self.add_accepted_use(**tensors)

    def add_accepted_use(self, **tensors: Tensor) -> None:
        """Records a use after :meth:`accepts` said yes for this backward."""
        self.uses.append(tensors)
        self._on_record(self)

    def clear(self) -> None:
        self.uses = []
        self.cache = {}


class LayerRule:
    """Per-sample gradient rule for one module family. Subclasses implement ``forward`` and either
    ``per_example_grads`` (small parameters) or all three of the per-parameter methods."""

    #: Module types handled by this rule (exact type match: a subclass may have another forward).
    module_types: tuple = ()
    #: Names of the module's own parameters that this rule computes per-example gradients for. Any other
    #: trainable parameter of the module (e.g. ``weight_g``/``weight_v`` of ``torch.nn.utils.weight_norm``)
    #: is refused by validation: the rule would never see its gradient.
    owned_params: tuple = ("weight", "bias")

    def forward(self, module: nn.Module, record: ModuleRecord, *args, **kwargs) -> Tensor:
        raise NotImplementedError

    def problems(self, module: nn.Module) -> List[str]:
        """Configurations of this module that the rule cannot make private (empty if fine)."""
        return []

    def per_example_grads(self, record: ModuleRecord, uses: List[Use], names: Sequence[str]) -> Dict[str, Tensor]:
        """Materialized per-example gradients ``{name: [B, *param.shape]}`` summed over uses."""
        raise NotImplementedError

    def sq_norms(self, record: ModuleRecord, uses: List[Use], names: Sequence[str]) -> Dict[str, Tensor]:
        """Per-example squared gradient norms ``{name: [B]}``."""
        grads = self.per_example_grads(record, uses, names)
        return {n: grads[n].flatten(1).pow(2).sum(1) for n in names}

    def clipped_sums(self, record: ModuleRecord, uses: List[Use], scale: Tensor, names: Sequence[str],
                     noise: Optional[NoiseRequest] = None) -> ClippedSums:
        """``{name: Σ_i scale_i G_i}`` with ``scale`` of shape [B], and the names whose sum already carries the
        requested noise (the engine adds it to the others)."""
        grads = self.per_example_grads(record, uses, names)
        return {n: torch.tensordot(scale.to(grads[n].dtype), grads[n], dims=1) for n in names}, set()


def as_batch_positions_features(t: Tensor) -> Tensor:
    """[B, *, F] -> [B, T, F] with T the product of the middle dimensions (also for B = 0)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def sum_over_uses(tensors: List[Tensor]) -> Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


_SQ_NORM_CHUNK = 1 << 22


def materialized_sq_norms(pe: Tensor) -> Tensor:
    """``‖pe_i‖²`` of materialized per-example gradients ``pe`` [B, *shape] as float64, never below the exact
    value: each square is exact in float64 (a float32 or 16-bit value squared fits in 53 bits), the sum of n
    terms errs by at most n·2⁻⁵³ relative, and the result is scaled up by that much. A clipped sum built from
    these same tensors adds exactly ``c_i·pe_i`` for example i (up to the rounding of the sum over examples),
    so this is a certified clipping norm for them."""
    B = pe.shape[0]
    n = max(1, math.prod(pe.shape[1:]))
    flat = pe.reshape(B, math.prod(pe.shape[1:]))
    step = max(1, _SQ_NORM_CHUNK // n)
    out = torch.empty(B, dtype=torch.float64, device=pe.device)
    for s in range(0, B, step):
        out[s:s + step] = flat[s:s + step].double().pow(2).sum(1)
    return out * (1.0 + (n + 2) * 2.0 ** -53)


def materialized_clipped_sums(grads: Dict[str, Tensor], scale: Tensor, noise: Optional[NoiseRequest]) -> ClippedSums:
    """``{name: Σ_i scale_i grads[name]_i (+ the requested noise)}`` for materialized per-example gradients
    ``grads[name]`` [B, *shape], and the names whose sum carries the noise (one pass over each tensor)."""
    from .. import ops

    out, noised = {}, set()
    for n, g in grads.items():
        seed, offset, std = noise.of(n) if noise is not None else (0, 0, 0.0)
        if std:
            noised.add(n)
        flat = g.reshape(g.shape[0], math.prod(g.shape[1:])).contiguous()
        out[n] = ops.per_example_clipped_sum_with_noise(flat, scale, seed, offset, std).view(g.shape[1:])
    return out, noised
