"""Book-keeping engine: per-example clipping with one backward pass (docs/algorithms.md §4).

Attaching the engine swaps the forward of every module with trainable parameters for its layer rule's
custom autograd function. During ``loss.backward()`` autograd computes only input gradients; each rule
records, per use of its module, what determines the per-example parameter gradients (layer input and
output gradient, or the small per-example gradients of norm layers). When the backward ends the engine

1. computes per-example squared norms of every trainable parameter (ghost or instantiate route), each a
   certified upper bound of what the clipped sum adds for the example, rounding included (docs/privacy.md),
2. turns them into per-example scales with the clipping style (flat: ``min(1, C/(‖g_i‖+1e-6))``),
3. writes the clipped sum ``Σ_i c_i G_i`` (one GEMM with a per-row scale per layer) into
   :attr:`BookKeepingEngine.summed_grads`, accumulating over backward passes (micro-batches).

The DP optimizer consumes ``summed_grads`` once per logical step and divides by the public expected batch
size. The Gaussian noise is added exactly once per parameter and step: when an optimizer has registered a
:attr:`noise_planner`, the first backward of a step adds it in the epilogue of the clipped-sum kernels (the
offsets the optimizer would use itself, so the bits are the same either way); otherwise the optimizer adds
it when it releases the gradient. A parameter used by several modules (tied weights) is handled exactly by
summing materialized per-example gradients over its owners. DP-SAT's perturbation (:meth:`set_perturbation`)
is applied inside the hooked forwards and never written into the parameters.
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
from .layers.base import materialized_sq_norms
from .validation import PrivacyConfigError, install_forward_guards, validate_model


@dataclass
class NoisePlan:
    """The noise of the coming release: ``std · ξ`` with ``ξ[j] = tl.randn(seed, offsets[p] + j)`` for parameter p."""

    seed: int
    std: float
    offsets: Dict[nn.Parameter, int]


class BackwardTwiceError(RuntimeError):
    """A second backward pass through one forward (``retain_graph=True``): the per-example gradient of the
    combined loss is not the sum of two separately clipped gradients."""


class _PrivateForward:
    """The forward of a hooked module: its rule's custom function while gradients are recorded, the module's
    own forward otherwise. A deep copy of the module gets its plain forward back (it is not attached)."""

    def __init__(self, record: ModuleRecord, engine: "BookKeepingEngine"):
        self.record = record
        self.engine = engine

    def __call__(self, *args, **kwargs):
        m = self.record.module
        if not torch.is_grad_enabled():
            return type(m).forward(m, *args, **kwargs)
        self.engine._before_forward(self.record)
        return self.record.rule.forward(m, self.record, *args, **kwargs)

    def __deepcopy__(self, memo):
        copy = memo.get(id(self.record.module))
        if copy is None:
            raise RuntimeError("deep-copy the whole model, not the forward of one of its hooked modules")
        return types.MethodType(type(copy).forward, copy)

    def __reduce__(self):
        # torch.save(model) / pickle of an attached model: the copy is a plain model (not attached)
        return _plain_forward, (self.record.module,)


def _plain_forward(module: nn.Module):
    return types.MethodType(type(module).forward, module)


class _ZeroGradClearing:
    """``model.zero_grad`` of an attached model: also drops what the engine recorded since the last step."""

    def __init__(self, engine: "BookKeepingEngine"):
        self.engine = engine

    def __call__(self, set_to_none: bool = True) -> None:
        self.engine.clear()
        type(self.engine.module).zero_grad(self.engine.module, set_to_none=set_to_none)

    def __deepcopy__(self, memo):
        copy = memo.get(id(self.engine.module))
        return types.MethodType(type(copy).zero_grad, copy) if copy is not None else None

    def __reduce__(self):
        return _plain_zero_grad, (self.engine.module,)


def _plain_zero_grad(module: nn.Module):
    return types.MethodType(type(module).zero_grad, module)


def _attached(module: nn.Module) -> bool:
    return any(isinstance(m.__dict__.get("forward"), _PrivateForward) for m in module.modules())


class BookKeepingEngine:
    """Per-example clipping for ``module`` (modified in place until :meth:`detach`).

    Args:
        module: the model; validated before anything else happens.
        max_grad_norm: clipping norm C.
        loss_reduction: ``"mean"`` if the loss averages over the batch dimension (the engine rescales the
            output gradients by the realized batch size to get per-example gradients), ``"sum"`` otherwise.
        clipping: ``"flat"``, ``"automatic"``, ``"per_layer"`` or a :class:`~dpsat_fast.clipping.ClippingStyle`
            (e.g. :class:`~dpsat_fast.clipping.GroupWiseClipping`).

    What a step is made of: every ``loss.backward()`` (one per physical micro-batch) adds the clipped sums of
    its examples to :attr:`summed_grads`; a DP optimizer takes them once per logical step with
    :meth:`release`, which also discards everything else, so no sum outlives its step. ``zero_grad`` (of
    the optimizer or the model) discards what was recorded since the last release. A backward that writes
    no parameter gradient (``torch.autograd.grad``, ``backward(inputs=...)``) records nothing; a second
    backward through the same forward is refused (:class:`BackwardTwiceError`: sum the losses first); a
    backward that raised leaves nothing behind (its partial records are dropped at the next forward,
    backward, ``zero_grad`` or release). The set of trainable parameters is fixed at attach: flipping
    ``requires_grad`` of a parameter afterwards is refused at the next forward or release.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean",
                 clipping: str | ClippingStyle = "flat"):
        if loss_reduction not in ("mean", "sum"):
            raise PrivacyConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if _attached(module):
            raise PrivacyConfigError(
                "this model is already attached to a BookKeepingEngine (make_private was called on it before); "
                "detach the first engine (engine.detach(), or privacy_engine.detach()) or make a fresh model private")
        self.clipping = make_clipping(clipping, max_grad_norm)
        validate_model(module)
        self._forward_guards = None
        self.module = module
        self.loss_reduction = loss_reduction
        self.records: List[ModuleRecord] = []
        #: clipped sums of the completed backward passes of the current step
        self.summed_grads: Dict[nn.Parameter, Tensor] = {}
        self.last_sq_norms: Dict[str, Tensor] = {}
        self.last_batch_size = 0
        #: set by a DP optimizer: returns the noise plan of its next release (None: the sums stay noise-free)
        self.noise_planner: Optional[Callable[[], NoisePlan]] = None
        self._noised: Dict[nn.Parameter, Tuple[int, int, float]] = {}
        # the backward pass in flight: its autograd graph task, and the sums it formed so far (merged into
        # summed_grads only when it completes)
        self._backward_task: Optional[int] = None
        self._pending: Dict[nn.Parameter, Tensor] = {}
        self._pending_noised: Dict[nn.Parameter, Tuple[int, int, float]] = {}
        self._eager_sq: Dict[str, Tensor] = {}
        self._eager_batch: Optional[int] = None
        # DP-SAT: the perturbation ε of every trainable parameter for this step's forwards, and w + ε per
        # parameter (computed at the first forward that needs it, recomputed if the weights change)
        self.perturbation: Optional[Dict[nn.Parameter, Tensor]] = None
        self._perturbed: Dict[nn.Parameter, Tuple[tuple, Tensor]] = {}
        # what the completed backward passes of the current step used: sensitivity and number of examples
        self._step_sensitivity: Optional[float] = None
        self._step_examples = 0
        self._patched: List[Tuple[nn.Module, Optional[object]]] = []
        self._hook_handles = []

        owners: Dict[int, List[Tuple[ModuleRecord, str]]] = defaultdict(list)
        self.param_keys: Dict[nn.Parameter, str] = {}
        for name, m in module.named_modules():
            trainable = [(pn, p) for pn, p in m.named_parameters(recurse=False) if p.requires_grad]
            if not trainable:
                continue
            rec = ModuleRecord(name, m, get_rule(m), [pn for pn, _ in trainable], self._on_record, self._accept)
            rec.effective = self.effective
            self.records.append(rec)
            for pn, p in trainable:
                owners[id(p)].append((rec, pn))
                self.param_keys.setdefault(p, f"{name}.{pn}" if name else pn)
        self.params: List[nn.Parameter] = list(self.param_keys)
        self._param_ids = frozenset(map(id, self.params))
        self.clipping.bind({key: p.numel() for p, key in self.param_keys.items()})
        self._shared = {id(p): owners[id(p)] for p in self.params if len(owners[id(p)]) > 1}
        # per record: parameter names it handles alone (shared ones go through per-example grads)
        self._own_names = {id(rec): [pn for pn in rec.param_names
                                     if id(getattr(rec.module, pn)) not in self._shared] for rec in self.records}
        self._record_params = {id(rec): [getattr(rec.module, pn) for pn in rec.param_names] for rec in self.records}
        # frozen parameters of hooked modules: flipping them on later is refused at the forward
        self._record_frozen = {id(rec): [p for p in rec.module.parameters(recurse=False) if not p.requires_grad]
                               for rec in self.records}
        for rec in self.records:
            self._patch(rec)
        self._patched_zero_grad = "zero_grad" in module.__dict__, module.__dict__.get("zero_grad")
        module.zero_grad = _ZeroGradClearing(self)
        # Autograd must never deliver a gradient to a hooked parameter: watch its AccumulateGrad node (kept
        # alive here, as DDP does) and fail loudly if a use outside the layer rules reaches it. The same
        # node tells whether a backward pass writes parameter gradients at all.
        self._grad_accumulators = {}
        for p in self.params:
            acc = p.view_as(p).grad_fn.next_functions[0][0]
            self._grad_accumulators[p] = acc
            self._hook_handles.append(acc.register_prehook(self._autograd_touched(p)))
        # layers that would couple examples or write private statistics if their mode changed later are
        # pinned (frozen BatchNorm stays in eval) and refused at their forward
        self._forward_guards = install_forward_guards(module)

    # -- attaching -----------------------------------------------------------------------------
    def _patch(self, rec: ModuleRecord) -> None:
        m = rec.module
        self._patched.append((m, m.__dict__.get("forward")))
        m.forward = _PrivateForward(rec, self)

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
        """Restore the model's own forwards and ``zero_grad``, remove all hooks and drop recorded state."""
        for m, previous in self._patched:
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
        if self._patched_zero_grad is not None:
            had, previous = self._patched_zero_grad
            if had:
                self.module.zero_grad = previous
            else:
                self.module.__dict__.pop("zero_grad", None)
            self._patched_zero_grad = None
        for h in self._hook_handles:
            h.remove()
        if self._forward_guards is not None:
            self._forward_guards.remove()
            self._forward_guards = None
        self._patched, self._hook_handles, self._grad_accumulators = [], [], {}
        self.clear()

    # -- DP-SAT: a perturbation applied in the forwards, never to the parameters -------------------
    def set_perturbation(self, perturbation: Optional[Dict[nn.Parameter, Tensor]]) -> None:
        """Make every forward with gradients compute with ``w + ε[w]`` (``None``: with ``w``). The parameters
        are never written: ``state_dict``, evaluation (no_grad forwards) and checkpoints see ``w``; every
        recorded forward, whatever the module's mode or which sub-module is called, sees ``w + ε``, and the
        input gradients are those of ``w + ε``."""
        if perturbation is not None:
            unknown = [p for p in perturbation if p not in self.param_keys]
            if unknown:
                raise ValueError("set_perturbation: the perturbation names parameters the engine does not hook")
        self.perturbation = perturbation
        self._perturbed = {}

    def effective(self, p: Optional[Tensor]) -> Optional[Tensor]:
        """What a hooked module computes with for parameter ``p``: ``p`` itself, or ``p + ε`` (no autograd
        history; cached while ``p`` is unchanged: same version counter, dtype and device)."""
        eps = self.perturbation.get(p) if self.perturbation is not None and p is not None else None
        if eps is None:
            return p
        key = (p._version, p.dtype, p.device, p.data_ptr())
        cached = self._perturbed.get(p)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            w = p.detach() + eps.to(device=p.device, dtype=p.dtype)
        self._perturbed[p] = (key, w)
        return w

    # -- the gate of every recorded use ----------------------------------------------------------
    def _before_forward(self, record: ModuleRecord) -> None:
        """A hooked module's forward with gradients enabled: recover from a dead backward, refuse a changed
        parameter set, count the forward."""
        self._recover_if_stale()
        for p in self._record_params[id(record)]:
            if not p.requires_grad:
                raise PrivacyConfigError(
                    f"a parameter of '{record.name}' ({type(record.module).__name__}) was frozen after the model "
                    f"was made private; the set of trainable parameters is fixed when the engine attaches. Freeze "
                    f"layers before make_private (or detach and attach a new engine and optimizer)")
        for p in self._record_frozen[id(record)]:
            if p.requires_grad:
                raise PrivacyConfigError(
                    f"a parameter of '{record.name}' ({type(record.module).__name__}) was unfrozen after the model "
                    f"was made private; its per-example gradient is not tracked. Unfreeze layers before make_private "
                    f"(or detach and attach a new engine and optimizer)")
        record.forward_calls += 1

    def _writes_param_grads(self, record: ModuleRecord) -> bool:
        """Will the running backward pass accumulate into the parameters of ``record`` (``loss.backward()``)?
        False for ``torch.autograd.grad`` and ``backward(inputs=...)`` not listing them."""
        for p in self._record_params[id(record)]:
            try:
                if torch._C._will_engine_execute_node(self._grad_accumulators[p]):
                    return True
            except RuntimeError:  # torch.autograd.grad: no parameter gradient is written
                return False
        return False

    def _accept(self, record: ModuleRecord, ctx) -> bool:
        self._recover_if_stale()
        if not self._writes_param_grads(record):
            return False
        if ctx is not None:
            if getattr(ctx, "_dpsat_recorded", False):
                raise BackwardTwiceError(
                    f"a second backward pass through the same forward reached '{record.name}' (retain_graph=True): "
                    f"each example must be clipped once per step with the gradient of its whole loss. Sum the "
                    f"losses first and call backward once: (loss_a + loss_b).backward()")
            ctx._dpsat_recorded = True
        return True

    def _recover_if_stale(self) -> None:
        """A backward pass that raised never reached its end callback: drop what it recorded."""
        if self._backward_task is not None and torch._C._current_graph_task_id() != self._backward_task:
            self._drop_backward()

    def _drop_backward(self) -> None:
        for r in self.records:
            r.clear()
            r.forward_calls = 0
        self._backward_task = None
        self._pending, self._pending_noised = {}, {}
        self._eager_sq, self._eager_batch = {}, None

    # -- the end of a backward pass ------------------------------------------------------------
    def _on_record(self, record: ModuleRecord) -> None:
        if self._backward_task is None:  # the first record of a backward pass
            self._backward_task = torch._C._current_graph_task_id()
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
                if self._eager_batch is not None and B != self._eager_batch:
                    raise RuntimeError(f"layers saw different batch sizes ({self._eager_batch} and {B}) in one "
                                       f"backward; the batch must be the first dimension of every layer's input")
            # the backward completed: its sums join the step's
            for p, s in self._pending.items():
                prev = self.summed_grads.get(p)
                self.summed_grads[p] = s if prev is None else prev.add_(s)
            self._noised.update(self._pending_noised)
            self._step_examples += B or 0
        finally:
            self._drop_backward()

    def _batch_size(self, records: List[ModuleRecord]) -> int:
        sizes = {t.shape[0] for r in records for u in r.uses for t in u.values()}
        if len(sizes) != 1:
            names = [r.name for r in records]
            raise RuntimeError(f"modules {names} saw different batch sizes {sorted(sizes)} in one backward; "
                               f"the batch must be the first dimension of every supported layer's input")
        return sizes.pop()

    def _sq_norms(self, records: List[ModuleRecord]) -> Tuple[Dict[str, Tensor], Dict[int, Tensor]]:
        """Per-parameter per-example squared norms (raw: before the loss-reduction factor). Each is an upper
        bound of the squared norm of what the clipped sum adds for the example (the rules' contract)."""
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
                sq[self.param_keys[getattr(owners[0][0].module, owners[0][1])]] = materialized_sq_norms(pe)
        return sq, shared_grads

    def _clip_and_accumulate(self, records: List[ModuleRecord]):
        """Norms, clip factors and clipped sums of ``records`` into the pending sums of this backward."""
        sensitivity = self.clipping.sensitivity
        if self._step_sensitivity is not None and sensitivity != self._step_sensitivity:
            raise PrivacyConfigError(
                f"the clipping norm changed within a step (sensitivity {self._step_sensitivity:g} -> "
                f"{sensitivity:g}); change max_grad_norm only between steps")
        B = self._batch_size(records)
        factor = float(B) if self.loss_reduction == "mean" else 1.0
        sq, shared_grads = self._sq_norms(records)
        total = torch.stack(list(sq.values())).sum(0)
        finite = torch.isfinite(total)
        if not bool(finite.all()):
            self._drop_examples(records, ~finite)
            sq, shared_grads = self._sq_norms(records)
        # clip factors are formed in float64 from the certified norms (their own rounding then stays ~1e-16)
        sq = {k: v.to(torch.float64) * factor ** 2 for k, v in sq.items()}
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
        self._step_sensitivity = sensitivity
        return sq, B

    def _noise_request(self, plan: Optional[NoisePlan], params: Dict[str, nn.Parameter]) -> Optional[NoiseRequest]:
        """Noise for the parameters whose first clipped sum of the step this is."""
        if plan is None:
            return None
        offsets = {pn: plan.offsets[p] for pn, p in params.items()
                   if p in plan.offsets and p not in self.summed_grads and p not in self._pending}
        return NoiseRequest(plan.seed, plan.std, offsets) if offsets else None

    def _drop_examples(self, records: List[ModuleRecord], bad: Tensor) -> None:
        """Non-finite examples contribute zero: zero their rows in every recorded tensor."""
        for r in records:
            r.cache = {}
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
            self._pending_noised[p] = (request.seed, request.offsets[name], request.std)
        prev = self._pending.get(p)
        self._pending[p] = s if prev is None else prev.add_(s)

    # -- for the optimizer -----------------------------------------------------------------------
    @property
    def step_sensitivity(self) -> Optional[float]:
        """The sensitivity the clipping of this step's backward passes used (None before the first)."""
        return self._step_sensitivity

    @property
    def step_examples(self) -> int:
        """Examples (leading dimension of the hooked layers' inputs) in this step's backward passes."""
        return self._step_examples

    def release(self, params) -> Dict[nn.Parameter, Tuple[Tensor, Optional[Tuple[int, int, float]]]]:
        """The step's clipped sum of each of ``params`` (zeros where none), in fp32/fp64, with the (seed,
        offset, std) of the noise already in it (None if none is); then everything recorded is discarded, for
        these and all other parameters: nothing outlives its step."""
        self._recover_if_stale()
        if self._backward_task is not None:
            raise RuntimeError("a release (optimizer.step()) during a backward pass")
        out = {}
        for p in params:
            s = self.summed_grads.pop(p, None)
            if s is None:
                s = torch.zeros(p.shape, dtype=accum_dtype(p), device=p.device)
            out[p] = (s, self._noised.pop(p, None))
        self.clear()
        self._perturbed = {}  # the weights are about to change
        return out

    def take_summed_grad(self, p: nn.Parameter) -> Tuple[Tensor, Optional[Tuple[int, int, float]]]:
        """The clipped sum accumulated for ``p`` since the last release (zeros if it got none), in fp32/fp64, and
        the (seed, offset, std) of the noise already in it (None if none is). Consumes only ``p``'s sum."""
        s = self.summed_grads.pop(p, None)
        if s is None:
            s = torch.zeros(p.shape, dtype=accum_dtype(p), device=p.device)
        return s, self._noised.pop(p, None)

    def pop_summed_grad(self, p: nn.Parameter) -> Tensor:
        """:meth:`take_summed_grad` without the noise record."""
        return self.take_summed_grad(p)[0]

    def clear(self) -> None:
        """Drop everything recorded since the last release: clipped sums (with any noise already in them),
        unconsumed records, a dead backward's partial state, and the step's sensitivity and example count."""
        self.summed_grads.clear()
        self._noised.clear()
        if self._backward_task is None or torch._C._current_graph_task_id() != self._backward_task:
            self._drop_backward()
        self._step_sensitivity = None
        self._step_examples = 0
