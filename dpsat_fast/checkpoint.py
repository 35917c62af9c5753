"""Checkpoint and resume a private run: one call saves, one call loads (TESTING.md item 11).

What is saved: model weights, optimizer state (the wrapped optimizer's buffers, the noise key and running
noise offset so noise is never replayed, DP-SAT's pending perturbation), the accountant's ledger, the step
counter, torch's global RNG state and the Poisson sampler's generator state. Everything is plain tensors
and Python containers, loaded with ``torch.load(weights_only=True)``. A checkpoint without a ledger is
refused: resuming without it would under-report the privacy spent.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

FORMAT_VERSION = 1


def _sampler_generator(data_loader) -> Optional[torch.Generator]:
    sampler = getattr(data_loader, "batch_sampler", None)
    return getattr(sampler, "generator", None)


def save_checkpoint(path, *, model: nn.Module, optimizer, accountant, data_loader=None, **extra: Any) -> None:
    """Write a resumable checkpoint of a private run to ``path`` (extra entries must be plain data)."""
    if accountant is None:
        raise ValueError("save_checkpoint needs the accountant: ε must survive a restart")
    generator = _sampler_generator(data_loader)
    torch.save({
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "accountant": accountant.state_dict(),
        "torch_rng_state": torch.get_rng_state(),
        "sampler_rng_state": generator.get_state() if generator is not None else None,
        "extra": extra,
    }, path)


def load_checkpoint(path, *, model: nn.Module, optimizer, accountant, data_loader=None) -> Dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` in place; returns its ``extra`` entries."""
    ckpt = torch.load(path, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a dpsat_fast checkpoint (format {FORMAT_VERSION})")
    if not ckpt.get("accountant"):
        raise ValueError(f"{path} has no privacy ledger: refusing to resume, the privacy already spent would be "
                         f"lost. Start a new run (and count the old one's ε yourself)")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    accountant.load_state_dict(ckpt["accountant"])
    torch.set_rng_state(ckpt["torch_rng_state"])
    generator = _sampler_generator(data_loader)
    if generator is not None and ckpt["sampler_rng_state"] is not None:
        generator.set_state(ckpt["sampler_rng_state"])
    return ckpt["extra"]
