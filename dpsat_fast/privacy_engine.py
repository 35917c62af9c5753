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

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from .accounting import PrivacyAccountant, calibrate_noise_multiplier
from .clipping import ClippingStyle, GroupWiseClipping
from . import distributed
from .data import PoissonDataLoader
from .engine import BookKeepingEngine
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import DPSAM, DPSAT, DPOptimizer
from .optim.dpsat import DIRECTIONS, check_rho
from .validation import PrivacyConfigError, check_delta, check_max_grad_norm


GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew", "expanded_weights")


class PrivacyHooks:
    """What ``make_private(wrap_model=False)`` returns in place of the model (Opacus' hooks object): the model
    you passed stays the one to train; :meth:`cleanup` undoes ``make_private`` on it."""

    def __init__(self, privacy_engine: "PrivacyEngine"):
        self._privacy_engine = privacy_engine

    def cleanup(self) -> None:
        self._privacy_engine.detach()


class PrivacyEngine:
    """Holds the accountant of one private training run.

    Args:
        accountant: ``"pld"`` (default), ``"rdp"``, or Opacus' names (see :class:`~dpsat_fast.accounting.PrivacyAccountant`).
        secure_mode: Opacus' flag. Secret noise and CSPRNG sampling are always on here; ``secure_mode=False``
            only permits ``noise_generator=`` (a reproducible, NOT private noise) as in Opacus.
    """

    def __init__(self, accountant: str = "pld", secure_mode: bool = True):
        if not isinstance(secure_mode, bool):
            raise PrivacyConfigError(f"secure_mode must be a bool, got {secure_mode!r}")
        self.secure_mode = secure_mode
        self.accountant = PrivacyAccountant(accountant)
        self.engine: Optional[BookKeepingEngine] = None
        self.optimizer: Optional[DPOptimizer] = None
        self.data_loader: Optional[PoissonDataLoader] = None

    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                     max_grad_norm: Union[float, Sequence[float]], noise_multiplier: Optional[float] = None,
                     target_epsilon: Optional[float] = None, target_delta: Optional[float] = None,
                     epochs: Optional[int] = None, criterion=None, batch_first: bool = True,
                     loss_reduction: str = "mean", poisson_sampling: bool = True,
                     clipping: Union[str, ClippingStyle] = "flat", noise_generator=None,
                     grad_sample_mode: str = "hooks", wrap_model: bool = True, rand_on_empty: bool = False,
                     seed: Optional[int] = None, sam_rho: float = 0.0, sam_method: str = "dpsat",
                     sam_direction: str = "noisy_gradient", allow_non_private: bool = False, sparsity=None):
        """Attach the engine to ``module``, wrap ``optimizer``, and return a Poisson version of ``data_loader``:
        ``(module, optimizer, data_loader)``, or ``(module, optimizer, criterion, data_loader)`` with
        ``grad_sample_mode="ghost"`` (as Opacus).

        Give either ``noise_multiplier`` or ``target_epsilon`` with ``target_delta`` and ``epochs`` (σ is then
        calibrated so that ε ≤ target after ``epochs · len(loader)`` steps).

        Opacus' arguments keep their meaning: ``loss_reduction`` ("mean": the released sum is divided by the
        expected batch size; "sum": not), ``clipping`` ("flat", "per_layer" — with a list ``max_grad_norm``, one
        norm per parameter tensor in the optimizer's order — or "automatic", or a ClippingStyle),
        ``grad_sample_mode`` (every mode that means per-example clipping is accepted: one engine computes it),
        ``criterion`` (returned as is with "ghost": no double backward is needed here), ``wrap_model``.
        What cannot be private is refused with the change to make: ``poisson_sampling=False``,
        ``batch_first=False``, ``grad_sample_mode="no_op"``, ``noise_generator`` in secure mode.

        ``sam_rho > 0`` makes the optimizer DP-SAT (``sam_method="dpsat"``, same privacy cost as DP-SGD;
        ``sam_direction`` "noisy_gradient" or "last_update"), or the two-query DP-SAM baseline
        (``sam_method="dpsam"``, accounted as two compositions per step, needs ``step(closure)``).
        ``sparsity``: a :mod:`dpsat_fast.pruning` method (pre-pruning, gradient dropping) for the optimizer.
        ``seed``: INSECURE fixed noise key, for reproducible experiments only.
        """
        if sam_method not in ("dpsat", "dpsam"):
            raise PrivacyConfigError(f"sam_method must be 'dpsat' or 'dpsam', got {sam_method!r}")
        if sam_direction not in DIRECTIONS:
            raise PrivacyConfigError(f"sam_direction must be one of {DIRECTIONS}, got {sam_direction!r}")
        sam_rho = check_rho(sam_rho)
        compositions = 2 if sam_method == "dpsam" else 1
        _check_opacus_arguments(poisson_sampling, batch_first, grad_sample_mode, rand_on_empty)
        seed = self._noise_seed(seed, noise_generator)
        module, _ = distributed.unwrap_data_parallel(module)  # the optimizer's all-reduce replaces DDP's reducer
        module = _unwrap_opacus(module)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise PrivacyConfigError("give exactly one of noise_multiplier or target_epsilon (with target_delta "
                                     "and epochs)")
        multi_process = distributed.is_distributed()
        sharded = isinstance(getattr(data_loader, "sampler", None), torch.utils.data.DistributedSampler)
        if multi_process or sharded or isinstance(data_loader, distributed.DistributedPoissonDataLoader):
            if multi_process:
                distributed.broadcast_module(module)  # identical starting weights on every rank
            elif sharded and data_loader.sampler.num_replicas > 1:
                raise PrivacyConfigError("the loader's DistributedSampler has several replicas but no process group "
                                         "of that size is initialized (torch.distributed.init_process_group)")
            loader = (data_loader if isinstance(data_loader, distributed.DistributedPoissonDataLoader)
                      else distributed.DistributedPoissonDataLoader.from_data_loader(data_loader, world_size=(
                          None if multi_process else 1), rank=(None if multi_process else 0)))
            num_samples, expected_batch_size = loader.global_num_samples, loader.global_expected_batch_size
        else:
            loader = (data_loader if isinstance(data_loader, PoissonDataLoader)
                      else PoissonDataLoader.from_data_loader(data_loader))
            num_samples, expected_batch_size = loader.num_samples, loader.expected_batch_size
        if target_epsilon is not None:
            if target_delta is None or epochs is None:
                raise PrivacyConfigError("target_epsilon needs target_delta and epochs to calibrate σ")
            check_delta(target_delta, num_samples)
            noise_multiplier = calibrate_noise_multiplier(target_epsilon, target_delta, loader.sample_rate,
                                                          epochs * len(loader), accountant=self.accountant.method,
                                                          compositions_per_step=compositions)
        style, max_grad_norm = _clipping_style(clipping, max_grad_norm, module, optimizer)
        self.engine = BookKeepingEngine(module, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                                        clipping=style)
        try:
            common = dict(engine=self.engine, noise_multiplier=noise_multiplier,
                          expected_batch_size=expected_batch_size, seed=seed, accountant=self.accountant,
                          sample_rate=loader.sample_rate, allow_non_private=allow_non_private, sparsity=sparsity,
                          loss_reduction=loss_reduction, distributed=multi_process)
            if sam_method == "dpsam":
                self.optimizer = DPSAM(optimizer, rho=sam_rho, **common)
            elif sam_rho > 0:
                self.optimizer = DPSAT(optimizer, rho=sam_rho, direction=sam_direction, **common)
            else:
                self.optimizer = DPOptimizer(optimizer, **common)
        except BaseException:
            self.engine.detach()
            self.engine = None
            raise
        if hasattr(loader, "examples_yielded"):
            self.optimizer.watch_batches(loader)
        self.data_loader = loader
        returned = module if wrap_model else PrivacyHooks(self)
        if grad_sample_mode == "ghost":
            return returned, self.optimizer, (criterion if criterion is not None else nn.CrossEntropyLoss()), loader
        return returned, self.optimizer, loader

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                                  data_loader: DataLoader, target_epsilon: float, target_delta: float, epochs: int,
                                  max_grad_norm: Union[float, Sequence[float]], **kwargs):
        """Opacus' signature: :meth:`make_private` with σ calibrated so that ε ≤ ``target_epsilon`` at
        ``target_delta`` after ``epochs`` epochs (accounted with this engine's accountant)."""
        if "noise_multiplier" in kwargs:
            raise PrivacyConfigError("make_private_with_epsilon calibrates noise_multiplier itself; use make_private "
                                     "to give it")
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs,
                                 max_grad_norm=max_grad_norm, **kwargs)

    def _noise_seed(self, seed: Optional[int], noise_generator) -> Optional[int]:
        if noise_generator is None:
            return seed
        if self.secure_mode:
            raise PrivacyConfigError("noise_generator is prohibited in secure mode (as in Opacus): the noise key is "
                                     "secret. For a reproducible, NOT private run use PrivacyEngine(secure_mode=False)")
        if seed is not None:
            raise PrivacyConfigError("give at most one of seed and noise_generator")
        if not isinstance(noise_generator, torch.Generator):
            raise PrivacyConfigError(f"noise_generator must be a torch.Generator, got {type(noise_generator).__name__}")
        return int(noise_generator.initial_seed()) % (2 ** 63)

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


