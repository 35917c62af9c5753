"""Book-keeping engine: per-example clipping with one backward pass (DESIGN.md §2.4).

Attaching the engine swaps the forward of every module with trainable parameters for its layer rule's
custom autograd function. During ``loss.backward()`` autograd computes only input gradients; each rule
records, per use of its module, what determines the per-example parameter gradients (layer input and
output gradient, or the small per-example gradients of norm layers). When the backward ends the engine

1. computes per-example squared norms of every trainable parameter (ghost or instantiate route),
2. turns them into per-example scales with the clipping style (flat: ``min(1, C/(‖g_i‖+1e-6))``),
3. writes the clipped sum ``Σ_i c_i G_i`` (one GEMM with a per-row scale per layer) into
   :attr:`BookKeepingEngine.summed_grads`, accumulating over backward passes (micro-batches).

The DP optimizer consumes ``summed_grads`` once per logical step and divides by the public expected batch
size. The Gaussian noise is added exactly once per parameter and step: when an optimizer has registered a
:attr:`noise_planner`, the first backward of a step adds it in the epilogue of the clipped-sum kernels (the
offsets the optimizer would use itself, so the bits are the same either way); otherwise the optimizer adds
it when it releases the gradient. A parameter used by several modules (tied weights) is handled exactly by
summing materialized per-example gradients over its owners.
"""

from __future__ import annotations

import types
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .clipping import ClippingStyle, make_clipping
from . import ops
from .layers import ModuleRecord, get_rule
from .layers.base import NoiseRequest
from .layers.base import sum_over_uses
from .ops.torch_impl import accum_dtype
from .validation import PrivacyConfigError, validate_model


@dataclass
class NoisePlan:
    """The noise of the coming release: ``std · ξ`` with ``ξ[j] = tl.randn(seed, offsets[p] + j)`` for parameter p."""

    seed: int
    std: float
    offsets: Dict[nn.Parameter, int]


class _PrivateForward:
    """The forward of a hooked module: its rule's custom function while gradients are recorded, the module's
    own forward otherwise. A deep copy of the module gets its plain forward back (it is not attached)."""

    def __init__(self, record: ModuleRecord):
        self.record = record

    def __call__(self, *args, **kwargs):
        m = self.record.module
        if not torch.is_grad_enabled():
            return type(m).forward(m, *args, **kwargs)
        self.record.forward_calls += 1
        return self.record.rule.forward(m, self.record, *args, **kwargs)

    def __deepcopy__(self, memo):
        copy = memo.get(id(self.record.module))
        if copy is None:
            raise RuntimeError("deep-copy the whole model, not the forward of one of its hooked modules")
        return types.MethodType(type(copy).forward, copy)


