"""Checkpoint and resume a private run: one call saves, one call loads.

What is saved: model weights, the optimizer's state (the wrapped optimizer's buffers, the step count, the
public privacy parameters, DP-SAT's pending perturbation, which is computed from released gradients), the
accountant's ledger and torch's global RNG state (dropout, augmentation). What is NOT saved, because the
guarantee rests on it being secret: the noise key (a resumed run draws a new one from the OS) and any
state of the Poisson sampler (it draws from the OS CSPRNG and keeps none). A checkpoint is therefore as
shareable as the model itself.

Loading validates everything first (format, ledger, that the ledger counts as many steps as the optimizer
took, the model's keys and shapes, the optimizer's parameter groups) and only then applies it, so a refused
checkpoint leaves the run untouched. Files are written to a temporary name and renamed, so a crash while
saving never leaves a truncated checkpoint. Loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

FORMAT_VERSION = 2


def atomic_save(obj: Any, path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path, *, model: Optional[nn.Module] = None, optimizer=None, accountant=None,
                    module: Optional[nn.Module] = None, checkpoint_dict: Optional[Dict[str, Any]] = None,
                    data_loader=None, **extra: Any) -> None:
    """Write a resumable checkpoint of a private run to ``path`` (atomically). ``module=`` is accepted for
    ``model=`` (Opacus' name), ``checkpoint_dict`` for extra entries (plain data), like ``**extra``.
    ``data_loader`` is accepted for compatibility; nothing of it is saved."""
    model = _one_of(model, module, "model", "module")
    if optimizer is None:
        raise ValueError("save_checkpoint needs the private optimizer")
    accountant = accountant if accountant is not None else getattr(optimizer, "accountant", None)
    if accountant is None:
        raise ValueError("save_checkpoint needs the accountant: ε must survive a restart")
    atomic_save({
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "accountant": accountant.state_dict(),
        "torch_rng_state": torch.get_rng_state(),
        "extra": {**(checkpoint_dict or {}), **extra},
    }, path)


def load_checkpoint(path, *, model: Optional[nn.Module] = None, optimizer=None, accountant=None,
                    module: Optional[nn.Module] = None, data_loader=None) -> Dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` in place; returns its extra entries.

    Everything is validated before anything is applied; a refused checkpoint changes nothing."""
    from .accounting import PrivacyAccountant

    model = _one_of(model, module, "model", "module")
    if optimizer is None:
        raise ValueError("load_checkpoint needs the private optimizer")
    accountant = accountant if accountant is not None else getattr(optimizer, "accountant", None)
    ckpt = torch.load(path, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a dpsat_fast checkpoint (format {FORMAT_VERSION})")
    if not ckpt.get("accountant"):
        raise ValueError(f"{path} has no privacy ledger: refusing to resume, the privacy already spent would be "
                         f"lost. Start a new run (and count the old one's ε yourself)")
    if accountant is None:
        raise ValueError("load_checkpoint needs the accountant the run continues with")
    # -- validate -------------------------------------------------------------------------------
    ledger = PrivacyAccountant()
    ledger.load_state_dict(ckpt["accountant"])
    opt_state = ckpt.get("optimizer")
    type(optimizer).check_state_dict(opt_state)
    if opt_state["dp"]["steps"] != ledger.steps:
        raise ValueError(f"{path}: the optimizer took {opt_state['dp']['steps']} steps but the privacy ledger records "
                         f"{ledger.steps}: the ledger does not belong to this run; refusing to resume")
    _check_model_state(model, ckpt.get("model"), path)
    _check_optimizer_groups(optimizer, opt_state, path)
    # -- apply ----------------------------------------------------------------------------------
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(opt_state)
    accountant.load_state_dict(ckpt["accountant"])
    torch.set_rng_state(ckpt["torch_rng_state"])
    return ckpt.get("extra", {})


def _one_of(a, b, name_a: str, name_b: str):
    if (a is None) == (b is None):
        raise ValueError(f"give exactly one of {name_a}= or {name_b}=")
    return a if a is not None else b


def _check_model_state(model: nn.Module, state, path) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no model state")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: the model state does not fit this model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    wrong = [k for k, v in own.items() if tuple(getattr(state[k], "shape", ())) != tuple(getattr(v, "shape", ()))]
    if wrong:
        raise ValueError(f"{path}: parameter shapes differ from this model's: {wrong[:5]}")


def _check_optimizer_groups(optimizer, state, path) -> None:
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups) or any(
            len(g.get("params", ())) != len(o["params"]) for g, o in zip(groups, optimizer.param_groups)):
        raise ValueError(f"{path}: the optimizer state has other parameter groups than this optimizer")
