"""The CUDA device code compiles with nvcc on a machine without a CUDA torch (compile only).

csrc/cuda/*.cu include CUDA headers and csrc/philox.h, nothing from torch; their torch glue
(csrc/cuda/*.cpp) builds only against a CUDA torch and is exercised where one is installed.
"""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


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