class BookKeepingEngine:
    """Per-example clipping for ``module`` (modified in place until :meth:`detach`).

    Args:
        module: the model; validated before anything else happens.
        max_grad_norm: clipping norm C.
        loss_reduction: ``"mean"`` if the loss averages over the batch dimension (the engine rescales the
            output gradients by the realized batch size to get per-example gradients), ``"sum"`` otherwise.
        clipping: ``"flat"``, ``"automatic"``, ``"per_layer"`` or a :class:`~dpsat_fast.clipping.ClippingStyle`
            (e.g. :class:`~dpsat_fast.clipping.GroupWiseClipping`).
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean",
                 clipping: str | ClippingStyle = "flat"):
        if loss_reduction not in ("mean", "sum"):
            raise PrivacyConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.clipping = make_clipping(clipping, max_grad_norm)
        validate_model(module)
        self.module = module
        self.loss_reduction = loss_reduction
        self.records: List[ModuleRecord] = []
        self.summed_grads: Dict[nn.Parameter, Tensor] = {}
        self.last_sq_norms: Dict[str, Tensor] = {}
        self.last_batch_size = 0
        #: set by a DP optimizer: returns the noise plan of its next release (None: the sums stay noise-free)
        self.noise_planner: Optional[Callable[[], NoisePlan]] = None
        self._noised: Dict[nn.Parameter, Tuple[int, int, float]] = {}
        self._callback_queued = False
        self._eager_sq: Dict[str, Tensor] = {}
        self._eager_batch: Optional[int] = None
        self._patched: List[Tuple[nn.Module, Optional[object]]] = []
        self._hook_handles = []

        owners: Dict[int, List[Tuple[ModuleRecord, str]]] = defaultdict(list)
        self.param_keys: Dict[nn.Parameter, str] = {}
        for name, m in module.named_modules():
            trainable = [(pn, p) for pn, p in m.named_parameters(recurse=False) if p.requires_grad]
            if not trainable:
                continue
            rec = ModuleRecord(name, m, get_rule(m), [pn for pn, _ in trainable], self._on_record)
            self.records.append(rec)
            for pn, p in trainable:
                owners[id(p)].append((rec, pn))
                self.param_keys.setdefault(p, f"{name}.{pn}" if name else pn)
        self.params: List[nn.Parameter] = list(self.param_keys)
        self.clipping.bind({key: p.numel() for p, key in self.param_keys.items()})
        self._shared = {id(p): owners[id(p)] for p in self.params if len(owners[id(p)]) > 1}
        # per record: parameter names it handles alone (shared ones go through per-example grads)
        self._own_names = {id(rec): [pn for pn in rec.param_names
                                     if id(getattr(rec.module, pn)) not in self._shared] for rec in self.records}
        for rec in self.records:
            self._patch(rec)
        # Autograd must never deliver a gradient to a hooked parameter: watch its AccumulateGrad node (kept
        # alive here, as DDP does) and fail loudly if a use outside the layer rules reaches it.
        self._grad_accumulators = []
        for p in self.params:
            acc = p.view_as(p).grad_fn.next_functions[0][0]
            self._grad_accumulators.append(acc)
            self._hook_handles.append(acc.register_prehook(self._autograd_touched(p)))

    # -- attaching -----------------------------------------------------------------------------
    def _patch(self, rec: ModuleRecord) -> None:
        m = rec.module
        self._patched.append((m, m.__dict__.get("forward")))
        m.forward = _PrivateForward(rec)

    def _autograd_touched(self, p: nn.Parameter):
        key = self.param_keys[p]

        def hook(grad_outputs):
            if grad_outputs[0] is None:
                return None
            raise RuntimeError(
                f"parameter '{key}' received a gradient from autograd, i.e. it was used outside the forward "
                f"of its module (e.g. a functional call on module.weight); its per-example gradient cannot be "
                f"clipped. Use the parameter only through its module, or freeze it (for an L2 penalty on the weights "
                f"use the optimizer's weight_decay instead of a loss term).")
        return hook

    def detach(self) -> None:
        """Restore the model's own forwards and remove all hooks."""
        for m, previous in self._patched:
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
        for h in self._hook_handles:
            h.remove()
        self._patched, self._hook_handles, self._grad_accumulators = [], [], []
        for rec in self.records:
            rec.clear()

    # -- the end of a backward pass ------------------------------------------------------------
    def _on_record(self, record: ModuleRecord) -> None:
        if not self._callback_queued:  # the first record of a backward pass
            self._callback_queued = True
            self._eager_sq, self._eager_batch = {}, None
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        if self._eager(record):
            # per-layer clipping: this layer's clip factors depend on its own norms only, so its clipped sum is
            # formed now, during the backward, and its output gradient is freed at once
            try:
                with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
                    sq, B = self._clip_and_accumulate([record])
                self._eager_sq.update(sq)
                self._eager_batch = B
            finally:
                record.clear()
                record.forward_calls = 0

    def _eager(self, record: ModuleRecord) -> bool:
        """Per-module clipping, the module's only forward of the step, no parameter shared with another."""
        return (self.clipping.per_module and record.forward_calls == 1 and len(record.uses) == 1
                and bool(self._own_names[id(record)])
                and all(id(getattr(record.module, pn)) not in self._shared for pn in record.param_names))

    def _finish_backward(self) -> None:
        self._callback_queued = False
        records = [r for r in self.records if r.uses]
        try:
            sq, B = {}, self._eager_batch
            if records:
                # norms and clipped sums are computed at fp32 (fp64) whatever autocast the forward ran under
                with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
                    sq, B = self._clip_and_accumulate(records)
            if records or self._eager_sq:
                self.last_sq_norms = {**self._eager_sq, **sq}
                self.last_batch_size = B
        finally:
            for r in records:
                r.clear()
            for r in self.records:
                r.forward_calls = 0

    def _batch_size(self, records: List[ModuleRecord]) -> int:
        sizes = {t.shape[0] for r in records for u in r.uses for t in u.values()}
        if len(sizes) != 1:
            names = [r.name for r in records]
            raise RuntimeError(f"modules {names} saw different batch sizes {sorted(sizes)} in one backward; "
                               f"the batch must be the first dimension of every supported layer's input")
        return sizes.pop()

    def _sq_norms(self, records: List[ModuleRecord]) -> Tuple[Dict[str, Tensor], Dict[int, Tensor]]:
        """Per-parameter per-example squared norms (raw: before the loss-reduction factor)."""
        sq: Dict[str, Tensor] = {}
        for r in records:
            names = self._own_names[id(r)]
            if names:
                for pn, v in r.rule.sq_norms(r, r.uses, names).items():
                    sq[self.param_keys[getattr(r.module, pn)]] = v
        shared_grads: Dict[int, Tensor] = {}
        in_batch = {id(r) for r in records}
        for pid, owners in self._shared.items():
            parts = [r.rule.per_example_grads(r, r.uses, [pn])[pn] for r, pn in owners if r.uses and id(r) in in_batch]
            if parts:
                pe = sum_over_uses(parts)
                shared_grads[pid] = pe
                sq[self.param_keys[getattr(owners[0][0].module, owners[0][1])]] = pe.flatten(1).pow(2).sum(1)
        return sq, shared_grads

    def _clip_and_accumulate(self, records: List[ModuleRecord]) -> None:
        B = self._batch_size(records)
        factor = float(B) if self.loss_reduction == "mean" else 1.0
        sq, shared_grads = self._sq_norms(records)
        total = torch.stack(list(sq.values())).sum(0)
        finite = torch.isfinite(total)
        if not bool(finite.all()):
            self._drop_examples(records, ~finite)
            sq, shared_grads = self._sq_norms(records)
        sq = {k: v * factor ** 2 for k, v in sq.items()}
        scales = self.clipping.scales(sq)
        plan = self.noise_planner() if self.noise_planner is not None else None
        for r in records:
            names = self._own_names[id(r)]
            if not names:
                continue
            key = self.param_keys[getattr(r.module, names[0])]
            request = self._noise_request(plan, {pn: getattr(r.module, pn) for pn in names})
            sums, noised = r.rule.clipped_sums(r, r.uses, scales[key] * factor, names, request)
            for pn, s in sums.items():
                self._accumulate(getattr(r.module, pn), s, request, pn, pn in noised)
        for pid, pe in shared_grads.items():
            rec, pn = self._shared[pid][0]
            p = getattr(rec.module, pn)
            s = torch.tensordot(scales[self.param_keys[p]].to(pe.dtype) * factor, pe, dims=1)
            self._accumulate(p, s, self._noise_request(plan, {pn: p}), pn, False)
        return sq, B

    def _noise_request(self, plan: Optional[NoisePlan], params: Dict[str, nn.Parameter]) -> Optional[NoiseRequest]:
        """Noise for the parameters whose first clipped sum of the step this is."""
        if plan is None:
            return None
        offsets = {pn: plan.offsets[p] for pn, p in params.items() if p in plan.offsets and p not in self.summed_grads}
        return NoiseRequest(plan.seed, plan.std, offsets) if offsets else None

    def _drop_examples(self, records: List[ModuleRecord], bad: Tensor) -> None:
        """Non-finite examples contribute zero: zero their rows in every recorded tensor."""
        for r in records:
            r.uses = [{k: torch.where(bad.view(-1, *([1] * (t.dim() - 1))), torch.zeros((), dtype=t.dtype,
                                                                                      device=t.device), t)
                       for k, t in u.items()} for u in r.uses]

    def _accumulate(self, p: nn.Parameter, s: Tensor, request: Optional[NoiseRequest], name: str,
                    noised: bool) -> None:
        s = s.reshape(p.shape).to(accum_dtype(p))
        if request is not None and name in request.offsets:
            if not noised:  # the rule could not fuse it: add the same noise here
                s = s.contiguous()
                ops.add_noise_and_scale_(s, request.seed, request.offsets[name], request.std, 1.0)
            self._noised[p] = (request.seed, request.offsets[name], request.std)
        prev = self.summed_grads.get(p)
        self.summed_grads[p] = s if prev is None else prev.add_(s)

    # -- for the optimizer -----------------------------------------------------------------------
    def take_summed_grad(self, p: nn.Parameter) -> Tuple[Tensor, Optional[Tuple[int, int, float]]]:
        """The clipped sum accumulated for ``p`` since the last call (zeros if it got none), in fp32/fp64, and
        the (seed, offset, std) of the noise already in it (None if none is)."""
        s = self.summed_grads.pop(p, None)
        if s is None:
            s = torch.zeros(p.shape, dtype=accum_dtype(p), device=p.device)
        return s, self._noised.pop(p, None)

    def pop_summed_grad(self, p: nn.Parameter) -> Tensor:
        """:meth:`take_summed_grad` without the noise record."""
        return self.take_summed_grad(p)[0]

    def clear(self) -> None:
        """Drop accumulated clipped sums (with any noise already in them) and unconsumed records."""
        self.summed_grads.clear()
        self._noised.clear()
        for r in self.records:
            r.clear()
