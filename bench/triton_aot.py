"""Ahead-of-time compile matrix of every Triton kernel of dpsat_fast, for real GPU targets, without a GPU.

The test suite runs the kernels in Triton's interpreter, which accepts code the real compiler rejects.
This script compiles each kernel with ``triton.compile`` (Triton → PTX → cubin with the ``ptxas`` shipped
in the triton wheel) for ``sm_80`` (A100) and ``sm_90`` (H100/H200):

* every launch configuration the kernels use on a GPU: the configs of each ``triton.autotune`` wrapper of
  :mod:`dpsat_fast.ops.triton.weight_grads` (read from the autotuners: tiles, num_warps, num_stages) and the
  fixed tiles of :mod:`~dpsat_fast.ops.triton.affine` and :mod:`~dpsat_fast.ops.triton.noise`
  (``_GPU_BLOCKS`` …, Triton's default warps/stages); every ``@triton.jit`` kernel of the package must have
  jobs (:func:`jit_kernels`, from the source), else the script fails;
* every constexpr combination the dispatch code can produce: operand dtype fp32/bf16/fp16 (with the
  ``PREC`` it implies: ``dot_precision`` = tf32x3 for fp32 on a GPU, tf32 for 16-bit operands, and
  ``LOW_PRECISION`` of the clipped sum), ``IS_CONV``, ``HAS_BIAS``, ``HAS_NOISE``, ``WRITE_SPLITS``,
  ``HAS_WEIGHT``;
* the argument types a launch specializes to: pointers ``*fp32``/``*bf16``/… (16-byte aligned, as torch
  allocations are) and integer scalars specialized as a launch does (``i32``/``i64`` by value, ``tt.divisibility``
  16 for multiples of 16, the constant 1): ``--scalars contiguous`` (sizes and strides of contiguous operands,
  a 63-bit Philox seed: ``i64``), ``strided`` (odd sizes and strides, no divisibility hint, ``i32`` seed and
  offsets) or ``both`` (the default).

Each compile records shared memory (``metadata.shared``), registers, spill stores/loads and stack frame
(from the ``ptxas -v`` log: Triton's own, captured through ``TRITON_DUMP_PTXAS_LOG``, or a second
``ptxas -v`` run on the PTX when that log is not available) and checks the budgets: shared memory within
the per-block opt-in limit (A100 163 KiB, H100/H200 227 KiB; Triton opts in above the 48 KiB default when
it loads a kernel) and no register spills. Exit status 1 when a compile fails or a budget is exceeded.

It needs triton (any 3.x with ``triton.compiler.ASTSource``) and torch (the kernel modules import it), not
CUDA and not the rest of dpsat_fast: the kernel modules are imported on their own (``dpsat_fast`` and
``dpsat_fast.ops`` are bare package stubs unless dpsat_fast is already imported), so a virtual environment
with only ``triton`` and the CPU ``torch`` runs it (.ci/triton_aot). ``TRITON_INTERPRET`` must be off.

    python bench/triton_aot.py --json bench/results/triton_aot.json --md bench/results/triton_aot.md
    python bench/triton_aot.py --kernels _ghost_sq_norms_kernel --targets 90 --limit 1   # one compile

``--json`` replaces, in an existing file, the section of the same triton version (one file holds the
matrix of several triton versions); ``--md`` renders every section of that file.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent

# per-block shared memory: the opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin) and the default
SMEM_OPTIN = {80: 163 * 1024, 90: 227 * 1024}
SMEM_DEFAULT = 48 * 1024
TARGET_NAMES = {80: "sm_80 (A100)", 90: "sm_90 (H100/H200)"}
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
PHILOX_INT_ARGS = ("seed", "offset", "w_offset", "b_offset")  # Python ints up to 2**63 at run time
FLOAT_ARGS = ("noise_std", "scale")  # Python floats: fp32 scalars

KERNEL_MODULES = ("weight_grads", "affine", "noise")


# ------------------------------------------------------------------------------------------------------
# the kernels and their launch matrix
# ------------------------------------------------------------------------------------------------------


def load_kernel_modules() -> Dict[str, types.ModuleType]:
    """The modules of dpsat_fast/ops/triton, imported without the rest of dpsat_fast (whose dependencies a
    throwaway triton environment lacks): ``dpsat_fast`` and ``dpsat_fast.ops`` become bare package stubs
    unless dpsat_fast is already imported."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels would be interpreted functions; unset it to compile")
    if "dpsat_fast" not in sys.modules:
        for name, path in (("dpsat_fast", ROOT / "dpsat_fast"), ("dpsat_fast.ops", ROOT / "dpsat_fast" / "ops")):
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            sys.modules[name] = stub
    return {m: importlib.import_module(f"dpsat_fast.ops.triton.{m}") for m in KERNEL_MODULES}


