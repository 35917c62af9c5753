"""Per-sample gradient rules, one per layer family, and the registry that maps module types to them.

Matching is by exact type: a subclass of a supported layer may compute something else in its forward,
so it must be registered explicitly with :func:`register_rule`.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from torch import nn

from .attention import (DPMultiheadAttention, SequenceFirstAdapter, convert_multihead_attention,
                        convert_sequence_first_transformers)
from .base import LayerRule, ModuleRecord
from .conv import ConvRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norms import BatchNormRule, GroupNormRule, InstanceNormRule, LayerNormRule, RMSNormRule

_RULES: Dict[Type[nn.Module], LayerRule] = {}


def register_rule(module_type: Type[nn.Module], rule: LayerRule) -> None:
    """Make modules of exactly ``module_type`` private with ``rule`` (replaces any earlier rule)."""
    _RULES[module_type] = rule


def get_rule(module: nn.Module) -> Optional[LayerRule]:
    return _RULES.get(type(module))


def supported_types() -> tuple:
    return tuple(_RULES)


for _rule in (LinearRule(), ConvRule(), EmbeddingRule(), LayerNormRule(), RMSNormRule(), GroupNormRule(),
              InstanceNormRule(), BatchNormRule()):
    for _t in _rule.module_types:
        register_rule(_t, _rule)

__all__ = ["LayerRule", "ModuleRecord", "register_rule", "get_rule", "supported_types", "DPMultiheadAttention",
           "convert_multihead_attention", "SequenceFirstAdapter", "convert_sequence_first_transformers"]
