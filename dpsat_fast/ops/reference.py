"""Pure-PyTorch reference for counter-based Gaussian noise: the oracle for the compiled kernels.

The noise for ``(seed, offset)`` is the stream Triton's ``tl.randn(seed, offset + j)`` produces
(``triton/language/random.py``): element ``j`` runs Philox4x32-10 (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011) on

* counter ``(lo(offset + j), hi(offset + j), 0, 0)`` and key ``(lo(seed), hi(seed))``, 32-bit words;
* ten rounds of ``(c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0))``
  with ``A = 0xD2511F53``, ``B = 0xCD9E8D57``, then ``k0 += 0x9E3779B9``, ``k1 += 0xBB67AE85``;

turns the first two output words into uniforms (``uint_to_uniform_float``: reinterpret as int32,
map ``x < 0`` to ``-x - 1``, round to fp32 and multiply by ``4.6566127342e-10`` in fp32) and those
into one normal by Box-Muller (``pair_uniform_to_normal``):

    u1 = max(1e-7, u1),   xi = sqrt(-2 log u1) * cos(2 pi u2)        (every step rounded to fp32)

so ``|xi| <= sqrt(-2 log 1e-7) ~= 5.68``. ``log``, ``sqrt`` and ``cos`` are evaluated in fp64 and
rounded once: correctly rounded fp32 functions, so the reference does not depend on the math library
at hand; it matches Triton to an ulp or two and the C++ kernel (which does the same) bit for bit in
practice.

All of this runs on any device; uint32 arithmetic is emulated in int64.
"""
from __future__ import annotations

import torch

__all__ = [
    "philox4x32",
    "philox_randint4x",
    "uint32_to_uniform",
    "pair_uniform_to_normal",
    "philox_normal",
    "add_noise_and_scale_ref",
]

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10

UINT32_TO_UNIFORM = 4.6566127342e-10
MIN_UNIFORM = 1.0e-7
TWO_PI = 6.283185307179586

_CPU_CHUNK = 1 << 16
_DEVICE_CHUNK = 1 << 24


def _mulhilo32(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``multiplier * x`` for uint32 values held in int64.

    The 64-bit product would overflow int64, so the multiplier is split into 16-bit halves:
    ``m x = (m_hi x) 2^16 + m_lo x`` with both partial products below ``2^48``.
    """
    product_lo = x * (multiplier & 0xFFFF)
    product_hi = x * (multiplier >> 16)
    hi = (product_hi + (product_lo >> 16)) >> 16
    lo = (((product_hi & 0xFFFF) << 16) + product_lo) & _MASK32
    return hi, lo


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[int, int],
    n_rounds: int = N_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with ``n_rounds`` rounds (Random123's ``philox4x32_R``, Triton's ``philox_impl``).

    Args:
        counter: four int64 tensors of one shape holding the uint32 counter words.
        key: the two uint32 key words.
        n_rounds: rounds (10 everywhere in dpsat_fast; a parameter for tests).

    Returns:
        The four output words, int64 tensors holding uint32 values.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_randint4x(
    seed: int, counters: torch.Tensor, n_rounds: int = N_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four words of Triton's ``tl.randint4x(seed, counters)``.

    Args:
        seed: ``0 <= seed < 2**63``; the key is ``(lo(seed), hi(seed))``.
        counters: int64 tensor of offsets (any shape); offset ``c`` is the Philox counter
            ``(lo(c), hi(c), 0, 0)``.
        n_rounds: Philox rounds.

    Returns:
        Four int64 tensors shaped like ``counters`` holding uint32 values.
    """
    if counters.dtype != torch.int64:
        raise TypeError(f"philox_randint4x: counters must be int64, got {counters.dtype}")
    _check_seed("philox_randint4x", seed)
    zeros = torch.zeros_like(counters)
    counter = (counters & _MASK32, (counters >> 32) & _MASK32, zeros, zeros)
    return philox4x32(counter, (seed & _MASK32, seed >> 32), n_rounds)


def uint32_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 values in int64: float32 in ``[0, 1)``."""
    # as int32, x < 0 -> -x - 1; for the uint32 value that is bits ^ 0xFFFFFFFF
    folded = torch.where(bits > 0x7FFFFFFF, bits ^ _MASK32, bits)
    scale = torch.tensor(UINT32_TO_UNIFORM, dtype=torch.float32, device=bits.device)
    return folded.to(torch.float32) * scale


def pair_uniform_to_normal(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """First output of Triton's ``pair_uniform_to_normal`` (Box-Muller) for float32 uniforms."""
    device = u1.device
    u1 = torch.maximum(u1, torch.tensor(MIN_UNIFORM, dtype=torch.float32, device=device))
    theta = torch.tensor(TWO_PI, dtype=torch.float32, device=device) * u2
    # fp64 then one rounding: correctly rounded fp32 log, sqrt and cos (torch's fp32 sqrt on CPU
    # is not correctly rounded, and its log and cos need not be)
    log_u1 = torch.log(u1.double()).float()
    radius = torch.sqrt(-2.0 * log_u1.double()).float()
    return radius * torch.cos(theta.double()).float()


def philox_normal(
    seed: int, offset: int, numel: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``tl.randn(seed, offset + j)`` for ``j < numel``: a float32 tensor of shape ``(numel,)``."""
    _check_seed("philox_normal", seed)
    _check_offset("philox_normal", offset, numel)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    # chunks keep the int64 temporaries in cache on CPU (1.5x faster) and bound their memory
    chunk = _CPU_CHUNK if out.device.type == "cpu" else _DEVICE_CHUNK
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        counters = torch.arange(start, stop, dtype=torch.int64, device=out.device) + offset
        r0, r1, _, _ = philox_randint4x(seed, counters)
        out[start:stop] = pair_uniform_to_normal(uint32_to_uniform(r0), uint32_to_uniform(r1))
    return out


def add_noise_and_scale_ref(
    grad: torch.Tensor, seed: int, offset: int, noise_std: float, scale: float
) -> None:
    """In place ``grad <- (grad + noise_std * xi) * scale``, ``xi = philox_normal(seed, offset, ...)``.

    ``xi`` is laid over ``grad`` in row-major (flattened contiguous) order whatever its strides. The
    arithmetic is fp32 (fp64 for float64 grads, with ``xi`` widened exactly) and rounds once on the
    store into ``grad``'s dtype.
    """
    xi = philox_normal(seed, offset, grad.numel(), grad.device).view(grad.shape)
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    noisy = (grad.to(acc_dtype) + noise_std * xi.to(acc_dtype)) * scale
    grad.copy_(noisy)


def _check_seed(op: str, seed: int) -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"{op}: seed must be in [0, 2**63), got {seed}")


def _check_offset(op: str, offset: int, numel: int) -> None:
    if offset < 0:
        raise ValueError(f"{op}: offset must be non-negative, got {offset}")
    if numel < 0:
        raise ValueError(f"{op}: numel must be non-negative, got {numel}")
    if offset + numel > 2**63:
        raise ValueError(f"{op}: offset + numel must not exceed 2**63, got {offset} + {numel}")
