"""dpsat_fast: fast differentially private training (DP-SGD, DP-SAT) for PyTorch.

Entry points: :class:`PrivacyEngine` (one call, Opacus style), or the parts: :class:`BookKeepingEngine`
(per-example clipping in one backward), :class:`DPOptimizer` (noise, any torch.optim optimizer),
:class:`PoissonDataLoader`, :class:`PrivacyAccountant`; :func:`fix_model` swaps unsupported layers
(:class:`DPLSTM`/:class:`DPGRU`/:class:`DPRNN` for torch's and Opacus' recurrent layers) and
:func:`register_generic` opts a module's own raw parameters in to the exact generic rule.
"""

__version__ = "0.1.0"

from .accounting import PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon
from .data import PoissonDataLoader, split_micro_batches
from .engine import BookKeepingEngine
from .layers import DPGRU, DPLSTM, DPRNN, register_generic
from .optim import DPOptimizer
from .privacy_engine import PrivacyEngine
from .validation import PrivacyConfigError, fix_model, freeze_batchnorm, validate_model

__all__ = ["PrivacyEngine", "BookKeepingEngine", "DPOptimizer", "PoissonDataLoader", "PrivacyAccountant",
           "calibrate_noise_multiplier", "compute_epsilon", "split_micro_batches", "fix_model",
           "validate_model", "PrivacyConfigError", "freeze_batchnorm", "DPLSTM", "DPGRU", "DPRNN", "register_generic"]