def _kernel_fn(mods, kernel: str):
    for mod in mods.values():
        fn = getattr(mod, kernel, None)
        if fn is not None:
            import triton

            if not isinstance(fn, triton.runtime.JITFunction):
                raise RuntimeError(f"{kernel} is a {type(fn).__name__}, not a JITFunction (interpreter on?)")
            return fn
    raise KeyError(kernel)


def _bools(*names):
    return [dict(zip(names, v)) for v in itertools.product((False, True), repeat=len(names))]


def jit_kernels(root: Path = ROOT / "dpsat_fast" / "ops" / "triton") -> Dict[str, str]:
    """{name: file} of every ``@triton.jit`` function of the kernel package that no other ``@triton.jit``
    function calls (the launched kernels; the others are inlined helpers), read from the source."""
    import ast

    jit, calls = {}, set()
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef):
                continue
            decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
            if any(isinstance(d, ast.Attribute) and d.attr == "jit" or isinstance(d, ast.Name) and d.id == "jit"
                   for d in decorators):
                jit[node.name] = path.name
                calls |= {c.func.id for c in ast.walk(node)
                          if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    return {name: f for name, f in jit.items() if name not in calls}


def autotune_configs(mod) -> Dict[str, List[tuple]]:
    """{kernel name: [(tile constexprs, num_warps, num_stages, maxnreg)]} of the module's ``triton.autotune``
    wrappers: exactly the configs the GPU autotuner tries."""
    import triton

    out = {}
    for obj in vars(mod).values():
        if isinstance(obj, triton.runtime.Autotuner):
            out[obj.fn.__name__] = [(dict(c.kwargs), c.num_warps, c.num_stages, getattr(c, "maxnreg", None))
                                    for c in obj.configs]
    return out


def build_jobs(mods, targets=(80, 90), scalars="both") -> List[dict]:
    """Every (kernel, target, launch config, dispatch constexprs, dtype) the GPU path can launch."""
    import torch

    wg, affine, noise = mods["weight_grads"], mods["affine"], mods["noise"]
    common = importlib.import_module("dpsat_fast.ops.triton._common")
    profiles = ["contiguous", "strided"] if scalars == "both" else [scalars]
    tuned = autotune_configs(wg)
    jobs = []

    def add(kernel, config, num_warps, num_stages, constexprs, dtype, pointers, maxnreg=None):
        for target, prof in itertools.product(targets, profiles):
            jobs.append(dict(kernel=kernel, target=target, config=dict(config), num_warps=num_warps,
                             num_stages=num_stages, maxnreg=maxnreg, constexprs=dict(constexprs), dtype=dtype,
                             pointers=dict(pointers), scalars=prof))

    def prec(dtype):
        # weight_grads._Operands.prec on a GPU: dot_precision (tf32x3) for fp32 operands, Triton's default
        # (tf32, irrelevant: 16-bit operands multiply exactly) for 16-bit ones
        return common.dot_precision(torch.device("cuda")) if dtype == "fp32" else "tf32"

    # weight_grads: autotuned, every config of the kernel's autotuner
    for dtype in DTYPES:
        for cfg, nw, ns, nreg in tuned["_ghost_sq_norms_kernel"]:
            for cx in _bools("IS_CONV", "HAS_BIAS"):
                # bias partials are fp32 row-tile sums, else the weight buffer (fp64) stands in
                add("_ghost_sq_norms_kernel", cfg, nw, ns, dict(cx, PREC=prec(dtype)), dtype,
                    dict(a_ptr=dtype, g_ptr=dtype, w_part_ptr="fp64", b_part_ptr="fp32" if cx["HAS_BIAS"] else "fp64"),
                    nreg)
        for cfg, nw, ns, nreg in tuned["_instantiate_sq_norms_kernel"]:
            for cx in _bools("IS_CONV", "HAS_BIAS"):
                add("_instantiate_sq_norms_kernel", cfg, nw, ns, dict(cx, PREC=prec(dtype)), dtype,
                    dict(a_ptr=dtype, g_ptr=dtype, w_part_ptr="fp64", b_part_ptr="fp64"), nreg)
        for cfg, nw, ns, nreg in tuned["_clipped_sum_kernel"]:
            for cx in _bools("IS_CONV", "HAS_BIAS", "HAS_NOISE", "WRITE_SPLITS"):
                add("_clipped_sum_kernel", cfg, nw, ns,
                    dict(cx, LOW_PRECISION=dtype != "fp32", PREC=prec(dtype), BLOCK_ROWS=wg.CLIPPED_SUM_BLOCK_ROWS),
                    dtype, dict(a_ptr=dtype, g_ptr=dtype, scale_ptr="fp32", w_out_ptr="fp32", b_out_ptr="fp32"), nreg)
    # affine: fixed tiles; without weight (bias) the gradient tensor stands in for the missing buffers
    for dtype in DTYPES:
        for cx in _bools("HAS_WEIGHT", "HAS_BIAS"):
            hw, hb = cx["HAS_WEIGHT"], cx["HAS_BIAS"]
            add("_affine_grads_kernel", affine._GPU_BLOCKS, None, None, cx, dtype,
                dict(x_ptr=dtype, g_ptr=dtype, dw_ptr="fp32" if hw else dtype, db_ptr="fp32" if hb else dtype,
                     w_sq_ptr="fp64" if hw else dtype, b_sq_ptr="fp64" if hb else dtype))
    # noise: the optimizer's in-place noise step (any 16/32-bit gradient) and the fp32 split reduction
    for dtype in DTYPES:
        for cx in _bools("HAS_NOISE"):
            add("_sum_noise_scale_kernel", dict(BLOCK=noise._GPU_BLOCK), None, None, cx, dtype,
                dict(src_ptr=dtype, out_ptr=dtype))
            add("_per_example_clipped_sum_kernel", noise._PER_EXAMPLE_GPU_BLOCKS, None, None, cx, dtype,
                dict(grads_ptr=dtype, scale_ptr="fp32", out_ptr="fp32"))
    return jobs


def uncovered_kernels(jobs: List[dict]) -> List[str]:
    """The ``@triton.jit`` kernels of the package that no job compiles (a new kernel left out of the matrix)."""
    return sorted(set(jit_kernels()) - {j["kernel"] for j in jobs})


# Representative integer arguments of a launch, per scalar profile. Triton specializes each int argument
# at launch: 1 becomes the constexpr 1, a multiple of 16 gets a divisibility hint, and its type is i32, i64
# or u64 by range; the compile matrix applies the same rules to these values.
_BIG = 2**40 + 3  # a Philox seed/offset beyond 2**31: i64
_LINEAR_GEOMETRY = dict(C_G=1, H=1, W=1, W_OUT=1, KH=1, KW=1, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1, G=1)


def _example_ints(kernel: str, cx: dict, profile: str) -> Dict[str, int]:
    """Int arguments of one launch: ``contiguous`` mirrors the common layouts (row-major Linear
    activations [B, T, D] with T=197, D=768, P=3072; NCHW 3x3/stride-1/pad-1 convolution of a 64-channel
    32x32 input; LayerNorm [B, T, C]; one noise source), ``strided`` the worst case for address arithmetic:
    no stride or size equal to 1 or a multiple of 16 (non-contiguous operands, odd sizes) except what the
    host fixes (the unit geometry and G=1 of a Linear layer)."""
    v = {}
    if kernel in ("_ghost_sq_norms_kernel", "_instantiate_sq_norms_kernel", "_clipped_sum_kernel"):
        if cx["IS_CONV"]:
            B, C, H, W, P = 32, 64, 32, 32, 64
            v.update(C_G=C, H=H, W=W, W_OUT=W, KH=3, KW=3, SH=1, SW=1, PH=1, PW=1, DH=1, DW=1, G=1,
                     T=H * W, D=C * 9, P=P, s_ab=C * H * W, s_a1=H * W, s_a2=W, s_a3=1,
                     s_gb=P * H * W, s_gt=1, s_gp=H * W)
        else:
            B, T, D, P = 32, 197, 768, 3072
            v.update(_LINEAR_GEOMETRY, T=T, D=D, P=P, s_ab=T * D, s_a1=D, s_a2=1, s_a3=0,
                     s_gb=T * P, s_gt=P, s_gp=1)
        n_tb = -(-v["T"] // 16)
        v.update(n_part=n_tb * n_tb if kernel == "_ghost_sq_norms_kernel" else -(-v["P"] // 16) * -(-v["D"] // 16),
                 n_tb_part=n_tb, n_rows=B * v["T"], rows_per_split=1024)
        if profile == "strided":
            v = {k: (x if (not cx["IS_CONV"] and k in _LINEAR_GEOMETRY) else 3) for k, x in v.items()}
            if not cx["IS_CONV"]:
                v["s_a3"] = 0
    elif kernel == "_affine_grads_kernel":
        B, T, C = 32, 197, 768
        v.update(T=T, C=C, n_cb=6, s_xb=T * C, s_xt=C, s_xc=1, s_gb=T * C, s_gt=C, s_gc=1)
        if profile == "strided":
            v = {k: 3 for k in v}
    elif kernel == "_sum_noise_scale_kernel":
        v.update(n=768 * 3072, n_src=1) if profile == "contiguous" else v.update(n=3, n_src=3)
    elif kernel == "_per_example_clipped_sum_kernel":
        v.update(B=32, K=768, s_b=768, s_k=1) if profile == "contiguous" else v.update(B=3, K=3, s_b=3, s_k=3)
    for name in PHILOX_INT_ARGS:  # i64 (a 63-bit seed) in one profile, i32 in the other: both randn paths
        v[name] = _BIG if profile == "contiguous" else 3
    return v


def _specialize_int(value: int):
    """Triton 3.x launch specialization of a Python int: (type or 'constexpr', divisible by 16)."""
    if value == 1:
        return "constexpr", False
    ty = "i32" if -2**31 <= value < 2**31 else ("i64" if -2**63 <= value < 2**63 else "u64")
    return ty, value % 16 == 0


def signature(fn, job):
    """Triton 3.x ``ASTSource`` arguments of a job: (signature, constexprs, attrs)."""
    consts = {**job["config"], **job["constexprs"]}
    dispatch_consts = set(consts)
    ints = _example_ints(job["kernel"], job["constexprs"], job["scalars"])
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            if name not in consts:
                raise ValueError(f"{fn.__name__}: constexpr {name} has no value in the compile matrix")
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name not in job["pointers"]:
                raise ValueError(f"{fn.__name__}: pointer {name} has no dtype in the compile matrix")
            sig[name] = "*" + job["pointers"][name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            if name not in ints:
                raise ValueError(f"{fn.__name__}: int argument {name} has no value in the compile matrix")
            ty, div16 = _specialize_int(ints[name])
            sig[name] = ty
            if ty == "constexpr":
                consts[name] = 1
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    unknown = dispatch_consts - {p.name for p in fn.params if p.is_constexpr}
    if unknown:
        raise ValueError(f"{fn.__name__}: the compile matrix sets {sorted(unknown)}, which are not constexprs")
    return sig, consts, attrs


# ------------------------------------------------------------------------------------------------------
# compiling
# ------------------------------------------------------------------------------------------------------

_PTXAS_RE = dict(
    regs=re.compile(r"Used (\d+) registers"),
    spill_stores=re.compile(r"(\d+) bytes spill stores"),
    spill_loads=re.compile(r"(\d+) bytes spill loads"),
    stack=re.compile(r"(\d+) bytes stack frame"),
)


def parse_ptxas_log(log: str) -> Dict[str, Optional[int]]:
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.findall(log)
        out[key] = max(int(v) for v in m) if m else None
    return out


def _ptxas_path(cap: int) -> str:
    from triton.backends.nvidia import compiler as nv

    if hasattr(nv, "get_ptxas"):
        try:
            return nv.get_ptxas(cap).path
        except TypeError:
            return nv.get_ptxas().path
    from triton import knobs

    return knobs.nvidia.ptxas.path


def ptxas_version(cap: int = 90) -> str:
    out = subprocess.run([_ptxas_path(cap), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{m.group(1)} ({m.group(2)})" if m else out.strip().splitlines()[-1]


def _ptxas_v(ptx: str, cap: int) -> str:
    """``ptxas -v`` of a PTX module for the target (when the compile's own log was not captured)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([_ptxas_path(cap), "-v", f"--gpu-name={sm_arch_from_capability(cap)}", str(src),
                              "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True)
        return res.stdout + res.stderr


# Spills accepted on purpose: (kernel, constexprs it applies to, at most this many spill bytes, why); any
# other spill fails the budget.
ALLOWED_SPILLS: List[tuple] = [
    ("_sum_noise_scale_kernel", dict(HAS_NOISE=True), 8,
     "tl.randn's sin/cos: ptxas keeps a few bytes on the stack next to the 28-byte local array of the "
     "Payne-Hanek slow path of the argument reduction (at < 64 registers: not register pressure), a path "
     "Box-Muller's angles in [0, 2π) never take"),
]


def budget_problems(cap: int, shared: int, usage: Dict[str, Optional[int]], job: dict):
    """The budget violations of one compile: (problems, reason of an allowed spill or None). ``usage``: the
    ``ptxas -v`` figures (:func:`parse_ptxas_log`), ``job``: kernel and constexprs (for ``ALLOWED_SPILLS``)."""
    problems, allowed = [], None
    if usage.get("regs") is None:
        problems.append("no ptxas register report")
    if shared > SMEM_OPTIN[cap]:
        problems.append(f"shared memory {shared} B > {SMEM_OPTIN[cap]} B per block on {TARGET_NAMES[cap]}")
    spills = (usage.get("spill_stores") or 0) + (usage.get("spill_loads") or 0)
    if spills:
        for kernel, where, max_bytes, reason in ALLOWED_SPILLS:
            if (kernel == job["kernel"] and spills <= max_bytes
                    and all(job["constexprs"].get(k) == v for k, v in where.items())):
                allowed = reason
                break
        else:
            problems.append(f"register spills: {usage.get('spill_stores')} B stored, {usage.get('spill_loads')} B "
                            f"loaded ({usage.get('regs')} registers)")
    return problems, allowed


_MODS = None


def _worker_init():
    global _MODS
    _MODS = load_kernel_modules()


def compile_job(job: dict) -> dict:
    """Compile one job; the job dict extended by the outcome (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget

    global _MODS
    if _MODS is None:
        _MODS = load_kernel_modules()
    res = dict(job)
    res.pop("pointers")
    cap = job["target"]
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        fn = _kernel_fn(_MODS, job["kernel"])
        sig, consts, attrs = signature(fn, job)
        res["signature"] = ",".join(f"{v}:16" if (i,) in attrs and not v.startswith("*") else v
                                    for i, v in enumerate(sig.values()))
        target = GPUTarget("cuda", cap, 32)
        backend = triton.compiler.make_backend(target)
        opts = {k: v for k, v in (("num_warps", job["num_warps"]), ("num_stages", job["num_stages"]),
                                  ("maxnreg", job.get("maxnreg"))) if v is not None}
        options = backend.parse_options(opts)
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        # Triton prints its own `ptxas -v` log with TRITON_DUMP_PTXAS_LOG=1 (and the PTX when ptxas fails)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every failure is a result
        msg = f"{type(e).__name__}: {e}"
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        res.update(ok=False, error="\n".join(lines[:12]), compile_s=round(time.perf_counter() - t0, 2))
        return res
    md = kernel.metadata
    res["num_warps"], res["num_stages"] = md.num_warps, md.num_stages
    ptx_log = log.getvalue()
    usage = parse_ptxas_log(ptx_log)
    res["ptxas_log"] = "triton"
    if usage["regs"] is None:
        usage = parse_ptxas_log(_ptxas_v(kernel.asm["ptx"], cap))
        res["ptxas_log"] = "rerun"
    shared = int(md.shared)
    res.update(ok=True, shared=shared, **usage, compile_s=round(time.perf_counter() - t0, 2))
    problems, allowed = budget_problems(cap, shared, usage, res)
    if allowed:
        res["spills_allowed"] = allowed
    res["budget_ok"] = not problems
    if problems:
        res["problems"] = problems
    return res


def run_matrix(jobs: List[dict], processes: int) -> List[dict]:
    if processes <= 1 or len(jobs) <= 1:
        _worker_init()
        return [compile_job(j) for j in jobs]
    # longest first (the clipped sums) so the pool drains evenly; results back in job order
    order = sorted(range(len(jobs)), key=lambda i: jobs[i]["kernel"] != "_clipped_sum_kernel")
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes, initializer=_worker_init) as pool:
        done = pool.map(compile_job, [jobs[i] for i in order], chunksize=1)
    out = [None] * len(jobs)
    for i, r in zip(order, done):
        out[i] = r
    return out


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------


def _config_label(r: dict) -> str:
    blocks = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["config"].items())
    return f"{blocks} w{r['num_warps']}s{r['num_stages']}" + (f"r{r['maxnreg']}" if r.get("maxnreg") else "")


def summarize(results: List[dict]) -> List[dict]:
    """One row per (target, kernel, launch config, dtype): worst case over the constexpr/scalar variants."""
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        groups.setdefault((r["target"], r["kernel"], _config_label(r), r["dtype"]), []).append(r)
    rows = []
    for (target, kernel, config, dtype), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        rows.append(dict(
            target=target, kernel=kernel, config=config, dtype=dtype, variants=len(rs), compiled=len(ok),
            shared_max=max((r["shared"] for r in ok), default=None),
            regs_min=min((r["regs"] for r in ok if r["regs"] is not None), default=None),
            regs_max=max((r["regs"] for r in ok if r["regs"] is not None), default=None),
            spill_bytes_max=max(((r["spill_stores"] or 0) + (r["spill_loads"] or 0) for r in ok), default=None),
            stack_max=max((r["stack"] or 0 for r in ok), default=None),
            over_default_smem=sum(r["shared"] > SMEM_DEFAULT for r in ok),
            compile_s=round(sum(r["compile_s"] for r in rs), 1),
            budget_failures=sum(not r.get("budget_ok", False) for r in ok),
            spills_allowed=sorted({r["spills_allowed"] for r in ok if r.get("spills_allowed")}),
            passed=len(ok) == len(rs) and all(r.get("budget_ok", False) for r in ok),
        ))
    return rows


def render_markdown(doc: dict) -> str:
    lines = ["# Triton ahead-of-time compile matrix", "",
             "Generated by `bench/triton_aot.py` (run by `.ci/triton_aot`): every Triton kernel compiled for "
             "sm_80 and sm_90 without a GPU, at every launch configuration and every constexpr combination the "
             "dispatch produces (operand dtype fp32/bf16/fp16, conv/linear, bias, noise, split writing, dot "
             "precision, integer-argument specializations). One row per kernel, launch config and dtype: worst "
             "case over its variants. Budgets: shared memory per block ≤ "
             f"{SMEM_OPTIN[80]} B (sm_80, A100 opt-in) / {SMEM_OPTIN[90]} B (sm_90, H100/H200 opt-in) "
             f"(column ›48K: variants above the {SMEM_DEFAULT} B default, for which Triton opts in), no register "
             "spills (ptxas -v).", ""]
    for sec in doc["runs"]:
        env, tot = sec["environment"], sec["totals"]
        lines += [f"## triton {env['triton']}", "",
                  f"ptxas {env['ptxas']}, python {env['python']}: {tot['compiles']} compiles, {tot['failed']} failed, "
                  f"{tot['budget_failures']} over budget; {tot['wall_s']:.0f} s wall on {env['cpus']} CPU(s) "
                  f"({env['processes']} compile processes), scalars: {sec['scalars']}.", ""]
        notes: List[str] = []
        for target in sorted({r["target"] for r in sec["summary"]}):
            lines += [f"### {TARGET_NAMES[target]}", "",
                      "| kernel | config (tiles, warps, stages) | dtype | target | triton | variants | shared max (B) "
                      "| ›48K | registers | spill B | stack B | compile s | pass |",
                      "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for r in sec["summary"]:
                if r["target"] != target:
                    continue
                regs = "–" if r["regs_max"] is None else (
                    f"{r['regs_min']}–{r['regs_max']}" if r["regs_min"] != r["regs_max"] else str(r["regs_max"]))
                shared = "–" if r["shared_max"] is None else str(r["shared_max"])
                verdict = ("pass" if r["passed"] else
                           f"FAIL ({r['variants'] - r['compiled']} not compiled, {r['budget_failures']} over budget)")
                for reason in r.get("spills_allowed", []):
                    if reason not in notes:
                        notes.append(reason)
                    verdict += f" (allowed spill [{notes.index(reason) + 1}])"
                lines.append(f"| `{r['kernel']}` | {r['config']} | {r['dtype']} | sm_{target} | {env['triton']} "
                             f"| {r['variants']} | {shared} | {r['over_default_smem']} | {regs} "
                             f"| {r['spill_bytes_max']} | {r['stack_max']} | {r['compile_s']} | {verdict} |")
            lines.append("")
        if notes:
            lines += ["Allowed spills (bench/triton_aot.py `ALLOWED_SPILLS`):", ""]
            lines += [f"[{i + 1}] {reason}" for i, reason in enumerate(notes)] + [""]
        bad = [r for r in sec["results"] if not r["ok"] or not r.get("budget_ok", False)]
        if bad:
            lines += ["Failures:", ""]
            for r in bad[:40]:
                why = r.get("error") or "; ".join(r.get("problems", []))
                lines.append(f"- `{r['kernel']}` sm_{r['target']} {_config_label(r)} {r['dtype']} "
                             f"{r['constexprs']} ({r['scalars']}): {why.splitlines()[0] if why else ''}")
            if len(bad) > 40:
                lines.append(f"- … and {len(bad) - 40} more (see the JSON file)")
            lines.append("")
    return "\n".join(lines)


def update_json(path: Path, section: dict) -> dict:
    doc = {"runs": []}
    if path.exists():
        doc = json.loads(path.read_text())
    runs = [s for s in doc.get("runs", []) if s["environment"]["triton"] != section["environment"]["triton"]]
    runs.append(section)
    runs.sort(key=lambda s: [int(x) if x.isdigit() else x for x in re.split(r"[.+]", s["environment"]["triton"])])
    doc["runs"] = runs
    path.write_text(_dumps(doc))
    return doc


def _dumps(doc: dict) -> str:
    """The results file: indented, but one compact line per compile result (thousands of them)."""
    packed, lines = [], {}
    for i, sec in enumerate(doc["runs"]):
        key = f"@results{i}@"
        lines[key] = ",\n".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) for r in sec["results"])
        packed.append(dict(sec, results=key))
    text = json.dumps(dict(doc, runs=packed), indent=1, ensure_ascii=False)
    for key, body in lines.items():
        text = text.replace(f'"{key}"', "[\n" + body + "\n]")
    return text + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    ap.add_argument("--kernels", default="", help="kernel function names, comma-separated (default: all)")
    ap.add_argument("--dtypes", default="", help="operand dtypes, comma-separated (default: fp32,bf16,fp16)")
    ap.add_argument("--scalars", choices=("contiguous", "strided", "both"), default="both",
                    help="integer arguments as launched on contiguous operands, strided ones, or both")
    ap.add_argument("--config", default="", help="only launch configs whose label contains this, e.g. T=32,D=64,P=64")
    ap.add_argument("--where", action="append", default=[],
                    help="only variants with constexpr NAME=VALUE (repeatable), e.g. --where IS_CONV=True")
    ap.add_argument("--limit", type=int, default=0, help="compile only the first N jobs")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, help="results file to update (this triton version's section)")
    ap.add_argument("--md", type=Path, help="markdown rendering of the --json file")
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even when a compile fails or a budget is exceeded")
    ap.add_argument("--all-results", action="store_true",
                    help="keep every compile's result in the --json file (default: failures and spills only)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--list", action="store_true",
                    help="print the matrix (jobs per kernel, kernels without jobs) as one JSON line; compile nothing")
    args = ap.parse_args(argv)

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    # a fresh cache: a cache hit would skip ptxas and with it the register report
    cache = None
    if "TRITON_CACHE_DIR" not in os.environ:
        cache = tempfile.mkdtemp(prefix="triton_aot_cache_")
        os.environ["TRITON_CACHE_DIR"] = cache
    try:
        return _main(args)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def _main(args) -> int:
    import triton

    mods = load_kernel_modules()
    jobs = build_jobs(mods, tuple(int(t) for t in args.targets.split(",")), args.scalars)
    missing = uncovered_kernels(jobs)
    if args.list:
        counts: Dict[str, int] = {}
        for j in jobs:
            counts[j["kernel"]] = counts.get(j["kernel"], 0) + 1
        print(json.dumps(dict(jobs=len(jobs), jobs_per_kernel=counts, uncovered=missing,
                              targets=sorted({j["target"] for j in jobs}),
                              scalars=sorted({j["scalars"] for j in jobs}), triton=triton.__version__)))
        return 1 if missing else 0
    if missing:
        print(f"kernels with no compile job (add them to build_jobs): {missing}", file=sys.stderr)
        return 1
    if args.kernels:
        keep = set(args.kernels.split(","))
        jobs = [j for j in jobs if j["kernel"] in keep]
    if args.dtypes:
        keep = set(args.dtypes.split(","))
        jobs = [j for j in jobs if j["dtype"] in keep]
    if args.config:
        jobs = [j for j in jobs if args.config in _config_label(j)]
    for cond in args.where:
        name, _, value = cond.partition("=")
        jobs = [j for j in jobs if str(j["constexprs"].get(name)) == value]
    if args.limit:
        jobs = jobs[: args.limit]
    if not jobs:
        print("no compile job selected", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = run_matrix(jobs, args.processes)
    wall = time.perf_counter() - t0
    failed = [r for r in results if not r["ok"]]
    over = [r for r in results if r["ok"] and not r["budget_ok"]]
    section = dict(
        environment=dict(triton=triton.__version__, ptxas=ptxas_version(), python=platform.python_version(),
                         cpus=os.cpu_count(), processes=min(args.processes, len(jobs))),
        scalars=args.scalars, smem_optin=SMEM_OPTIN, smem_default=SMEM_DEFAULT,
        totals=dict(compiles=len(results), failed=len(failed), budget_failures=len(over), wall_s=round(wall, 1),
                    compile_s=round(sum(r["compile_s"] for r in results), 1)),
        summary=summarize(results),
        # per compile: every one with --all-results, else those that failed, broke a budget or spill (allowed)
        results_kept="all" if args.all_results else "failed, over budget or spilling",
        results=[r for r in results if args.all_results or not r["ok"] or not r["budget_ok"]
                 or r.get("spills_allowed")])
    doc = {"runs": [section]}
    if args.json:
        doc = update_json(args.json, section)
    if args.md:
        args.md.write_text(render_markdown(doc))
    if not args.quiet:
        print(render_markdown({"runs": [dict(section, results=failed + over)]}))
    print(f"triton {triton.__version__}: {len(results)} compiles in {wall:.0f} s, {len(failed)} failed, "
          f"{len(over)} over budget")
    return 1 if (failed or over) and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
