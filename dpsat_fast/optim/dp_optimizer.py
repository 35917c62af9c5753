"""DP-SGD as a wrapper around any torch.optim optimizer (DESIGN.md §2.1).

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
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops
from ..engine import BookKeepingEngine, NoisePlan
from ..validation import PrivacyConfigError, check_noise_multiplier, check_sample_rate


class DPOptimizer(Optimizer):
    """Differentially private wrapper of ``optimizer``; a real :class:`torch.optim.Optimizer` sharing the
    wrapped optimizer's ``param_groups`` and ``state`` (LR schedulers and state_dict work as usual).

    Args:
        optimizer: any torch.optim optimizer over (a subset of) the engine's trainable parameters.
        engine: the :class:`~dpsat_fast.engine.BookKeepingEngine` attached to the model.
        noise_multiplier: σ; the noise std per coordinate is σ · C.
        expected_batch_size: B̄ = q·N, public; the noisy sum is divided by it, never by the realized size.
        seed: key of the noise generator. ``None`` draws a fresh 63-bit seed from the OS (``secrets``);
            pass an int only for reproducible experiments.
        accountant: optional :class:`~dpsat_fast.accounting.PrivacyAccountant` advanced once per step.
        sample_rate: q, needed with an accountant.
        allow_non_private: permit σ = 0 (no privacy; for debugging and baselines only).
        sparsity: optional :class:`~dpsat_fast.pruning.Sparsity` (pre-pruning, gradient dropping): each step
            releases only its kept coordinates (the noise of the others is dropped with them). Its masks are
            chosen at the start of the step, from the weights and earlier noisy gradients only.
    """

    def __init__(self, optimizer: Optimizer, *, engine: BookKeepingEngine, noise_multiplier: float,
                 expected_batch_size: float, seed: Optional[int] = None, accountant=None,
                 sample_rate: Optional[float] = None, allow_non_private: bool = False, sparsity=None):
        check_noise_multiplier(noise_multiplier, allow_zero=allow_non_private)
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
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.requires_grad and id(p) not in known:
                    raise PrivacyConfigError(
                        f"optimizer param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) is not a trainable "
                        f"parameter of the model the engine was attached to; build the optimizer from "
                        f"model.parameters() of that model")
        self.original_optimizer = optimizer
        self.engine = engine
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.noise_seed = int(seed) if seed is not None else secrets.randbits(63)
        self.noise_offset = 0
        self.steps = 0
        self.sparsity = sparsity
        engine.noise_planner = self.noise_plan

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
        known = set(map(id, self.engine.params))
        if any(p.requires_grad and id(p) not in known for p in param_group["params"]):
            raise PrivacyConfigError("add_param_group: parameters must be trainable parameters of the engine's model")
        self.original_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

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

    def privatize_gradients(self, masks: Optional[Dict[torch.Tensor, Tensor]] = None) -> None:
        """Turn the engine's accumulated clipped sums into ``p.grad = (sum + σC·ξ) / B̄`` for every trainable
        parameter, consuming the sums, then keep only the coordinates of ``masks[p]`` where given. Called once
        per logical step by :meth:`step`."""
        plan, inv_batch = self.noise_plan(), 1.0 / self.expected_batch_size
        for p, offset in plan.offsets.items():
            g, noise_in_sum = self.engine.take_summed_grad(p)
            if noise_in_sum is None:
                ops.add_noise_and_scale_(g, plan.seed, offset, plan.std, inv_batch)
            elif noise_in_sum == (plan.seed, offset, plan.std):
                g.mul_(inv_batch)
            else:
                raise RuntimeError(f"the noise added during the backward {noise_in_sum} is not the noise of this "
                                   f"release {(plan.seed, offset, plan.std)}: noise_multiplier, the seed or the "
                                   f"parameters changed between backward and step()")
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
            if self.sparsity is not None:
                self.sparsity.observe(p, p.grad)
            if masks is not None and p in masks:
                p.grad.mul_(masks[p].to(p.grad.dtype))
        self.noise_offset += sum(p.numel() for p in plan.offsets)

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One logical step: run ``closure`` (forward + backward of all micro-batches) if given, add noise once,
        update, advance the accountant."""
        masks = self.select_masks()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.privatize_gradients(masks)
        self.original_optimizer.step()
        self._after_update()
        if self.accountant is not None:
            self.accountant.step(self.noise_multiplier, self.sample_rate)
        self.steps += 1
        return loss

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        sd = self.original_optimizer.state_dict()
        sd["dp"] = {"noise_seed": self.noise_seed, "noise_offset": self.noise_offset, "steps": self.steps,
                    "noise_multiplier": self.noise_multiplier, "expected_batch_size": self.expected_batch_size}
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        dp = state_dict.pop("dp", None)
        self.original_optimizer.load_state_dict(state_dict)
        if dp is not None:
            self.noise_seed, self.noise_offset, self.steps = dp["noise_seed"], dp["noise_offset"], dp["steps"]