def _check_opacus_arguments(poisson_sampling, batch_first, grad_sample_mode, rand_on_empty) -> None:
    if not poisson_sampling:
        raise PrivacyConfigError(
            "poisson_sampling=False: the privacy guarantee and the accountant assume that each example is in a "
            "batch independently with probability q; a shuffled fixed-size loader is a different mechanism whose "
            "ε this library does not compute. Remove poisson_sampling=False: the loader is converted to Poisson "
            "sampling with q = batch_size / N (batch sizes vary around batch_size; an empty batch is a normal "
            "step). See docs/migration.md")
    if not batch_first:
        raise PrivacyConfigError(
            "batch_first=False: per-example clipping needs the batch as the first dimension of every layer's "
            "input. Feed batch-first tensors (nn.LSTM/GRU/RNN and nn.Transformer* modules are converted exactly by "
            "dpsat_fast.fix_model(model)) and drop batch_first=False")
    if grad_sample_mode == "no_op":
        raise PrivacyConfigError(
            "grad_sample_mode='no_op' leaves per-sample gradients to the caller; this library computes them "
            f"itself. Drop the argument (every per-example mode {GRAD_SAMPLE_MODES} means the same here)")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise PrivacyConfigError(f"unknown grad_sample_mode {grad_sample_mode!r}; expected one of {GRAD_SAMPLE_MODES}")
    if rand_on_empty:
        raise PrivacyConfigError("rand_on_empty=True: empty Poisson batches are normal steps here (pure noise); "
                                 "drop the argument")


