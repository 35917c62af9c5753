"""Counter-based Gaussian noise: reference vs Random123 and Triton, compiled kernels vs reference."""
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import dpsat_fast.ops as ops
from dpsat_fast.ops import _ext, reference

requires_ext = pytest.mark.skipif(
    not ops.EXTENSION_AVAILABLE, reason="dpsat_fast._C not built (pip install --no-build-isolation -e .)"
)

MASK32 = 0xFFFFFFFF
# (seed, offset): small; counter low word wrapping into the high word inside a block; seed high word
SEED_OFFSETS = [(0, 0), (12345, 2**32 - 700), (2**40 + 17, 2**40 + 3), (2**63 - 1, 2**62)]
NUMELS = [1, 3, 1025, 4099]
NOISE_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of representable values between a and b (same float dtype), as int64."""
    int_dtype = {
        torch.float64: torch.int64,
        torch.float32: torch.int32,
        torch.bfloat16: torch.int16,
        torch.float16: torch.int16,
    }[a.dtype]

    def ordered(x):
        bits = x.contiguous().view(int_dtype).to(torch.int64)
        magnitude_mask = (1 << (torch.iinfo(int_dtype).bits - 1)) - 1
        return torch.where(bits < 0, -(bits & magnitude_mask), bits)

    return (ordered(a) - ordered(b)).abs()


def reference_uint32(seed: int, offset: int, numel: int) -> torch.Tensor:
    counters = torch.arange(numel, dtype=torch.int64) + offset
    return torch.stack(reference.philox_randint4x(seed, counters))


def _run_python(code: str, **env) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_reference_philox_matches_random123_kat(counter, key, expected):
    # Random123 kat_vectors, philox4x32 with 10 rounds
    words = reference.philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(w.item() for w in words) == expected


TRITON_BLOCK = 1024
TRITON_NUMEL = 1500  # two programs, the second one masked


def dump_triton_streams(path: str) -> None:
    """Runs tl.randint4x, tl.rand and tl.randn for every SEED_OFFSETS case; saves them to path.

    Runs in a subprocess (see triton_streams): TRITON_INTERPRET must be set before triton is
    imported and stay set while kernels run, which must not leak into other tests.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language as tl

    @triton.jit
    def _randint4x_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        r0, r1, r2, r3 = tl.randint4x(seed, offset + idx.to(tl.int64))
        tl.store(out_ptr + idx, r0.to(tl.int64), mask=mask)
        tl.store(out_ptr + n + idx, r1.to(tl.int64), mask=mask)
        tl.store(out_ptr + 2 * n + idx, r2.to(tl.int64), mask=mask)
        tl.store(out_ptr + 3 * n + idx, r3.to(tl.int64), mask=mask)

    @triton.jit
    def _rand_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + idx, tl.rand(seed, offset + idx.to(tl.int64)), mask=idx < n)

    @triton.jit
    def _randn_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + idx, tl.randn(seed, offset + idx.to(tl.int64)), mask=idx < n)

    grid = (triton.cdiv(TRITON_NUMEL, TRITON_BLOCK),)
    streams = {}
    for seed, offset in SEED_OFFSETS:
        words = torch.full((4, TRITON_NUMEL), -1, dtype=torch.int64)
        uniform = torch.full((TRITON_NUMEL,), float("nan"))
        normal = torch.full((TRITON_NUMEL,), float("nan"))
        _randint4x_kernel[grid](words, seed, offset, TRITON_NUMEL, BLOCK=TRITON_BLOCK)
        _rand_kernel[grid](uniform, seed, offset, TRITON_NUMEL, BLOCK=TRITON_BLOCK)
        _randn_kernel[grid](normal, seed, offset, TRITON_NUMEL, BLOCK=TRITON_BLOCK)
        streams[(seed, offset)] = (words, uniform, normal)
    torch.save(streams, path)


