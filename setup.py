"""Builds dpsat_fast._C, the compiled ops. Metadata lives in pyproject.toml.

Environment switches:
  DPSAT_FAST_FORCE_CPU=1   CppExtension even where a CUDA build is possible
  DPSAT_FAST_FORCE_CUDA=1  CUDAExtension even where torch.version.cuda or CUDA_HOME is missing
  DEBUG=1                  -O0 -g instead of -O3
  MAX_JOBS=N               parallel compile jobs (read by torch's BuildExtension)
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

LIBRARY_NAME = "dpsat_fast"
ROOT = os.path.dirname(os.path.abspath(__file__))
# _C uses only the stable ABI (an empty module): one abi3 wheel per platform. With
# py_limited_api=True torch's BuildExtension defines Py_LIMITED_API for its oldest CPython.
PY_LIMITED_API_TAG = "cp310"


def env_flag(name: str) -> bool:
    return os.getenv(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def use_cuda() -> bool:
    force_cpu, force_cuda = env_flag("DPSAT_FAST_FORCE_CPU"), env_flag("DPSAT_FAST_FORCE_CUDA")
    if force_cpu and force_cuda:
        raise RuntimeError("DPSAT_FAST_FORCE_CPU and DPSAT_FAST_FORCE_CUDA are both set")
    if force_cpu:
        return False
    # nvcc alone is not enough: a CPU torch has no CUDA headers to build torch glue against.
    return force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)


def check_cuda_home() -> None:
    """torch derives CUDA_HOME from CUDA_HOME/CUDA_PATH, else from the nvcc on PATH: a wrapper script outside
    the toolkit (e.g. /usr/local/bin/nvcc) gives a root without headers, and a build that fails late."""
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        raise RuntimeError(
            f"CUDA build: no CUDA toolkit at CUDA_HOME={CUDA_HOME!r} (no include/cuda_runtime.h); set CUDA_HOME "
            "to the toolkit's root (e.g. /usr/local/cuda), or DPSAT_FAST_FORCE_CPU=1 for a CPU-only build")


def wheel_cuda_include_flags() -> list[str]:
    """Torch's CUDA headers include cuSPARSE's and cuBLAS's, which a bare toolkit may lack; a pip-installed
    CUDA torch has them in the nvidia-* wheels beside it. Searched last (-idirafter, like CPATH), so the
    toolkit's own headers win wherever both exist."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    site_packages = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    flags = []
    for include in sorted(glob.glob(os.path.join(site_packages, "nvidia", "*", "include"))):
        flags += ["-idirafter", include]
    return flags


def cxx_flags(debug: bool) -> list[str]:
    if sys.platform == "win32":
        return (["/Od", "/Zi"] if debug else ["/O2"]) + ["/openmp", "/fp:precise"]
    flags = ["-O0", "-g"] if debug else ["-O3"]
    # No FMA contraction: the same noise bits from every instruction-set version and build. No
    # errno from sqrt: lets the Box-Muller loop vectorize (torch builds with both -fno-* flags).
    flags += ["-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    flags.append("-fdiagnostics-color=always")
    if sys.platform != "darwin":
        # at::parallel_for is an OpenMP loop compiled into our code: without it, one thread.
        flags.append("-fopenmp")
    return flags


def get_extensions():
    debug = env_flag("DEBUG")
    cuda = use_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    extra_compile_args = {"cxx": cxx_flags(debug)}
    extra_link_args = ["-fopenmp"] if sys.platform not in ("win32", "darwin") else []
    if cuda:
        check_cuda_home()
        extra_compile_args["cxx"] += wheel_cuda_include_flags()
        # csrc/cuda: device code (*.cu, CUDA headers only) and its torch glue (*.cpp)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        # no FMA contraction: the same noise bits as every other build of the Philox kernels
        extra_compile_args["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["--fmad=false", "-std=c++17"]
        # A100, H100/H200 machine code, and PTX of sm_90 that newer GPUs compile at load
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    extension = CUDAExtension if cuda else CppExtension
    return [
        extension(
            f"{LIBRARY_NAME}._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    ]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API_TAG}},
)
