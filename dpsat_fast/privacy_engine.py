"""One call that makes a training script private, in the style Opacus users know.

    privacy_engine = PrivacyEngine()
    model, optimizer, loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    ...
    privacy_engine.get_epsilon(delta=1e-5)

Everything is validated before any data is touched. The returned loader samples with Poisson sampling at
rate q = batch_size / N (the privacy analysis assumes it); an ordinary loader is converted.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from .accounting import PrivacyAccountant, calibrate_noise_multiplier
from .clipping import ClippingStyle
from .data import PoissonDataLoader
from .engine import BookKeepingEngine
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import DPSAM, DPSAT, DPOptimizer
from .optim.dpsat import DIRECTIONS, check_rho
from .validation import PrivacyConfigError, check_delta


class PrivacyEngine:
    """Holds the accountant of one private training run."""

    def __init__(self, accountant: str = "pld", secure_mode: bool = True):
        # Opacus' secure_mode=True (CSPRNG sampling, secret noise) is how this library always works;
        # secure_mode=False does not weaken it (reproducible runs: make_private(seed=...), insecure)
        if not isinstance(secure_mode, bool):
            raise PrivacyConfigError(f"secure_mode must be a bool, got {secure_mode!r}")
        self.secure_mode = True
        self.accountant = PrivacyAccountant(accountant)
        self.engine: Optional[BookKeepingEngine] = None
        self.optimizer: Optional[DPOptimizer] = None
        self.data_loader: Optional[PoissonDataLoader] = None

    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                     max_grad_norm: float, noise_multiplier: Optional[float] = None,
                     target_epsilon: Optional[float] = None, target_delta: Optional[float] = None,
                     epochs: Optional[int] = None, poisson_sampling: bool = True, loss_reduction: str = "mean",
                     clipping: str | ClippingStyle = "flat", seed: Optional[int] = None,
                     sam_rho: float = 0.0, sam_method: str = "dpsat", sam_direction: str = "noisy_gradient",
                     allow_non_private: bool = False, sparsity=None) -> Tuple[nn.Module, DPOptimizer, DataLoader]:
        """Attach the engine to ``module``, wrap ``optimizer``, and return a Poisson version of ``data_loader``.

        Give either ``noise_multiplier`` or ``target_epsilon`` with ``target_delta`` and ``epochs`` (σ is then
        calibrated so that ε ≤ target after ``epochs · len(loader)`` steps).

        ``sam_rho > 0`` makes the optimizer DP-SAT (``sam_method="dpsat"``, same privacy cost as DP-SGD;
        ``sam_direction`` "noisy_gradient" or "last_update"), or the two-query DP-SAM baseline
        (``sam_method="dpsam"``, accounted as two compositions per step, needs ``step(closure)``).
        ``sparsity``: a :mod:`dpsat_fast.pruning` method (pre-pruning, gradient dropping) for the optimizer.
        """
        if sam_method not in ("dpsat", "dpsam"):
            raise PrivacyConfigError(f"sam_method must be 'dpsat' or 'dpsam', got {sam_method!r}")
        if sam_direction not in DIRECTIONS:
            raise PrivacyConfigError(f"sam_direction must be one of {DIRECTIONS}, got {sam_direction!r}")
        sam_rho = check_rho(sam_rho)
        compositions = 2 if sam_method == "dpsam" else 1
        if not poisson_sampling:
            raise PrivacyConfigError(
                "poisson_sampling=False: the privacy guarantee and the accountant assume Poisson sampling; a "
                "shuffled fixed-size loader is not covered. Leave poisson_sampling=True (the loader is converted)")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise PrivacyConfigError("give exactly one of noise_multiplier or target_epsilon (with target_delta "
                                     "and epochs)")
        loader = (data_loader if isinstance(data_loader, PoissonDataLoader)
                  else PoissonDataLoader.from_data_loader(data_loader))
        if target_epsilon is not None:
            if target_delta is None or epochs is None:
                raise PrivacyConfigError("target_epsilon needs target_delta and epochs to calibrate σ")
            check_delta(target_delta, loader.num_samples)
            noise_multiplier = calibrate_noise_multiplier(target_epsilon, target_delta, loader.sample_rate,
                                                          epochs * len(loader), accountant=self.accountant.mechanism,
                                                          compositions_per_step=compositions)
        self.engine = BookKeepingEngine(module, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                                        clipping=clipping)
        common = dict(engine=self.engine, noise_multiplier=noise_multiplier,
                      expected_batch_size=loader.expected_batch_size, seed=seed, accountant=self.accountant,
                      sample_rate=loader.sample_rate, allow_non_private=allow_non_private, sparsity=sparsity)
        if sam_method == "dpsam":
            self.optimizer = DPSAM(optimizer, rho=sam_rho, **common)
        elif sam_rho > 0:
            self.optimizer = DPSAT(optimizer, rho=sam_rho, direction=sam_direction, **common)
        else:
            self.optimizer = DPOptimizer(optimizer, **common)
        if hasattr(loader, "examples_yielded"):
            self.optimizer.watch_batches(loader)
        self.data_loader = loader
        return module, self.optimizer, loader

    def save_checkpoint(self, path=None, *, module: Optional[nn.Module] = None, optimizer=None,
                        checkpoint_dict: Optional[dict] = None, **extra) -> None:
        """Save everything the run needs to resume, atomically, and nothing secret (see
        :func:`dpsat_fast.checkpoint.save_checkpoint`). Opacus' keywords work: ``save_checkpoint(path=...,
        module=model, optimizer=optimizer, checkpoint_dict={...})``; ``module``/``optimizer`` must be the ones
        :meth:`make_private` returned (default: those)."""
        module, optimizer = self._own(module, optimizer)
        save_checkpoint(_path(path, extra), model=module, optimizer=optimizer, accountant=self.accountant,
                        checkpoint_dict=checkpoint_dict, **extra)

    def load_checkpoint(self, path=None, *, module: Optional[nn.Module] = None, optimizer=None, **kwargs) -> dict:
        """Restore a run saved by :meth:`save_checkpoint` into this run's model, optimizer and ledger (validated
        first: a refused checkpoint changes nothing); returns the extra entries."""
        module, optimizer = self._own(module, optimizer)
        return load_checkpoint(_path(path, kwargs), model=module, optimizer=optimizer, accountant=self.accountant)

    def _own(self, module, optimizer):
        if self.engine is None:
            raise PrivacyConfigError("make_private first: the checkpoint belongs to a private run")
        if module is not None and module is not self.engine.module:
            raise PrivacyConfigError("save/load_checkpoint: module is not the model this PrivacyEngine made private")
        if optimizer is not None and optimizer is not self.optimizer:
            raise PrivacyConfigError("save/load_checkpoint: optimizer is not the one make_private returned")
        return self.engine.module, self.optimizer

    def detach(self) -> None:
        """Undo make_private on the model (its own forwards back, no hooks); the optimizer and loader of this
        engine must not be used afterwards."""
        if self.engine is not None:
            if hasattr(self.optimizer, "detach"):
                self.optimizer.detach()
            self.engine.detach()

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at δ."""
        return self.accountant.get_epsilon(delta)


def _path(path, kwargs: dict):
    """``path`` positionally or as ``path=`` (Opacus), never both; Opacus' torch (load/save) kwargs dropped."""
    for key in ("torch_save_kwargs", "torch_load_kwargs", "module_state_dict_kwargs", "module_load_dict_kwargs"):
        kwargs.pop(key, None)
    if path is None:
        raise PrivacyConfigError("save/load_checkpoint needs a path")
    return path
