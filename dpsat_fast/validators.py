"""Opacus' ``ModuleValidator`` names over this library's checks: ``ModuleValidator.fix(model)`` (=
:func:`dpsat_fast.fix_model`), ``ModuleValidator.validate(model, strict=False)`` (the list of problems;
``strict=True`` raises) and ``ModuleValidator.is_valid(model)``."""

from __future__ import annotations

from typing import List

from torch import nn

from .validation import PrivacyConfigError, fix_model, model_problems


class ModuleValidator:
    @staticmethod
    def fix(module: nn.Module, **kwargs) -> nn.Module:
        """Replace what can be replaced exactly (BatchNorm -> GroupNorm unless frozen, nn.MultiheadAttention,
        sequence-first transformers, recurrent layers)."""
        return fix_model(module, **kwargs)

    @staticmethod
    def validate(module: nn.Module, *, strict: bool = False) -> List[PrivacyConfigError]:
        """Every problem that stops ``module`` from being trained privately (raises the first with
        ``strict=True``, as Opacus)."""
        errors = [PrivacyConfigError(p) for p in model_problems(module)]
        if strict and errors:
            raise errors[0]
        return errors

    @staticmethod
    def is_valid(module: nn.Module) -> bool:
        return not model_problems(module)


__all__ = ["ModuleValidator"]
