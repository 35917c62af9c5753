"""DP-SGD as a wrapper around any torch.optim optimizer (docs/algorithms.md §1).

One logical step: the engine has accumulated ``Σ_i c_i g_i`` over the step's backward passes
(micro-batches); the optimizer releases ``g̃ = (Σ_i c_i g_i + N(0, σ²C²I)) / B̄`` for every trainable
parameter it holds (pure noise for a parameter that got no gradient, e.g. in an empty batch), with B̄ the
PUBLIC expected batch size, and lets the wrapped optimizer update with ``g̃``. The noise is counter-based
(Philox keyed by ``noise_seed``, counter = running offset), so a seed reproduces it on every backend and
no two tensors or steps share noise.
"""

from __future__ import annotations

import math
import secrets
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import distributed as distributed_mod
from .. import ops
from ..engine import BookKeepingEngine, NoisePlan
from ..validation import PrivacyConfigError, check_noise_multiplier, check_sample_rate


class InsecureNoiseWarning(UserWarning):
    """A fixed noise key was given: the run is reproducible and not private."""


class DPOptimizer(Optimizer):
    """Differentially private wrapper of ``optimizer``; a real :class:`torch.optim.Optimizer` sharing the
    wrapped optimizer's ``param_groups`` and ``state`` (LR schedulers and state_dict work as usual).

    Args:
        optimizer: any torch.optim optimizer over exactly the engine's trainable parameters.
        engine: the :class:`~dpsat_fast.engine.BookKeepingEngine` attached to the model.
        noise_multiplier: σ; the noise std per coordinate is σ · C.
        expected_batch_size: B̄ = q·N, public; the noisy sum is divided by it, never by the realized size.
        seed: **insecure, not private** — a fixed key for the noise generator, for reproducible experiments
            only (whoever knows it can subtract the noise from every release). ``None`` (the default) draws a
            secret 63-bit key from the OS (``secrets``); it is never saved, and a resumed run draws a new one.
        accountant: optional :class:`~dpsat_fast.accounting.PrivacyAccountant` advanced once per step.
        sample_rate: q, needed with an accountant.
        allow_non_private: permit σ = 0 (no privacy; for debugging and baselines only; ε is then infinite).
        sparsity: optional :class:`~dpsat_fast.pruning.Sparsity` (pre-pruning, gradient dropping): each step
            releases only its kept coordinates (the noise of the others is dropped with them). Its masks are
            chosen at the start of the step, from the weights and earlier noisy gradients only.
        loss_reduction: ``"mean"`` (default): the noisy sum is divided by B̄; ``"sum"``: it is released as is
            (Opacus' meaning of the two).

    Opacus' protocol works too: ``pre_step()`` releases the gradient into ``p.grad`` and accounts it (returns
    False for a step skipped with ``signal_skip_step``), ``original_optimizer.step()`` then updates;
    ``step_hook(optimizer)`` is called after every release.

    Every check of a step (σ, C, the parameter set, the accountant's inputs) runs before any gradient is
    released or any weight changes; ``noise_multiplier`` and ``max_grad_norm`` are also checked when set.
    The parameter set is fixed: the optimizer must hold exactly the engine's trainable parameters, and
    ``add_param_group`` or flipping ``requires_grad`` later is refused.
    """

    def __init__(self, optimizer: Optimizer, *, engine: BookKeepingEngine, noise_multiplier: float,
                 expected_batch_size: float, seed: Optional[int] = None, accountant=None,
                 sample_rate: Optional[float] = None, allow_non_private: bool = False, sparsity=None,
                 loss_reduction: str = "mean", distributed: Optional[bool] = None):
        if loss_reduction not in ("mean", "sum"):
            raise PrivacyConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.allow_non_private = bool(allow_non_private)
        check_noise_multiplier(noise_multiplier, allow_zero=self.allow_non_private)
        if not (isinstance(expected_batch_size, (int, float)) and math.isfinite(expected_batch_size)
                and expected_batch_size > 0):
            raise PrivacyConfigError(f"expected_batch_size must be a finite number > 0 (the public q·N), "
                                     f"got {expected_batch_size!r}")
        if accountant is not None:
            if sample_rate is None:
                raise PrivacyConfigError("an accountant needs the sample_rate q of the Poisson sampler")
            check_sample_rate(sample_rate)
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2 ** 63):
            raise PrivacyConfigError(f"seed must be an int in [0, 2**63), got {seed!r}")
        known = set(map(id, engine.params))
        held = set()
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.requires_grad and id(p) not in known:
                    raise PrivacyConfigError(
                        f"optimizer param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) is not a trainable "
                        f"parameter of the model the engine was attached to; build the optimizer from "
                        f"model.parameters() of that model")
                held.add(id(p))
        missing = [engine.param_keys[p] for p in engine.params if id(p) not in held]
        if missing:
            raise PrivacyConfigError(
                f"the model has trainable parameters that the optimizer does not update: {missing}; their clipped "
                f"sums would never be released. Freeze them before making the model private "
                f"(requires_grad_(False)) or give them to the optimizer")
        self.original_optimizer = optimizer
        self.engine = engine
        self._noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.distributed = distributed_mod.is_distributed() if distributed is None else bool(distributed)
        self.insecure_seed = seed is not None
        if self.insecure_seed:
            warnings.warn(f"{type(self).__name__}(seed={seed}): the noise key is fixed, so the noise can be "
                          f"reproduced and removed from every release: this run is NOT private (experiments only; "
                          f"omit seed for a secret key)", InsecureNoiseWarning, stacklevel=2)
        if self.distributed:  # one key for all ranks, drawn by rank 0 and broadcast
            self.noise_seed = distributed_mod.agree_on_key(seed)
        else:
            self.noise_seed = int(seed) if seed is not None else secrets.randbits(63)
        self.noise_offset = 0
        self.steps = 0
        self.sparsity = sparsity
        self.batch_source = None
        self._yielded_at_last_step = 0
        #: called with the optimizer after every release (Opacus' hook; e.g. a scheduler or a logger)
        self.step_hook: Optional[Callable[["DPOptimizer"], None]] = None
        self._skip_next_step = False
        self._is_last_step_skipped = False
        #: seconds the last release spent in the all-reduce of the clipped sums (distributed runs)
        self.last_communication_seconds = 0.0
        # across ranks the noise goes in once, after the all-reduce: never fused into a rank's own sums
        engine.noise_planner = None if self.distributed else self.noise_plan

    def watch_batches(self, loader) -> None:
        """Check every release against the logical batches ``loader`` (a
        :class:`~dpsat_fast.data.PoissonDataLoader`) hands out: the hooked layers must see exactly as many
        examples (leading dimension) as the last batch had. Catches sequence-first tensors (``[T, B, D]``:
        Poisson batch sizes vary, a fixed T does not) and augmentation copies of one example clipped
        separately. ``make_private`` calls it with the loader it returns."""
        self.batch_source = loader
        self._yielded_at_last_step = int(getattr(loader, "examples_yielded", 0))

    # -- torch.optim.Optimizer surface, shared with the wrapped optimizer -------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def __getattr__(self, name):  # hooks and anything else torch.optim keeps on the instance
        if name == "original_optimizer" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.original_optimizer, name)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(σ={self.noise_multiplier}, C={self.engine.clipping.max_grad_norm}, "
                f"B̄={self.expected_batch_size}, {self.original_optimizer!r})")

    def add_param_group(self, param_group: Dict) -> None:
        raise PrivacyConfigError(
            "add_param_group on a private optimizer: the parameter set is fixed when the model is made private "
            "(a parameter added later would release gradients the clipping never bounded). Build the optimizer "
            "with all its parameter groups before make_private")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients and discard everything the engine recorded since the last step
        (after a step skipped with :meth:`signal_skip_step` the clipped sums are kept: they belong to the
        logical batch in progress)."""
        if not self._is_last_step_skipped:
            self.engine.clear()
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> None:
        """Opacus' name for setting :attr:`step_hook`."""
        self.step_hook = fn

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Make the next :meth:`step` / :meth:`pre_step` a no-op that keeps the clipped sums (a physical batch
        that is not the last of its logical batch: :class:`~dpsat_fast.utils.BatchMemoryManager` calls it)."""
        self._skip_next_step = bool(do_skip)

    def _skipping(self) -> bool:
        """Consume a pending skip signal: True if this step is skipped."""
        if self._skip_next_step:
            self._skip_next_step = False
            self._is_last_step_skipped = True
            return True
        self._is_last_step_skipped = False
        return False

    @property
    def accumulated_iterations(self) -> int:
        """Opacus' count of backward passes per release without virtual steps: always 1 here (micro-batches
        of a logical batch are summed by the engine and released once)."""
        return 1

    # -- privacy parameters, checked when set ------------------------------------------------------
    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        self._noise_multiplier = check_noise_multiplier(value, allow_zero=self.allow_non_private)

    @property
    def max_grad_norm(self) -> float:
        """The clipping norm C (of the engine's clipping style); settable between steps."""
        return self.engine.clipping.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        self.engine.clipping.max_grad_norm = value

    # -- the private step ----------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise added to the clipped sum: σ · sensitivity."""
        return self.noise_multiplier * self.engine.clipping.sensitivity

    def noise_plan(self) -> NoisePlan:
        """The noise of the next release: parameter p (in param_groups order) gets the Philox counters
        ``[offset_p, offset_p + p.numel())`` after those of all earlier releases. The engine adds it in its
        first backward of the step when it can fuse it; :meth:`privatize_gradients` adds the rest."""
        offsets, offset = {}, self.noise_offset
        for p in self._trainable():
            offsets[p] = offset
            offset += p.numel()
        return NoisePlan(self.noise_seed, self.noise_std, offsets)

    def _trainable(self) -> List[Tensor]:
        """The parameters this optimizer releases, in param_groups order."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def select_masks(self) -> Optional[Dict[torch.Tensor, Tensor]]:
        """The sparsity method's keep-masks for this step (None without one). Called at the start of a step,
        before any clipped sum of the step is read: the masks depend on public state only."""
        return self.sparsity.select(self._trainable()) if self.sparsity is not None else None

    def _after_update(self) -> None:
        if self.sparsity is not None:
            self.sparsity.after_step(self._trainable())

    def check_release(self) -> None:
        """Everything that could make this step's release non-private or unaccountable, checked before any
        gradient is written: σ (and the accountant's inputs), the clipping norm the backward passes used,
        and the parameter set. Raises :class:`PrivacyConfigError` (and discards the step's sums)."""
        error = None
        try:
            check_noise_multiplier(self._noise_multiplier, allow_zero=self.allow_non_private)
            if self.accountant is not None:
                check_sample_rate(self.sample_rate)
            used = self.engine.step_sensitivity
            if used is not None and used != self.engine.clipping.sensitivity:
                raise PrivacyConfigError(
                    f"the clipping norm changed between backward and step() (clipped with sensitivity {used:g}, the "
                    f"noise would be for {self.engine.clipping.sensitivity:g}); change max_grad_norm between steps")
            self._check_parameter_set()
            self._check_batch_size()
        except PrivacyConfigError as exc:
            error = exc
        # every rank releases, or none does (nobody is left waiting in the all-reduce); and all of them with
        # the same privacy settings: the noise is added once, by every rank alike, so a rank with a smaller σ
        # (or a larger C, another q) would release weights less private than the accountant says
        if self.distributed:
            agreed, same_settings = distributed_mod.all_ranks_agree(error is None, self._privacy_fingerprint())
            if agreed and not same_settings:
                error = PrivacyConfigError(
                    f"the ranks disagree on the privacy settings (this rank: {self._privacy_settings()}); every "
                    f"rank must make the model private with the same noise_multiplier, max_grad_norm, clipping, "
                    f"sample rate and expected batch size; nothing was released")
                agreed = False
        else:
            agreed = error is None
        if not agreed:
            self.engine.clear()
            raise error if error is not None else PrivacyConfigError(
                "another rank refused this release (see its error); nothing was released")

    def _privacy_settings(self) -> dict:
        clipping = self.engine.clipping
        return {"noise_multiplier": self._noise_multiplier, "sensitivity": clipping.sensitivity,
                "clipping": type(clipping).__name__, "sample_rate": self.sample_rate,
                "expected_batch_size": self.expected_batch_size,
                "accountant": type(self.accountant).__name__ if self.accountant is not None else None}

    def _privacy_fingerprint(self) -> int:
        return distributed_mod.config_fingerprint(*sorted(self._privacy_settings().items()))

    def _check_parameter_set(self) -> None:
        engine = self.engine
        trainable = self._trainable()
        keys = engine.param_keys
        frozen = [keys[p] for p in engine.params if not p.requires_grad]
        if frozen:
            raise PrivacyConfigError(
                f"parameters {frozen} were frozen after the model was made private; the parameter set is fixed "
                f"at make_private (freeze layers before, or detach and make the model private again)")
        unfrozen = [n for n, p in engine.module.named_parameters() if p.requires_grad and p not in keys]
        if unfrozen:
            raise PrivacyConfigError(
                f"parameters {unfrozen} were unfrozen after the model was made private; their gradients are not "
                f"clipped. Unfreeze layers before make_private (or detach and make the model private again)")
        if set(map(id, trainable)) != engine._param_ids:
            raise PrivacyConfigError(
                "the optimizer's parameters changed after the model was made private (param_groups edited); the "
                "optimizer must hold exactly the engine's trainable parameters")

    def _check_batch_size(self) -> None:
        source = self.batch_source
        if source is None or int(source.examples_yielded) == self._yielded_at_last_step:
            return  # no loader watched, or no new batch since the last step
        expected, seen = int(source.last_batch_size), self.engine.step_examples
        if seen != expected:
            raise PrivacyConfigError(
                f"the layers of the model saw {seen} examples in this step but the data loader's batch has "
                f"{expected}: per-example clipping needs the batch as the FIRST dimension of every layer's input "
                f"(sequence-first tensors [T, B, ...] are clipped per position: use batch_first=True, or "
                f"dpsat_fast.fix_model for nn.Transformer* layers), each example exactly once per step (several "
                f"augmented copies of an example are clipped separately), and every example of the batch "
                f"through the backward; nothing was released")

    def privatize_gradients(self, masks: Optional[Dict[torch.Tensor, Tensor]] = None) -> None:
        """Turn the engine's clipped sums of this step into ``p.grad = (sum + σC·ξ) / B̄`` for every trainable
        parameter (the engine's other records are discarded), then keep only the coordinates of ``masks[p]``
        where given. Called once per logical step by :meth:`step`; everything is checked first, and no
        ``p.grad`` is written unless all of them can be."""
        self.check_release()
        plan = self.noise_plan()
        inv_batch = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        released = self.engine.release(list(plan.offsets))
        if self.distributed:  # Σ over ranks of their clipped sums, before the (single) noise
            self.last_communication_seconds = distributed_mod.all_reduce_sums([g for g, _ in released.values()])
        grads = {}
        for p, offset in plan.offsets.items():
            g, noise_in_sum = released[p]
            if noise_in_sum is None:
                ops.add_noise_and_scale_(g, plan.seed, offset, plan.std, inv_batch)
            elif noise_in_sum == (plan.seed, offset, plan.std):
                g.mul_(inv_batch)
            else:
                raise PrivacyConfigError(
                    f"the noise added during the backward {noise_in_sum[1:]} is not the noise of this release "
                    f"{(offset, plan.std)}: noise_multiplier, the clipping norm or the parameters changed between "
                    f"backward and step(); nothing was released")
            grads[p] = g
        for p, g in grads.items():
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
            if self.sparsity is not None:
                self.sparsity.observe(p, p.grad)
            if masks is not None and p in masks:
                p.grad.mul_(masks[p].to(p.grad.dtype))
        self.noise_offset += sum(p.numel() for p in plan.offsets)

    def _account(self, compositions: int = 1) -> None:
        """One logical step of ``compositions`` queries for the accountant (checked in :meth:`check_release`)."""
        if self.accountant is not None:
            if self._noise_multiplier == 0:
                self.accountant.record_non_private_step()
            else:
                self.accountant.step(self._noise_multiplier, self.sample_rate, num_compositions=compositions)
        self.steps += 1
        if self.batch_source is not None:
            self._yielded_at_last_step = int(self.batch_source.examples_yielded)

    def _run_closure(self, closure: Callable[[], Tensor]):
        """Forward and backward passes of the logical batch; if they raise, the partial sums are discarded."""
        try:
            with torch.enable_grad():
                return closure()
        except BaseException:
            self.engine.clear()
            raise

    def pre_step(self, masks: Optional[Dict[torch.Tensor, Tensor]] = None) -> bool:
        """Release this step's gradient into ``p.grad`` (checked, noised once, divided by B̄) and account it,
        without updating the weights; False (nothing released) for a step skipped by
        :meth:`signal_skip_step`. Opacus' protocol: ``if optimizer.pre_step(): original_optimizer.step()``."""
        if self._skipping():
            return False
        self.privatize_gradients(self.select_masks() if masks is None else masks)
        self._account()
        self._after_release()
        return True

    def _after_release(self) -> None:
        if self.step_hook is not None:
            self.step_hook(self)

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One logical step: run ``closure`` (forward + backward of all micro-batches) if given, add noise once,
        update, advance the accountant. A step skipped by :meth:`signal_skip_step` only runs the closure."""
        masks = self.select_masks() if not self._skip_next_step else None
        loss = self._run_closure(closure) if closure is not None else None
        if not self.pre_step(masks):
            return loss
        self.original_optimizer.step()
        self._after_update()
        return loss

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        """The wrapped optimizer's state plus the step count and the public privacy parameters. No secret:
        the noise key is not in it (a resumed run draws a new one), so it is as shareable as the model."""
        sd = self.original_optimizer.state_dict()
        sd["dp"] = {"noise_offset": self.noise_offset, "steps": self.steps,
                    "noise_multiplier": self.noise_multiplier, "expected_batch_size": self.expected_batch_size}
        return sd

    @staticmethod
    def check_state_dict(state_dict) -> None:
        """Raise ``ValueError`` unless ``state_dict`` is a state of a DP optimizer (validated before loading)."""
        dp = state_dict.get("dp") if isinstance(state_dict, dict) else None
        if not isinstance(dp, dict) or not {"steps", "noise_offset"} <= set(dp):
            raise ValueError("not the state of a dpsat_fast DP optimizer (no 'dp' entry with steps and noise_offset)")
        for key in ("steps", "noise_offset"):
            if not isinstance(dp[key], int) or dp[key] < 0:
                raise ValueError(f"optimizer state: dp[{key!r}] must be a non-negative int, got {dp[key]!r}")

    def load_state_dict(self, state_dict) -> None:
        """Restore a state of :meth:`state_dict`. The noise continues under a NEW secret key (an insecure fixed
        ``seed`` given at construction is kept, with the saved counter, for reproducible experiments)."""
        self.check_state_dict(state_dict)
        state_dict = dict(state_dict)
        dp = state_dict.pop("dp")
        self.original_optimizer.load_state_dict(state_dict)
        self.steps, self.noise_offset = dp["steps"], dp["noise_offset"]
        if not self.insecure_seed:  # a new secret key (the same on every rank of a distributed run)
            self.noise_seed = distributed_mod.agree_on_key() if self.distributed else secrets.randbits(63)