def _clipping_style(clipping, max_grad_norm, module: nn.Module, optimizer) -> Tuple[Union[str, ClippingStyle], float]:
    """Opacus' per-layer clipping takes one norm per parameter tensor (in the optimizer's order): budgets C_p,
    sensitivity sqrt(Σ C_p²). Everything else passes through."""
    if isinstance(max_grad_norm, (list, tuple)):
        if clipping != "per_layer":
            raise PrivacyConfigError("a list max_grad_norm (one norm per parameter) needs clipping='per_layer'")
        names = {p: n for n, p in module.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if len(max_grad_norm) != len(params):
            raise PrivacyConfigError(f"per-layer clipping: max_grad_norm has {len(max_grad_norm)} entries for "
                                     f"{len(params)} trainable parameter tensors of the optimizer")
        norms = {names[p]: check_max_grad_norm(c) for p, c in zip(params, max_grad_norm)}
        total = math.sqrt(sum(c * c for c in norms.values()))
        return GroupWiseClipping(total, lambda key: key, weights={k: c * c for k, c in norms.items()}), total
    if clipping == "adaptive":
        raise PrivacyConfigError("clipping='adaptive' (Opacus' AdaClip) is not supported; use 'flat', 'per_layer' "
                                 "or 'automatic'")
    return clipping, max_grad_norm


def _unwrap_opacus(module: nn.Module) -> nn.Module:
    """A model already wrapped by Opacus: refuse distributed wrappers, unwrap a GradSampleModule (its hooks
    removed, so that Opacus stops materializing per-sample gradients)."""
    names = {c.__name__ for c in type(module).__mro__}
    if "FSDPModule" in names:
        raise PrivacyConfigError("FSDP-sharded models are not supported: use data parallelism (each rank holds the "
                                 "whole model; see docs/distributed.md)")
    if "AbstractGradSampleModule" in names or "GradSampleModule" in names:
        inner = module._module
        close = getattr(module, "_close", None)
        if callable(close):
            close()  # removes Opacus' hooks and its grad_sample attributes
        for p in inner.parameters():
            for attr in ("grad_sample", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
        return inner
    return module