@pytest.fixture(scope="module")
def triton_streams(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    path = tmp_path_factory.mktemp("triton") / "streams.pt"
    _run_python(f"import runpy, sys; sys.argv = ['test_ops', {str(path)!r}]; "
                f"runpy.run_path({__file__!r}, run_name='__main__')")
    return torch.load(path)


@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_reference_uint32_matches_triton_randint4x(triton_streams, seed, offset):
    words, _, _ = triton_streams[(seed, offset)]
    assert torch.equal(words, reference_uint32(seed, offset, TRITON_NUMEL))


@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_reference_uniform_matches_triton_rand(triton_streams, seed, offset):
    _, uniform, _ = triton_streams[(seed, offset)]
    expected = reference.uint32_to_uniform(reference_uint32(seed, offset, TRITON_NUMEL)[0])
    assert torch.equal(uniform, expected)


@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_reference_normal_matches_triton_randn(triton_streams, seed, offset):
    _, _, normal = triton_streams[(seed, offset)]
    expected = reference.philox_normal(seed, offset, TRITON_NUMEL)
    # the interpreter's fp32 log and cos (numpy's) are not correctly rounded: an ulp or two apart
    torch.testing.assert_close(normal, expected, rtol=0, atol=1e-6)
    assert ulp_distance(normal, expected).max().item() <= 4


@requires_ext
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_compiled_uint32_equals_reference(seed, offset, numel):
    out = torch.full((4, numel), -1, dtype=torch.int64)  # a word the kernel skips stays -1
    torch.ops.dpsat_fast.philox_uint32_(out, seed, offset)
    assert torch.equal(out, reference_uint32(seed, offset, numel))


@requires_ext
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_compiled_normal_equals_reference(seed, offset, numel):
    compiled = torch.full((numel,), float("nan"))  # an element the kernel skips stays NaN
    torch.ops.dpsat_fast.philox_normal_(compiled, seed, offset)
    expected = reference.philox_normal(seed, offset, numel)
    # both round fp64 log/sqrt/cos once, so they agree bit for bit except in double-rounding ties
    assert ulp_distance(compiled, expected).max().item() <= 2


@requires_ext
@pytest.mark.parametrize("dtype", NOISE_DTYPES)
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("seed, offset", SEED_OFFSETS[1:3])
def test_compiled_add_noise_and_scale_equals_reference(seed, offset, numel, dtype):
    grad = torch.randn(numel, dtype=torch.float64).to(dtype)
    compiled, expected = grad.clone(), grad.clone()
    ops.add_noise_and_scale_(compiled, seed, offset, noise_std=1.7, scale=1 / 256)
    reference.add_noise_and_scale_ref(expected, seed, offset, noise_std=1.7, scale=1 / 256)
    # same fp32 (fp64) arithmetic on the same xi: an ulp apart at most, from a tie in xi
    assert ulp_distance(compiled, expected).max().item() <= 1


@requires_ext
def test_compiled_is_independent_of_thread_count():
    numel = 300_001  # several parallel chunks and a ragged last block
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.philox_normal(3, 2**32 - 150_000, numel)
        torch.set_num_threads(2)
        two = ops.philox_normal(3, 2**32 - 150_000, numel)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


@requires_ext
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_every_cpu_capability_gives_the_same_bits(capability, tmp_path):
    if capability == "avx2" and ops.cpu_capability() == "default":
        pytest.skip("CPU without AVX2")
    path = tmp_path / "noise.pt"
    reported = _run_python(
        f"""
        import torch, dpsat_fast.ops as ops
        torch.save(ops.philox_normal(99, 2**32 - 2003, 4099), {str(path)!r})
        print(ops.cpu_capability())
        """,
        DPSAT_FAST_CPU_CAPABILITY=capability,
    )
    assert reported.strip() == capability
    assert torch.equal(torch.load(path), ops.philox_normal(99, 2**32 - 2003, 4099))


def test_uint32_wrapper_matches_reference():
    assert torch.equal(ops.philox_uint32(2**40, 2**32 - 3, 7), reference_uint32(2**40, 2**32 - 3, 7))


def test_adjacent_offset_ranges_concatenate():
    # the optimizer gives each tensor the next offset range: the noise then tiles exactly
    whole = ops.philox_normal(11, 2**32 - 5, 10)
    parts = torch.cat([ops.philox_normal(11, 2**32 - 5, 4), ops.philox_normal(11, 2**32 - 1, 6)])
    assert torch.equal(whole, parts)


def test_non_contiguous_grad_gets_noise_in_row_major_order():
    grad = torch.randn(37, 5).t()  # (5, 37), not contiguous
    expected = grad.contiguous()
    ops.add_noise_and_scale_(grad, 5, 17, noise_std=2.0, scale=0.5)
    reference.add_noise_and_scale_ref(expected, 5, 17, noise_std=2.0, scale=0.5)
    assert ulp_distance(grad, expected).max().item() <= 1


@pytest.mark.parametrize("dtype", NOISE_DTYPES)
def test_zero_noise_std_only_scales(dtype):
    grad = torch.randn(1025, dtype=torch.float64).to(dtype)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (grad.to(acc_dtype) * 0.3).to(dtype)
    ops.add_noise_and_scale_(grad, 1, 0, noise_std=0.0, scale=0.3)
    assert torch.equal(grad, expected)


def test_noise_is_standard_normal():
    stats = pytest.importorskip("scipy.stats")
    xi = ops.philox_normal(2024, 0, 1_000_000).double().numpy()
    assert stats.kstest(xi, "norm", method="asymp").pvalue > 0.01
    # the test has the power to see a 1% error in the standard deviation
    assert stats.kstest(xi * 1.01, "norm", method="asymp").pvalue < 1e-3
    assert abs(xi.mean()) < 5e-3 and abs(xi.std() - 1) < 5e-3
    assert abs(xi).max() <= 5.68  # Box-Muller with u1 >= 1e-7 caps |xi| at sqrt(-2 log 1e-7)


@pytest.mark.parametrize(
    "stream_a, stream_b",
    [((1, 0), (1, 100_000)), ((1, 0), (2, 0)), ((1, 0), (1, 2**32)), ((1, 0), (2**32 + 1, 0))],
)
def test_different_streams_are_uncorrelated(stream_a, stream_b):
    n = 100_000
    a = ops.philox_normal(*stream_a, n).double()
    b = ops.philox_normal(*stream_b, n).double()
    correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(correlation) < 5 / n**0.5


@requires_ext
def test_opcheck_add_noise_and_scale():
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(3, 5, dtype=dtype)
        torch.library.opcheck(torch.ops.dpsat_fast.add_noise_and_scale_.default, (grad, 7, 2**33, 1.5, 0.25))


@requires_ext
def test_opcheck_philox_normal_and_uint32():
    torch.library.opcheck(torch.ops.dpsat_fast.philox_normal_.default, (torch.empty(257), 7, 2**33))
    out = torch.empty(4, 33, dtype=torch.int64)
    torch.library.opcheck(torch.ops.dpsat_fast.philox_uint32_.default, (out, 2**40, 5))


@requires_ext
def test_compiled_op_checks_name_the_op():
    with pytest.raises(RuntimeError, match="dpsat_fast::add_noise_and_scale_: grad must be contiguous"):
        torch.ops.dpsat_fast.add_noise_and_scale_(torch.zeros(4, 3).t(), 0, 0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="dpsat_fast::add_noise_and_scale_: grad must be float32"):
        torch.ops.dpsat_fast.add_noise_and_scale_(torch.zeros(4, dtype=torch.int32), 0, 0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="dpsat_fast::add_noise_and_scale_: seed must be non-negative"):
        torch.ops.dpsat_fast.add_noise_and_scale_(torch.zeros(4), -1, 0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="dpsat_fast::philox_normal_: offset must be non-negative"):
        torch.ops.dpsat_fast.philox_normal_(torch.zeros(4), 0, -3)
    with pytest.raises(RuntimeError, match="dpsat_fast::philox_normal_: offset \\+ numel"):
        torch.ops.dpsat_fast.philox_normal_(torch.zeros(4), 0, 2**63 - 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**63}, ValueError, "seed"),
        ({"offset": -1}, ValueError, "offset"),
        ({"offset": 2**63 - 2}, ValueError, "offset \\+ numel"),
        ({"noise_std": -0.5}, ValueError, "noise_std"),
        ({"noise_std": float("nan")}, ValueError, "noise_std"),
        ({"noise_std": float("inf")}, ValueError, "noise_std"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"grad": torch.zeros(4, dtype=torch.int64)}, TypeError, "float32"),
    ],
)
def test_wrapper_validates_arguments(kwargs, error, match):
    args = {"grad": torch.zeros(4), "seed": 0, "offset": 0, "noise_std": 1.0, "scale": 1.0, **kwargs}
    with pytest.raises(error, match=f"add_noise_and_scale_: .*{match}"):
        ops.add_noise_and_scale_(**args)


