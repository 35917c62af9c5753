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
        # csrc/cuda: device code (*.cu, CUDA headers only) and its torch glue (*.cpp)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        # no FMA contraction: the same noise bits as every other build of the Philox kernels
        extra_compile_args["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["--fmad=false", "-std=c++17"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
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
