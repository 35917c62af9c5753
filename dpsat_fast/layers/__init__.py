"""Per-sample gradient rules, one per layer family, and the registry that maps module types to them.

Matching is by exact type: a subclass of a supported layer may compute something else in its forward,
so it must be registered explicitly with :func:`register_rule`. Two lookups go beyond the table:

* a module marked with :func:`register_generic` (and without a rule of its own type) gets the opt-in
  :class:`~dpsat_fast.layers.generic.GenericRule` for its own parameters;
* Opacus' ``RNNLinear`` (an nn.Linear subclass with nn.Linear's forward, checked) gets the Linear rule and
  Opacus' ``DPLSTM``/``DPGRU``/``DPRNN`` get :class:`~dpsat_fast.layers.rnn.OpacusRNNRule`, recognized by
  class name and module path without importing opacus.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from torch import nn

from .attention import (DPMultiheadAttention, SequenceFirstAdapter, convert_multihead_attention,
                        convert_sequence_first_transformers)
from .base import LayerRule, ModuleRecord
from .conv import ConvRule
from .embedding import EmbeddingBagRule, EmbeddingRule
from .generic import GenericRule, generic_rule_of, register_generic, unregister_generic
from .linear import LinearRule
from .norms import BatchNormRule, GroupNormRule, InstanceNormRule, LayerNormRule, RMSNormRule
from .rnn import DPGRU, DPLSTM, DPRNN, OpacusRNNRule, convert_rnn, is_opacus_rnn, is_opacus_rnn_linear

_RULES: Dict[Type[nn.Module], LayerRule] = {}
_OPACUS_RNN_RULE = OpacusRNNRule()


def register_rule(module_type: Type[nn.Module], rule: LayerRule) -> None:
    """Make modules of exactly ``module_type`` private with ``rule`` (replaces any earlier rule)."""
    _RULES[module_type] = rule


def get_rule(module: nn.Module) -> Optional[LayerRule]:
    rule = _RULES.get(type(module))
    if rule is not None:
        return rule
    if is_opacus_rnn_linear(module):
        return _RULES.get(nn.Linear)  # whatever rule nn.Linear has now (same forward)
    if is_opacus_rnn(module):
        return _OPACUS_RNN_RULE
    return generic_rule_of(module)


def supported_types() -> tuple:
    return tuple(_RULES)


for _rule in (LinearRule(), ConvRule(), EmbeddingRule(), EmbeddingBagRule(), LayerNormRule(), RMSNormRule(),
              GroupNormRule(), InstanceNormRule(), BatchNormRule()):
    for _t in _rule.module_types:
        register_rule(_t, _rule)

__all__ = ["LayerRule", "ModuleRecord", "register_rule", "get_rule", "supported_types", "DPMultiheadAttention",
           "convert_multihead_attention", "SequenceFirstAdapter", "convert_sequence_first_transformers",
           "DPLSTM", "DPGRU", "DPRNN", "convert_rnn", "GenericRule", "register_generic", "unregister_generic"]