def test_pure_pytorch_path_when_extension_disabled(tmp_path):
    path = tmp_path / "grad.pt"
    out = _run_python(
        f"""
        import warnings
        warnings.simplefilter("error")  # a deliberate DPSAT_FAST_DISABLE_EXT does not warn
        import torch, dpsat_fast.ops as ops
        grad = torch.linspace(-1, 1, 1025).to(torch.bfloat16)
        ops.add_noise_and_scale_(grad, 8, 2**32 - 9, noise_std=0.5, scale=2.0)
        torch.save((grad, ops.philox_normal(8, 0, 3000)), {str(path)!r})
        print(ops.EXTENSION_AVAILABLE, ops.cpu_capability())
        """,
        DPSAT_FAST_DISABLE_EXT="1",
    )
    assert out.split() == ["False", "None"]
    grad, xi = torch.load(path)
    expected = torch.linspace(-1, 1, 1025).to(torch.bfloat16)
    reference.add_noise_and_scale_ref(expected, 8, 2**32 - 9, noise_std=0.5, scale=2.0)
    assert torch.equal(grad, expected)
    assert torch.equal(xi, reference.philox_normal(8, 0, 3000))


def test_missing_extension_warns_once_with_build_command(monkeypatch):
    def fail_import(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.delenv(_ext.DISABLE_ENV_VAR, raising=False)
    monkeypatch.setattr(_ext, "load_error", _ext.load_error)
    monkeypatch.setattr(_ext.importlib, "import_module", fail_import)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ext._load_extension() is False
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "pure-PyTorch" in message and "pip install --no-build-isolation -e ." in message


if __name__ == "__main__":
    dump_triton_streams(sys.argv[1])
