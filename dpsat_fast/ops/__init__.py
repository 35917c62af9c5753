"""Public ops of dpsat_fast: one typed wrapper per op, implementations per device.

* :mod:`.noise`: counter-based Gaussian noise (C++ on CPU, Triton on CUDA, reference elsewhere).
* :mod:`.per_sample`: per-sample squared norms and clipped noisy sums of layer gradients, registered as
  ``torch.ops.dpsat_fast.*`` ops (C++ on CPU, Triton on CUDA, pure PyTorch where neither runs; see
  :mod:`.backend`).
* :mod:`.multi_tensor`: DP-SAT's passes over all parameters (global squared norm, perturb with backup).
* :mod:`.reference`: the pure-PyTorch oracle of the noise stream; :mod:`.torch_impl`: the pure-PyTorch
  per-sample implementations.
"""
from __future__ import annotations

from ._ext import EXTENSION_AVAILABLE
from .backend import kernel_backend, kernel_backend_as, set_kernel_backend, use_triton
from .multi_tensor import multi_tensor_perturb_, multi_tensor_sq_norm
from .noise import NOISE_DTYPES, add_noise_and_scale_, cpu_capability, philox_normal, philox_uint32
from .per_sample import (
    affine_per_example_grads,
    choose_route,
    conv_clipped_sum_with_noise,
    conv_per_example_grads,
    conv_weight_sq_norms,
    linear_clipped_sum_with_noise,
    linear_weight_sq_norms,
    per_example_clipped_sum_with_noise,
)

__all__ = [
    "EXTENSION_AVAILABLE",
    "NOISE_DTYPES",
    "add_noise_and_scale_",
    "affine_per_example_grads",
    "choose_route",
    "conv_clipped_sum_with_noise",
    "conv_per_example_grads",
    "conv_weight_sq_norms",
    "cpu_capability",
    "kernel_backend",
    "kernel_backend_as",
    "linear_clipped_sum_with_noise",
    "linear_weight_sq_norms",
    "multi_tensor_perturb_",
    "multi_tensor_sq_norm",
    "per_example_clipped_sum_with_noise",
    "philox_normal",
    "philox_uint32",
    "set_kernel_backend",
    "use_triton",
]
