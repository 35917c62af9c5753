"""The CUDA side of the extension, as far as each machine allows.

* Everywhere: csrc/cuda/*.cu (CUDA headers and csrc/philox.h only, nothing from torch) compile with nvcc
  (compile only), and every op declared in csrc/dpsat_fast.cpp gets exactly one CUDA kernel: C++ in
  csrc/cuda/*.cpp or Python (Triton/PyTorch) in dpsat_fast/ops, or none because it takes no tensor.
* With a CUDA build of the extension loaded (a CUDA torch; no GPU needed): the dispatcher has every op's
  CUDA kernel, the noise ops' from csrc/cuda. .ci/cuda_build checks the same on an installed wheel.
* On a GPU: the CUDA C++ noise kernels produce the reference stream (the Triton ones are tested in
  tests/test_triton_kernels.py).
"""
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

from conftest import requires_cuda
from dpsat_fast import ops
from dpsat_fast.ops import multi_tensor, per_sample, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
TENSOR_FREE = {"cpu_capability"}  # one catch-all kernel for every device


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def declared_ops() -> list[str]:
    return sorted(re.findall(r'm\.def\(\s*"(\w+)\(', _read(os.path.join(ROOT, "csrc", "dpsat_fast.cpp"))))


def cuda_cpp_ops() -> list[str]:
    """Ops with a kernel in a ``TORCH_LIBRARY_IMPL(dpsat_fast, CUDA, m)`` block of csrc/cuda/*.cpp."""
    names = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))):
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(dpsat_fast,\s*CUDA,\s*m\)\s*\{(.*?)\n\}", _read(path), re.S):
            names += re.findall(r'm\.impl\(\s*"(\w+)"', block)
    return sorted(names)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", DEVICE_SOURCES, ids=os.path.basename)
def test_cuda_device_code_compiles(source, tmp_path):
    cmd = ["nvcc", "-c", "-std=c++17", "-O3", "--fmad=false", "-I", os.path.join(ROOT, "csrc"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           source, "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


def test_there_is_cuda_device_code():
    assert DEVICE_SOURCES, "csrc/cuda/*.cu is empty"


def test_every_op_has_exactly_one_cuda_kernel_source():
    declared, cpp = declared_ops(), cuda_cpp_ops()
    python = sorted(set(per_sample.SCHEMAS) | set(multi_tensor.SCHEMAS))  # registered for CUDA from Python
    assert cpp == ["add_noise_and_scale_", "philox_normal_", "philox_uint32_"], cpp
    assert not set(cpp) & set(python), "an op registered for CUDA both in C++ and in Python"
    assert sorted(set(cpp) | set(python) | TENSOR_FREE) == declared


def _loaded_cuda_build() -> bool:
    return ops.EXTENSION_AVAILABLE and torch.version.cuda is not None and ops.noise._has_cuda_kernels()


def _registered_at(name: str, key: str) -> str:
    for line in torch._C._dispatch_dump(f"dpsat_fast::{name}").splitlines():
        if line.startswith(f"{key}: registered at "):
            return line.split("registered at ", 1)[1]
    return ""


@pytest.mark.skipif(not _loaded_cuda_build(), reason="needs the extension built against a CUDA torch")
def test_cuda_build_registers_every_op():
    for name in declared_ops():
        full = f"dpsat_fast::{name}"
        if name in TENSOR_FREE:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(full, "CompositeImplicitAutograd"), name
            continue
        assert torch._C._dispatch_has_kernel_for_dispatch_key(full, "CUDA"), f"{name}: no CUDA kernel"
        where = _registered_at(name, "CUDA")
        expected = "csrc/cuda/" if name in cuda_cpp_ops() else "dpsat_fast/ops/"
        assert expected in where, f"{name}: CUDA kernel registered at {where}"
        assert "csrc/cpu/" in _registered_at(name, "CPU"), name


# -- on a GPU: the CUDA C++ kernels (backend 'torch' keeps Triton out) -----------------------------------


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    int_dtype = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                 torch.float16: torch.int16}[a.dtype]

    def ordered(t):
        i = t.contiguous().view(int_dtype).to(torch.int64)
        return torch.where(i < 0, torch.iinfo(int_dtype).min - i, i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


@requires_cuda
@pytest.mark.skipif(not _loaded_cuda_build(), reason="needs the extension built against a CUDA torch")
@pytest.mark.parametrize("seed, offset, numel", [(0, 0, 1), (7, 2**32 - 3, 1000), (2**40 + 5, 123, 300_001)])
def test_cuda_cpp_noise_kernels_match_reference(seed, offset, numel):
    dev = torch.device("cuda")
    words = torch.full((4, numel), -1, dtype=torch.int64, device=dev)
    torch.ops.dpsat_fast.philox_uint32_(words, seed, offset)
    counters = torch.arange(numel, dtype=torch.int64) + offset
    assert torch.equal(words.cpu(), torch.stack(reference.philox_randint4x(seed, counters)))
    normal = torch.full((numel,), float("nan"), device=dev)
    torch.ops.dpsat_fast.philox_normal_(normal, seed, offset)
    # the GPU's fp32 log/cos (--fmad=false, not fast-math) are within a couple of ulps of correctly rounded
    assert _ulps(normal.cpu(), reference.philox_normal(seed, offset, numel)) <= 8


@requires_cuda
@pytest.mark.skipif(not _loaded_cuda_build(), reason="needs the extension built against a CUDA torch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_cpp_add_noise_and_scale(dtype):
    grad = torch.randn(70_001, dtype=torch.float64).to(dtype)
    ours = grad.cuda()
    with ops.kernel_backend_as("torch"):
        ops.add_noise_and_scale_(ours, 11, 2**33, 1.7, 1 / 256)
    expected = grad.clone()
    reference.add_noise_and_scale_ref(expected, 11, 2**33, 1.7, 1 / 256)
    # the same arithmetic on noise a few fp32 ulps apart (|xi| < 6): 16 fp32 ulps of 6·noise_std·scale, plus
    # one rounding of the result in its dtype
    rtol = {torch.float64: 1e-15, torch.float32: 2 ** -23, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    torch.testing.assert_close(ours.cpu().double(), expected.double(), rtol=rtol, atol=6 * 1.7 / 256 * 16 * 2 ** -24)
