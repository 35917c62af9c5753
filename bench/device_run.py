"""Everything a lent GPU machine (H100/H200, a 15-minute lease) has to run, in one call of at most 9 minutes.

Stages, in order of value, each with its own time budget (seconds; ``--budget-scale`` scales them all):

====================  ======  ===========================================================================
stage                 budget  what
====================  ======  ===========================================================================
env                       10  versions, GPU, ``nvidia-smi``
wheels                    15  install the packages the machine lacks from the carried ``.device-wheels/``
build                     90  ``setup.py build_ext --inplace`` (CUDAExtension, for the GPU's own architecture)
tests                     85  the CUDA tests: tests/test_cuda_build.py, test_triton_kernels.py (fp32,
                              bf16, fp16 against fp64 references; whole DP-SGD/DP-SAT steps Triton vs
                              PyTorch), test_error_bounds.py
profile                   40  one ResNet-18-GN batch-256 fp32 step, non-private and DP-SGD, under
                              torch.profiler: GPU time per kernel category, host time, syncs, launches
micro                     15  the noise kernels (Triton and CUDA C++) over ResNet-18's parameter count
kernels                   50  ``bench/bench_kernels.py --device cuda --models resnet18 --batch 256``
tput_resnet18_fp32        40  ``bench/throughput.py``: ResNet-18-GN b256, fp32 ...
tput_resnet18_bf16        30  ... and ``--amp bf16``; providers nonprivate, dpsat_fast, dpsat_fast_sat,
                              opacus_hooks, opacus_ghost
distributed               25  ``bench/distributed_throughput.py --device cuda --world 1``: ResNet-18-GN b256,
                              one process against one rank of an NCCL group (see ``distributed_stage``)
tput_wrn16_4_fp32         25  WRN-16-4-GN b256
tput_wrn16_4_bf16         20
tput_resnet50_fp32        45  ResNet-50-GN b64 (224×224)
tput_resnet50_bf16        30
====================  ======  ===========================================================================

The budgets add up to 520 s. Stage k must end by the sum of the budgets of stages 1..k (time a stage leaves
unused goes to the later ones); a stage still running then is killed with its process group, marked ``cut``
and the run goes on, so the whole run ends within 9 minutes whatever happens. A stage whose prerequisite
failed (no extension built) is ``skipped``. At most 8 files go to ``$OUT`` (else ``--out``):
``device_run.json`` (stages, measured vs predicted), ``device_run.log`` (every stage's output),
``kernels_cuda.json``, ``throughput_cuda_fp32.json``, ``throughput_cuda_bf16.json``,
``distributed_cuda.json``.

At the end the measured times are printed next to the roofline predictions of docs/gpu.md, read from
``bench/gpu_predictions.json`` (regenerate it with ``--write-predictions``; the dry run checks it is current).

``--dry-run``: the same stages on CPU with tiny shapes and budgets (the tests a CPU subset, the build only
checked, the wheels only listed) plus a canary stage that must be cut; CI runs it (.ci/device_dry_run).

Usage (from the repository root)::

    python3 bench/fetch_device_wheels.py               # here: the wheels the GPU machine lacks -> .device-wheels/
    python3 bench/device_run.py                        # on the GPU machine (carry .device-wheels)
    python3 bench/device_run.py --dry-run --out /tmp/d # CPU
    python3 bench/device_run.py --write-predictions    # after changing the roofline model below
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PREDICTIONS = BENCH / "gpu_predictions.json"
WHEELS = ROOT / ".device-wheels"
MAX_OUT_FILES = 8
CUDA_TESTS = ["tests/test_cuda_build.py", "tests/test_triton_kernels.py", "tests/test_error_bounds.py"]
TPUT_PROVIDERS = ["nonprivate", "dpsat_fast", "dpsat_fast_sat", "opacus_hooks", "opacus_ghost"]
# import name -> distribution (wheel file prefix) of what the GPU machine may lack (scikit-learn is on its
# image, and no stage needs it: only dpsat_fast.train's digits data set imports it)
WHEEL_MODULES = {"opacus": "opacus", "dp_accounting": "dp_accounting", "tree": "dm_tree", "sklearn": "scikit_learn"}


# ======================================================================================================
# roofline model (docs/gpu.md): ResNet-18-GN, batch 256, 32x32, fp32, one DP-SGD step vs non-private
# ======================================================================================================

# Dense peaks (the datasheets quote tensor-core rates with 2:4 sparsity; halved here) and HBM bandwidth.
DEVICES: dict[str, dict[str, Any]] = {
    "H100-SXM": {"tf32_tflops": 494.7, "bf16_tflops": 989.4, "fp32_tflops": 66.9, "hbm_tb_s": 3.35,
                 "l2_mb": 50, "sms": 132,
                 "source": "NVIDIA H100 Tensor Core GPU datasheet, SXM5 column (TF32 989 / BF16 1979 TFLOP/s "
                           "with sparsity, 67 TFLOP/s FP32, 3.35 TB/s HBM3)"},
    "H200": {"tf32_tflops": 494.7, "bf16_tflops": 989.4, "fp32_tflops": 66.9, "hbm_tb_s": 4.8,
             "l2_mb": 50, "sms": 132,
             "source": "NVIDIA H200 Tensor Core GPU datasheet, SXM column (same compute as the H100 SXM, "
                       "4.8 TB/s HBM3e)"},
}
# What fraction of a peak each kind of kernel is expected to reach (the 'expected' column; the floor uses 1).
EFFICIENCY = {
    "cudnn_tc": 0.55,   # cuDNN convolutions (TF32 by default for fp32: torch.backends.cudnn.allow_tf32)
    "triton_tc": 0.35,  # Triton dots with implicit im2col loads (pointer gathers, no TMA), tf32x3 splits
    "hbm": 0.80,        # streaming elementwise / reductions (a device copy reaches ~0.9)
    "alu": 0.50,        # Philox + Box-Muller integer/fp32 instructions
}
TF32X3_PASSES = 3         # fp32 operands: three TF32 products per dot (dpsat_fast.ops.triton._common.dot_precision)
PHILOX_OPS = 150          # instructions per noise element: 10 Philox rounds + Box-Muller (log, cos, sqrt)
HOST_US_PER_OP = 6.0      # host time per dispatched PyTorch op / Triton launch (Python + dispatcher + launch)
HOST_OPS = {"nonprivate": 396, "dpsat_fast": 1767}  # per step; counted on CPU by stage_profile (B=2)
SYNCS_PER_STEP = {"nonprivate": 0, "dpsat_fast": 22}  # bool(loose.any()) per conv/linear, finite.all()
TILE = 64                 # BLOCK_D = BLOCK_P of the instantiate kernel's likely config (re-read model)
MIN_TILE = 32             # smallest BLOCK_* of the GPU configs (the clipped sum's split count)


def _model_shapes(model_name: str, batch: int) -> dict[str, list[dict[str, Any]]]:
    """Shapes of every Conv2d/Linear, GroupNorm, ReLU and residual add of one forward, on the meta device."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from dpsat_fast.models import INPUT_SHAPES, build_model

    with torch.device("meta"):
        net = build_model(model_name)
    out: dict[str, list[dict[str, Any]]] = {"conv": [], "gn": [], "relu": [], "add": []}

    def hook(name, module, inputs, output):
        x = inputs[0]
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            out["conv"].append({"name": name, "x": list(x.shape), "y": list(output.shape),
                                "weight": list(module.weight.shape), "groups": getattr(module, "groups", 1),
                                "first": not out["conv"]})
        elif isinstance(module, nn.GroupNorm):
            out["gn"].append({"name": name, "n": output.numel(), "C": output.shape[1]})
        elif isinstance(module, nn.ReLU):
            out["relu"].append({"name": name, "n": output.numel()})
        elif hasattr(module, "shortcut"):  # a residual block ends with out + shortcut(x)
            out["add"].append({"name": name, "n": output.numel()})

    handles = [m.register_forward_hook(lambda mod, i, o, name=n: hook(name, mod, i, o))
               for n, m in net.named_modules()]
    net(torch.empty(batch, *INPUT_SHAPES[model_name], device="meta"))
    for h in handles:
        h.remove()
    return out


def _geometry(conv: dict[str, Any]) -> tuple[int, int, int, int, int, int, int]:
    """(B, T, D, P, G, elements of x, elements of y)."""
    x, y, w, G = conv["x"], conv["y"], conv["weight"], conv["groups"]
    B = x[0]
    if len(w) == 2:  # Linear on [B, D]
        return B, 1, w[1], w[0], 1, math.prod(x), math.prod(y)
    T = math.prod(y[2:])
    return B, T, math.prod(w[1:]), w[0] // G, G, math.prod(x), math.prod(y)


def _time(flops: float, bytes_: float, dev: dict[str, Any], unit: str, eff: bool) -> float:
    """ms of a kernel: max(compute, memory), at the peaks (eff False) or at the expected fractions."""
    rate = {"tc_cudnn": dev["tf32_tflops"] * 1e12 * (EFFICIENCY["cudnn_tc"] if eff else 1),
            "tc_triton": dev["tf32_tflops"] * 1e12 * (EFFICIENCY["triton_tc"] if eff else 1),
            "alu": dev["fp32_tflops"] / 2 * 1e12 * (EFFICIENCY["alu"] if eff else 1),
            "none": math.inf}[unit]
    bw = dev["hbm_tb_s"] * 1e12 * (EFFICIENCY["hbm"] if eff else 1)
    return 1e3 * max(flops / rate, bytes_ / bw)


def roofline(model_name: str = "resnet18_gn", batch: int = 256) -> dict[str, Any]:
    """Per-category FLOPs, bytes and times of one fp32 step (non-private and DP-SGD) on each device."""
    shapes = _model_shapes(model_name, batch)
    F4 = 4  # fp32 bytes
    # kernel rows: (category, step (np/dp/both), unit, flops, bytes, detail)
    rows: list[tuple[str, str, str, float, float, str]] = []
    n_params = 0
    for conv in shapes["conv"]:
        B, T, D, P, G, nx, ny = _geometry(conv)
        n_params += G * P * D + (P * G if len(conv["weight"]) == 2 else 0)
        f = 2.0 * B * T * D * P * G
        name = conv["name"]
        rows.append(("forward convs", "both", "tc_cudnn", f, F4 * (nx + ny), name))
        if not conv["first"]:
            rows.append(("input-gradient convs", "both", "tc_cudnn", f, F4 * (nx + ny), name))
        rows.append(("weight-gradient convs", "np", "tc_cudnn", f, F4 * (nx + ny), name))
        # per-example squared norms: the cheaper route on the device (the library measures both once)
        inst = (TF32X3_PASSES * f, F4 * (nx * math.ceil(P / TILE) + ny * math.ceil(D / TILE)))
        ghost = (TF32X3_PASSES * 2.0 * B * G * T * T * (D + P), F4 * (nx + ny))
        pick = "ghost" if T == 1 or _time(*ghost, DEVICES["H100-SXM"], "tc_triton", True) < \
            _time(*inst, DEVICES["H100-SXM"], "tc_triton", True) else "instantiate"
        rows.append((f"{pick} norms", "dp", "tc_triton", *(ghost if pick == "ghost" else inst), name))
        # certified-norm bound S_i = sum_t |a_t||g_t|: fp64 copies, squares and sums of x and g (36 B/element)
        rows.append(("norm certificates", "dp", "none", 0.0, 36.0 * (nx + ny), name))
        n_tiles = G * math.ceil(P / MIN_TILE) * math.ceil(D / MIN_TILE)
        splits = max(1, min(math.ceil(4 * DEVICES["H100-SXM"]["sms"] / n_tiles), (B * T) // 256))
        partials = F4 * G * P * D * (2 * splits if splits > 1 else 0)
        rows.append(("clipped sums", "dp", "tc_triton", TF32X3_PASSES * f, F4 * (nx + ny) + partials, name))
    for gn in shapes["gn"]:
        n = gn["n"]
        rows.append(("GroupNorm (native)", "np", "none", 0.0, F4 * 8 * n, gn["name"]))
        rows.append(("GroupNorm (normalize, no affine)", "dp", "none", 0.0, F4 * 8 * n, gn["name"]))
        # the DP affine part: x̂·w + b (2 passes), grad·w (1 pass), per-example grads kernel (reads x̂, g)
        rows.append(("norm layers", "dp", "none", 0.0, F4 * (4 * n + 2 * n + 2 * n), gn["name"]))
        n_params += 2 * gn["C"]
    for r in shapes["relu"]:
        rows.append(("ReLU, residual adds", "both", "none", 0.0, F4 * 5 * r["n"], r["name"]))
    for a in shapes["add"]:
        rows.append(("ReLU, residual adds", "both", "none", 0.0, F4 * 6 * a["n"], a["name"]))
    rows.append(("optimizer (SGD momentum)", "np", "none", 0.0, 20.0 * n_params, "foreach"))
    rows.append(("optimizer (1/B scale + SGD momentum)", "dp", "none", 0.0, 28.0 * n_params, "foreach"))
    rows.append(("noise", "dp", "alu", float(PHILOX_OPS * n_params), F4 * n_params, "Philox per weight"))

    result: dict[str, Any] = {
        "model": model_name, "batch": batch, "dtype": "float32", "n_params": n_params,
        "assumptions": {"efficiency": EFFICIENCY, "tf32x3_passes": TF32X3_PASSES, "philox_ops": PHILOX_OPS,
                        "host_us_per_op": HOST_US_PER_OP, "host_ops_per_step": HOST_OPS,
                        "syncs_per_step": SYNCS_PER_STEP, "instantiate_tile": TILE},
        "devices": {},
    }
    for dev_name, dev in DEVICES.items():
        cats: dict[str, dict[str, Any]] = {}
        for cat, step, unit, flops, bytes_, _ in rows:
            c = cats.setdefault(cat, {"step": step, "unit": unit, "gflop": 0.0, "gbytes": 0.0,
                                      "floor_ms": 0.0, "expected_ms": 0.0, "kernels": 0})
            c["gflop"] += flops / 1e9
            c["gbytes"] += bytes_ / 1e9
            c["floor_ms"] += _time(flops, bytes_, dev, unit, False)
            c["expected_ms"] += _time(flops, bytes_, dev, unit, True)
            c["kernels"] += 1
        # the DP kernels layer by layer (what bench_kernels.py times in isolation): expected ms
        layers: dict[str, dict[str, float]] = {}
        for cat, step, unit, flops, bytes_, detail in rows:
            if cat in ("instantiate norms", "ghost norms", "clipped sums", "norm certificates"):
                layers.setdefault(detail, {})[cat] = round(_time(flops, bytes_, dev, unit, True), 4)
        for c in cats.values():
            for k in ("gflop", "gbytes", "floor_ms", "expected_ms"):
                c[k] = round(c[k], 4)
        keys = ("floor_ms", "expected_ms")
        np_ms = {k: sum(c[k] for c in cats.values() if c["step"] in ("np", "both")) for k in keys}
        dp_ms = {k: sum(c[k] for c in cats.values() if c["step"] in ("dp", "both")) for k in keys}
        host = {p: HOST_OPS[p] * HOST_US_PER_OP / 1e3 for p in HOST_OPS}
        bw = dev["hbm_tb_s"] * 1e12 * EFFICIENCY["hbm"]
        result["devices"][dev_name] = {
            "peaks": {k: dev[k] for k in ("tf32_tflops", "bf16_tflops", "fp32_tflops", "hbm_tb_s")},
            "source": dev["source"],
            "categories": cats,
            "layers_expected_ms": layers,
            "nonprivate_gpu_ms": {k: round(v, 3) for k, v in np_ms.items()},
            "dpsat_fast_gpu_ms": {k: round(v, 3) for k, v in dp_ms.items()},
            "ratio_gpu_bound": {k: round(dp_ms[k] / np_ms[k], 3) for k in np_ms},
            "host_ms": {p: round(v, 2) for p, v in host.items()},
            # the step can run no faster than its GPU work nor than its host work (perfect overlap)
            "ratio_expected": round(max(dp_ms["expected_ms"], host["dpsat_fast"])
                                    / max(np_ms["expected_ms"], host["nonprivate"]), 3),
            # each sync drains the queue: at worst the DP step's host work does not overlap its GPU work at all
            "ratio_no_overlap": round((dp_ms["expected_ms"] + host["dpsat_fast"])
                                      / max(np_ms["expected_ms"], host["nonprivate"]), 3),
            # the distributed release on one rank (bench/distributed_throughput.py --world 1): the bucketed
            # all-reduce (cat, NCCL's copy, copy back: 24 B/parameter) and the noise pass no longer fused into
            # the clipped sums (read and write the sum again: 8 B/parameter)
            "distributed_world1": {"allreduce_ms": round(1e3 * 24 * n_params / bw, 4),
                                   "overhead_ms": round(1e3 * 32 * n_params / bw, 4)},
        }
    return result


def write_predictions(path: Path = PREDICTIONS) -> dict[str, Any]:
    pred = roofline()
    path.write_text(json.dumps(pred, indent=1, sort_keys=True) + "\n")
    return pred


def format_predictions(pred: dict[str, Any]) -> str:
    lines = []
    for dev_name, d in pred["devices"].items():
        lines.append(f"{dev_name}: {d['source']}")
        lines.append(f"  {'category':<34} {'step':<5} {'GFLOP':>8} {'GB':>7} {'floor ms':>9} {'exp. ms':>8}")
        for cat, c in d["categories"].items():
            lines.append(f"  {cat:<34} {c['step']:<5} {c['gflop']:>8.1f} {c['gbytes']:>7.2f} "
                         f"{c['floor_ms']:>9.3f} {c['expected_ms']:>8.3f}")
        lines.append(f"  non-private GPU {d['nonprivate_gpu_ms']}, DP-SGD GPU {d['dpsat_fast_gpu_ms']}, ratio "
                     f"{d['ratio_gpu_bound']}; host {d['host_ms']}; expected ratio {d['ratio_expected']} "
                     f"(no host/GPU overlap: {d['ratio_no_overlap']}); distributed, world 1: "
                     f"{d['distributed_world1']}")
    return "\n".join(lines)


# ======================================================================================================
# stages
# ======================================================================================================


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: float
    command: list[str] | None = None        # a subprocess (killed with its group when out of time)
    env: dict[str, str] | None = None
    needs_build: bool = False
    strict: bool = False                     # timeout = own budget (no time carried over from earlier stages)
    note: str = ""
    result: dict[str, Any] = dataclasses.field(default_factory=dict)


class Runner:
    def __init__(self, args: argparse.Namespace, out: Path, work: Path):
        self.args, self.out, self.work = args, out, work
        self.log_path = out / "device_run.log"
        self.log = open(self.log_path, "a+", buffering=1)
        self.log.truncate(0)
        self.t0 = time.monotonic()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.built = False

    def say(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def run_command(self, stage: Stage, timeout: float) -> dict[str, Any]:
        """Run the stage's command in its own process group, its output appended to the log in $OUT (so the
        log is current even if the whole call is killed); kill the group at ``timeout``. No pipe: a child
        that stops mid-line cannot block the runner past the deadline."""
        env = dict(self.env, **(stage.env or {}))
        self.log.write(f"\n===== {stage.name}: {' '.join(stage.command)}\n")
        self.log.flush()
        offset = self.log.tell()
        start = time.monotonic()
        with open(self.log_path, "a") as sink:
            proc = subprocess.Popen(stage.command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            cut = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                cut = True
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=3)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                proc.wait()
        seconds = time.monotonic() - start
        self.log.seek(0, os.SEEK_END)
        with open(self.log_path, errors="replace") as f:
            f.seek(offset)
            tail = f.read().splitlines()[-400:]
        if cut:
            self.log.write(f"===== {stage.name}: CUT after {seconds:.1f}s (budget exhausted)\n")
        return {"rc": proc.returncode, "cut": cut, "seconds": round(seconds, 2), "tail": tail}

    def run(self, stages: list[Stage]) -> list[dict[str, Any]]:
        deadline = 0.0
        for stage in stages:
            deadline += stage.budget_s * self.args.budget_scale
            now = time.monotonic() - self.t0
            timeout = min(deadline - now, stage.budget_s * self.args.budget_scale) if stage.strict else deadline - now
            res: dict[str, Any] = {"stage": stage.name, "budget_s": round(stage.budget_s * self.args.budget_scale, 1),
                                   "deadline_s": round(deadline, 1), "started_s": round(now, 1)}
            if stage.needs_build and not self.built:
                res.update(status="skipped", why="the extension was not built")
            elif timeout < 1.0:
                res.update(status="cut", why="no time left before its deadline", seconds=0.0)
            elif stage.command is None:
                res.update(status="skipped", why=stage.note or "nothing to run")
            else:
                self.say(f"{stage.name}: start (until {deadline:.0f}s, {timeout:.0f}s available)")
                r = self.run_command(stage, timeout)
                res.update(seconds=r["seconds"], rc=r["rc"])
                res["status"] = "cut" if r["cut"] else ("ok" if r["rc"] == 0 else "failed")
                stage.result = r
                for line in r["tail"][-6:]:
                    self.say(f"  | {line[:150]}")
            if stage.note and "why" not in res:
                res["note"] = stage.note
            self.say(f"{stage.name}: {res['status']}" + (f" in {res['seconds']:.1f}s" if "seconds" in res else "")
                     + (f" ({res['why']})" if "why" in res else ""))
            if stage.name == "build":
                self.built = res["status"] == "ok"
            res["end_s"] = round(time.monotonic() - self.t0, 1)
            stage.result["summary"] = res
        return [s.result["summary"] for s in stages]


def _python() -> str:
    return sys.executable


def _cuda_home() -> dict[str, str]:
    """CUDA_HOME for setup.py when torch would guess it wrong (nvcc on PATH outside the toolkit)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return {}
    for root in ("/usr/local/cuda",):
        if Path(root, "include", "cuda_runtime.h").exists():
            return {"CUDA_HOME": root}
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                                 capture_output=True, text=True, timeout=30).stderr
            m = re.search(r"^#\$ _HERE_=(.*)$", out, re.M)
            if m:
                return {"CUDA_HOME": str(Path(m.group(1)).parent)}
        except (OSError, subprocess.SubprocessError):
            pass
    return {}


def build_stages(args: argparse.Namespace, out: Path, work: Path) -> list[Stage]:
    py = _python()
    dry = args.dry_run
    dev = "cpu" if dry else "cuda"
    me = str(Path(__file__).resolve())
    stages = [Stage("env", 10, [py, me, "--stage", "env", "--work", str(work)] + (["--dry-run"] if dry else []))]

    # wheels: install what is missing into work/site (PYTHONPATH of every later stage)
    if not WHEELS.is_dir() or not list(WHEELS.glob("*.whl")):
        stages.append(Stage("wheels", 15, None, note="no .device-wheels/ carried"))
    else:
        stages.append(Stage("wheels", 15, [py, me, "--stage", "wheels", "--work", str(work)]
                            + (["--dry-run"] if dry else [])))

    if dry:
        stages.append(Stage("build", 90, [py, "-c", "import dpsat_fast.ops as o; assert o.EXTENSION_AVAILABLE, "
                                           "o._ext.load_error; print('dry run: extension already built, not rebuilt')"],
                            note="dry run: checks the built extension (GPU: setup.py build_ext --inplace)"))
    else:
        # only the GPU's own architecture (setup.py's default, 8.0;9.0+PTX, compiles the kernels twice)
        stages.append(Stage("build", 90, [py, "setup.py", "-q", "build_ext", "--inplace"],
                            env={"MAX_JOBS": str(os.cpu_count() or 8), "TORCH_CUDA_ARCH_LIST": _gpu_arch(),
                                 **_cuda_home()}))

    tests = ([py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "tests/test_cuda_build.py",
              "-k", "not compiles",
              "tests/test_triton_kernels.py::test_noise_kernel_matches_reference_and_cpu_kernel"]
             if dry else [py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *CUDA_TESTS])
    if not dry and _has_module("xdist"):
        tests += ["-n", "8"]
    if _has_module("pytest_timeout"):
        tests += ["--timeout", "60" if dry else "120"]
    stages.append(Stage("tests", 85, tests, needs_build=True))

    # the dry run: a tiny model (digits_cnn, 8x8 inputs) wherever the GPU run times a real one
    stages.append(Stage("profile", 40, [py, me, "--stage", "profile", "--work", str(work),
                                        "--model", "digits_cnn" if dry else "resnet18_gn",
                                        "--batch", "4" if dry else "256"]
                        + (["--dry-run"] if dry else []), needs_build=True))
    stages.append(Stage("micro", 15, [py, me, "--stage", "micro", "--work", str(work)]
                        + (["--dry-run"] if dry else []), needs_build=True))
    kern = [py, "bench/bench_kernels.py", "--device", dev, "--models", "resnet18",
            "--providers", "dpsat_fast", "pytorch_ops", "materialized", "--out", str(out / "kernels_cuda.json")]
    kern += (["--batch", "2", "--max-layers", "2", "--cpu-rounds", "1", "--cpu-block-s", "0.01"] if dry else
             ["--batch", "256", "--cuda-rep-ms", "40", "--cuda-warmup-ms", "10"])
    stages.append(Stage("kernels", 50, kern, needs_build=True))

    runs = [("resnet18", "resnet18_gn", 256, 40, 30), ("wrn16_4", "wrn16_4_gn", 256, 25, 20),
            ("resnet50", "resnet50_gn", 64, 45, 30)]
    order = [(r, amp) for r in runs[:1] for amp in ("fp32", "bf16")] + \
            [(r, amp) for r in runs[1:] for amp in ("fp32", "bf16")]
    for (short, model, b, b32, b16), amp in order:
        cmd = [py, "bench/throughput.py", "--device", dev, "--models", "digits_cnn" if dry else model, "--batch-sizes",
               str(4 if dry else b), "--providers", *TPUT_PROVIDERS, "--amp", "none" if amp == "fp32" else "bf16",
               "--warmup", "1" if dry else "2", "--iters", "1" if dry else "10", "--isolation", "inprocess",
               "--out", str(work / f"tput_{short}_{amp}.json")]
        stages.append(Stage(f"tput_{short}_{amp}", b32 if amp == "fp32" else b16, cmd, needs_build=True))
        if short == "resnet18" and amp == "bf16":
            stages.append(distributed_stage(py, dry, out))
    if dry:  # the cut must work: a stage that would sleep for a minute, with 2 s
        stages.append(Stage("canary", 2, [py, "-c", "import time; print('canary sleeps', flush=True); "
                                          "time.sleep(60)"], strict=True))
    return stages


def distributed_stage(py: str, dry: bool, out: Path) -> Stage:
    """Issue 14's data-parallel benchmark on the one GPU: ResNet-18-GN, global batch 256, DP-SGD, the plain
    single process against one rank of an NCCL process group of size 1 (``--world 1``), which takes the whole
    distributed release: the noise key broadcast from rank 0, the ranks' agreement before each release, the
    clipped sums all-reduced in 64 MiB buckets (on NCCL, through the GPU), the noise added after the
    all-reduce instead of fused into the clipped sums. The difference of the two step times is that path's
    cost on a GPU; ``allreduce_ms`` times the bucketed all-reduce of ResNet-18's 11.2 M parameters to
    completion (predicted: ``distributed_world1`` in bench/gpu_predictions.json).

    Two ranks on this one GPU are not run: NCCL refuses two ranks on one device ("Duplicate GPU detected"),
    gloo would move CUDA tensors through host memory, and two processes sharing one GPU measure contention,
    not data-parallel scaling. The scaling over NVLink needs a machine of several GPUs (``--world 8``).
    The dry run: the same command on CPU over gloo, digits_cnn, batch 8."""
    cmd = [py, "bench/distributed_throughput.py", "--device", "cpu" if dry else "cuda", "--world", "1",
           "--model", "digits_cnn" if dry else "resnet18_gn", "--batch-size", "8" if dry else "256",
           "--warmup", "1" if dry else "3", "--iters", "2" if dry else "10", "--threads", "1",
           "--out", str(out / "distributed_cuda.json")]
    return Stage("distributed", 25, cmd, needs_build=True)


def _gpu_arch() -> str:
    """The visible GPU's compute capability as TORCH_CUDA_ARCH_LIST wants it ("9.0"); Hopper's if unknown."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        if out and re.fullmatch(r"\d+\.\d+", out[0]):
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "9.0"


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def dry_run_budgets(stages: list[Stage]) -> None:
    """Tiny budgets for the CPU dry run: what each stage needs on 2 cores, with room for a loaded machine."""
    budgets = {"env": 20, "wheels": 20, "build": 30, "tests": 60, "profile": 30, "micro": 15, "kernels": 45,
               "tput_resnet18_fp32": 30, "tput_resnet18_bf16": 30, "distributed": 40, "tput_wrn16_4_fp32": 30,
               "tput_wrn16_4_bf16": 30, "tput_resnet50_fp32": 30, "tput_resnet50_bf16": 30, "canary": 2}
    for s in stages:
        s.budget_s = budgets.get(s.name, s.budget_s)


# ------------------------------------------------------------------------------------------------------
# in-process stage bodies (each run as a subprocess of the runner, so that it can be cut)
# ------------------------------------------------------------------------------------------------------


def stage_env(args: argparse.Namespace) -> None:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), capability=list(torch.cuda.get_device_capability(0)))
        try:
            info["l2_mb"] = round(p.L2_cache_size / 2**20, 1)
        except AttributeError:
            pass
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,"
                            "temperature.gpu", "--format=csv"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = q.stdout.strip()
    nvcc = shutil.which("nvcc")
    if nvcc:
        info["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                      timeout=20).stdout.strip().splitlines()[-1]
    info["cuda_home_for_build"] = _cuda_home().get("CUDA_HOME", os.environ.get("CUDA_HOME"))
    (Path(args.work) / "env.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def stage_wheels(args: argparse.Namespace) -> None:
    import importlib.util
    import zipfile

    wheels = sorted(WHEELS.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} carried wheels, {total / 2**20:.1f} MiB: " + ", ".join(w.name for w in wheels))
    for w in wheels:
        with zipfile.ZipFile(w) as z:  # a broken transfer shows here
            assert any(n.endswith("METADATA") for n in z.namelist()), w
    missing = [(mod, dist) for mod, dist in WHEEL_MODULES.items() if importlib.util.find_spec(mod) is None]
    print("missing here:", [m for m, _ in missing] or "none")
    chosen = [w for w in wheels if any(w.name.lower().startswith(d.lower() + "-") for _, d in missing)]
    if args.dry_run:
        print("dry run: would install", [w.name for w in chosen] or "nothing", "into", Path(args.work) / "site")
        return
    if chosen:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(Path(args.work) / "site"), *map(str, chosen)], check=True)
    still = [m for m, _ in missing if subprocess.run(
        [sys.executable, "-c", f"import {m}"], env=dict(os.environ, PYTHONPATH=_pythonpath(Path(args.work))),
        capture_output=True).returncode != 0]
    print("installed:", [w.name for w in chosen], "; still missing:", still or "none")


def _pythonpath(work: Path) -> str:
    return os.pathsep.join(filter(None, [str(ROOT), str(work / "site"), os.environ.get("PYTHONPATH")]))


CATEGORIES = [  # (category, regex on the GPU kernel name), first match wins
    ("ghost norms", r"_ghost_sq_norms_kernel"),
    ("instantiate norms", r"_instantiate_sq_norms_kernel"),
    ("clipped sums", r"_clipped_sum_kernel"),
    ("noise", r"_sum_noise_scale_kernel|add_noise_and_scale|philox"),
    ("norm layers", r"_affine_grads_kernel|_per_example_clipped_sum_kernel"),
    ("convs (cuDNN/cuBLAS)", r"conv|xmma|cutlass|gemm|sm\d+_|cudnn|implicit|wgrad|dgrad|fprop"),
    ("GroupNorm", r"group_norm|GroupNorm|RowwiseMoments|ComputeFused|Welford"),
    ("optimizer", r"foreach|multi_tensor"),
    ("memcpy/memset", r"Memcpy|Memset|memcpy|memset"),
]


def classify(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return "other elementwise/reductions"


def stage_profile(args: argparse.Namespace) -> None:
    """One step of each provider under torch.profiler: GPU time per kernel category, host time, syncs."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(BENCH))
    import throughput as tp

    dev = torch.device("cpu" if args.dry_run else "cuda")
    result: dict[str, Any] = {"model": args.model, "batch": args.batch, "device": dev.type, "providers": {}}
    regions = _annotate_library()
    for name in ("nonprivate", "dpsat_fast"):
        model, x, y = tp.make_inputs(args.model, args.batch, dev, 0)
        prov = tp.PROVIDERS[name](model, x, y, tp.StepConfig())
        t = time.perf_counter()
        prov.step()  # compile and autotune (Triton), cuDNN heuristics
        tp._synchronize(dev)
        first_s = time.perf_counter() - t
        for _ in range(2):
            prov.step()
        tp._synchronize(dev)
        walls = []
        for _ in range(5):
            t = time.perf_counter()
            prov.step()
            tp._synchronize(dev)
            walls.append((time.perf_counter() - t) * 1e3)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        steps = 2
        with profile(activities=acts) as prof:
            for _ in range(steps):
                prov.step()
            tp._synchronize(dev)
        cats: dict[str, float] = {}
        kernels: dict[str, float] = {}
        spans: dict[str, float] = {}
        launches = syncs = host_ops = 0
        for e in prof.events():
            dt = getattr(e, "device_type", None)
            on_device = dt is not None and "CUDA" in str(dt)
            if on_device and getattr(e, "is_user_annotation", False):
                continue  # the GPU-side span of a record_function range, not a kernel
            if e.name in regions and not on_device:  # GPU time of the kernels launched inside (CPU run: CPU time)
                us = e.device_time_total if dev.type == "cuda" else e.cpu_time_total
                spans[e.name] = spans.get(e.name, 0.0) + us / 1e3 / steps
                continue
            if dev.type == "cuda" and on_device:
                us = e.time_range.elapsed_us()
                cats[classify(e.name)] = cats.get(classify(e.name), 0.0) + us / 1e3 / steps
                kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + us / 1e3 / steps
            elif e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"):
                launches += 1
            elif e.name == "cudaStreamSynchronize":  # .item()/bool() of a CUDA tensor
                syncs += 1
            elif (e.name.startswith("aten::") or e.name.startswith("dpsat_fast::")) and (
                    e.cpu_parent is None or not e.cpu_parent.name.startswith(("aten::", "dpsat_fast::"))):
                host_ops += 1
        if dev.type == "cpu":  # no device timeline: the ops' own CPU time per category, for the wiring
            for e in prof.key_averages():
                if e.key.startswith("dpsat_fast::") or e.key.startswith("aten::conv"):
                    cats[e.key] = cats.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / steps
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
        result["providers"][name] = {
            "first_step_s": round(first_s, 2), "step_ms_wall": round(statistics.median(walls), 3),
            "gpu_ms_by_category": {k: round(v, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "gpu_ms_total": round(sum(cats.values()), 3) if dev.type == "cuda" else None,
            "regions_ms": {k: round(v, 4) for k, v in spans.items()},
            "kernel_launches_per_step": launches / steps, "syncs_per_step": syncs / steps,
            "host_ops_per_step": host_ops / steps, "top_kernels_ms": dict(top)}
        prov.close()
        del prov, model, x, y
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(name, json.dumps(result["providers"][name], indent=1), flush=True)
        (Path(args.work) / "profile.json").write_text(json.dumps(result, indent=1))


def _annotate_library() -> set[str]:
    """Wrap the library's post-backward phases in ``record_function`` ranges (this process only), so the
    profile attributes their kernels: the certified-norm bounds are plain PyTorch ops without kernel names
    of their own."""
    import functools

    import torch

    sys.path.insert(0, str(ROOT))
    from dpsat_fast import engine
    from dpsat_fast.layers import bounds

    def wrap(owner, attr, label):
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*a, **k):
            with torch.profiler.record_function(label):
                return fn(*a, **k)

        setattr(owner, attr, wrapped)
        return label

    return {wrap(bounds, "conv_position_products", "dp::norm_certificates"),
            wrap(bounds, "linear_position_products", "dp::norm_certificates"),
            wrap(bounds, "certified_norms", "dp::norm_certificates"),
            wrap(engine.BookKeepingEngine, "_sq_norms", "dp::all_sq_norms"),
            wrap(engine.BookKeepingEngine, "_clip_and_accumulate", "dp::clip_and_accumulate"),
            wrap(engine.BookKeepingEngine, "_finish_backward", "dp::post_backward")}


def stage_micro(args: argparse.Namespace) -> None:
    """The noise kernels over a ResNet-18-sized tensor: Triton, the CUDA C++ kernels, and the bits agree."""
    import torch

    sys.path.insert(0, str(ROOT))
    from dpsat_fast import ops
    from dpsat_fast.ops import reference

    dev = torch.device("cpu" if args.dry_run else "cuda")
    from dpsat_fast.models import build_model

    with torch.device("meta"):
        n = sum(p.numel() for p in build_model("resnet18_gn").parameters())  # the noise of one ResNet-18 step
    n = 100_000 if args.dry_run else n
    res: dict[str, Any] = {"numel": n, "device": dev.type}
    grad = torch.randn(n, device=dev)

    def bench(fn) -> float:
        if dev.type == "cuda":
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    for backend in ("auto", "torch"):  # auto: Triton on CUDA; torch: the CUDA C++ kernels (C++ on CPU)
        with ops.kernel_backend_as(backend):
            g = grad.clone()
            ms = bench(lambda: ops.add_noise_and_scale_(g, 5, 0, 1.0, 1.0))
            check = grad[:4096].clone()
            ops.add_noise_and_scale_(check, 5, 0, 1.0, 1.0)
        ref = grad[:4096].cpu().clone()
        reference.add_noise_and_scale_ref(ref, 5, 0, 1.0, 1.0)
        err = float((check.cpu() - ref).abs().max())
        res[f"add_noise_and_scale_{backend}"] = {"ms": ms, "gb_per_s": 8 * n / ms / 1e6, "max_abs_err_vs_ref": err}
        print(backend, res[f"add_noise_and_scale_{backend}"], flush=True)
    (Path(args.work) / "micro.json").write_text(json.dumps(res, indent=1))


# ------------------------------------------------------------------------------------------------------
# results: merge, measured vs predicted
# ------------------------------------------------------------------------------------------------------


def merge_throughput(work: Path, out: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for amp in ("fp32", "bf16"):
        rows, metas = [], []
        for f in sorted(work.glob(f"tput_*_{amp}.json")):
            data = json.loads(f.read_text())
            rows += data["rows"]
            metas.append(data["metadata"])
        if rows:
            (out / f"throughput_cuda_{amp}.json").write_text(
                json.dumps({"metadata": metas[0] | {"runs": [m["command"] for m in metas]}, "rows": rows},
                           indent=1) + "\n")
            merged[amp] = rows
    return merged


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def compare(pred: dict[str, Any], env: dict[str, Any], profile_: Any, kernels: Any, tput: dict[str, Any],
            micro: Any, dry: bool, distributed: Any = None) -> tuple[list[dict[str, Any]], str]:
    """Rows of (quantity, predicted, measured) for the device; and the name of the prediction used."""
    gpu = (env or {}).get("gpu") or ""
    dev_name = "H200" if "H200" in gpu else "H100-SXM"
    d = pred["devices"][dev_name]
    rows: list[dict[str, Any]] = []

    def add(q, p, m, unit="ms"):
        rows.append({"quantity": q, "predicted": p, "measured": m, "unit": unit,
                     "measured/predicted": (round(m / p, 2) if isinstance(m, (int, float)) and p else None)})

    prof = (profile_ or {}).get("providers", {})
    dp = prof.get("dpsat_fast", {}).get("gpu_ms_by_category", {})
    npv = prof.get("nonprivate", {})
    cats = d["categories"]
    for cat in ("ghost norms", "instantiate norms", "clipped sums", "norm layers"):
        add(f"{cat} (GPU ms/step, profile)", cats.get(cat, {}).get("expected_ms"), dp.get(cat))
    # noise: fused into the clipped sums' epilogue; alone in the split layers' reductions and in the micro stage
    add("split reductions + noise kernels (GPU ms/step, profile)", None, dp.get("noise"))
    for backend, label in (("auto", "Triton"), ("torch", "CUDA C++")):
        m = ((micro or {}).get(f"add_noise_and_scale_{backend}") or {}).get("ms")
        add(f"noise over all {pred['n_params']:,} parameters ({label}, micro)", cats["noise"]["expected_ms"], m)
    regions = prof.get("dpsat_fast", {}).get("regions_ms", {})
    add("norm certificates (GPU ms/step, profile)", cats["norm certificates"]["expected_ms"],
        regions.get("dp::norm_certificates"))
    post = sum(c["expected_ms"] for k, c in cats.items() if k in ("ghost norms", "instantiate norms",
                                                                  "norm certificates", "clipped sums", "noise"))
    add("post-backward phase (GPU ms/step, profile)", round(post, 4), regions.get("dp::post_backward"))
    add("non-private step, GPU busy (profile)", d["nonprivate_gpu_ms"]["expected_ms"], npv.get("gpu_ms_total"))
    add("DP-SGD step, GPU busy (profile)", d["dpsat_fast_gpu_ms"]["expected_ms"],
        prof.get("dpsat_fast", {}).get("gpu_ms_total"))
    add("non-private host ops/step", pred["assumptions"]["host_ops_per_step"]["nonprivate"],
        npv.get("host_ops_per_step"), "ops")
    add("DP-SGD host ops/step", pred["assumptions"]["host_ops_per_step"]["dpsat_fast"],
        prof.get("dpsat_fast", {}).get("host_ops_per_step"), "ops")
    add("DP-SGD syncs/step", pred["assumptions"]["syncs_per_step"]["dpsat_fast"],
        prof.get("dpsat_fast", {}).get("syncs_per_step"), "syncs")
    # kernel bench: per-layer norms and clipped sums at batch 256, weighted by occurrences
    if kernels and kernels.get("results"):
        sums = {"ghost norms": 0.0, "instantiate norms": 0.0, "clipped sums": 0.0}
        for r in kernels["results"]:
            p = r.get("providers", {}).get("dpsat_fast", {})
            if p.get("norms_ms") is not None and r.get("route") in ("ghost", "instantiate"):
                sums[f"{r['route']} norms"] += p["norms_ms"] * r["count"]
            if p.get("clipped_sum_ms") is not None:
                sums["clipped sums"] += p["clipped_sum_ms"] * r["count"]
        for cat, v in sums.items():
            add(f"{cat} (kernel bench, isolated)", cats.get(cat, {}).get("expected_ms"), round(v, 4))
    fp32 = {(r["model"], r["provider"]): r for r in tput.get("fp32", []) if r.get("status") == "ok"}
    base = fp32.get(("resnet18_gn", "nonprivate"))
    ours = fp32.get(("resnet18_gn", "dpsat_fast"))
    host = d["host_ms"]
    add("ResNet-18-GN b256 non-private step (throughput)",
        round(max(d["nonprivate_gpu_ms"]["expected_ms"], host["nonprivate"]), 3), base and base["ms_per_step"])
    add("ResNet-18-GN b256 DP-SGD step (throughput)",
        round(max(d["dpsat_fast_gpu_ms"]["expected_ms"], host["dpsat_fast"]), 3), ours and ours["ms_per_step"])
    add("DP-SGD / non-private time (throughput)", d["ratio_expected"],
        round(ours["ms_per_step"] / base["ms_per_step"], 3) if base and ours else None, "x")
    dist = (distributed or {}).get("summary", {})
    single, group = (list(dist.values()) + [None, None])[:2]  # the plain process; the rank of a group of one
    d1 = d["distributed_world1"]
    add("bucketed all-reduce, ResNet-18 parameters, world 1 (distributed)", d1["allreduce_ms"],
        group and group.get("allreduce_ms"))
    add("distributed release path, world 1, extra ms/step (distributed)", d1["overhead_ms"],
        round(group["ms_per_step"] - single["ms_per_step"], 3) if group and single else None)
    label = dev_name + (" (dry run on CPU: tiny shapes, measured values are not comparable)" if dry else "")
    return rows, label


def format_compare(rows: list[dict[str, Any]], label: str) -> str:
    lines = [f"measured vs predicted ({label}; predictions: bench/gpu_predictions.json, docs/gpu.md)"]
    w = max(len(r["quantity"]) for r in rows)
    lines.append(f"  {'quantity':<{w}}  {'predicted':>10}  {'measured':>10}  {'meas/pred':>9}")

    def f(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    for r in rows:
        lines.append(f"  {r['quantity']:<{w}}  {f(r['predicted']):>10}  {f(r['measured']):>10}  "
                     f"{f(r['measured/predicted']):>9}  {r['unit']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes and budgets (CI)")
    parser.add_argument("--out", type=Path, default=None, help="result folder (default: $OUT, else a temp folder)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage budget")
    parser.add_argument("--only", nargs="+", default=None, help="run only these stages (others: skipped)")
    parser.add_argument("--write-predictions", action="store_true", help=f"regenerate {PREDICTIONS.name} and exit")
    parser.add_argument("--plan", action="store_true", help="print the stages, budgets and commands; run nothing")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="resnet18_gn", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.write_predictions:
        pred = write_predictions()
        print(format_predictions(pred))
        print(f"wrote {PREDICTIONS}")
        return 0
    if args.stage:
        {"env": stage_env, "wheels": stage_wheels, "profile": stage_profile, "micro": stage_micro}[args.stage](args)
        return 0

    if args.plan:
        stages = build_stages(args, Path("$OUT"), Path("$WORK"))
        if args.dry_run:
            dry_run_budgets(stages)
        end = 0.0
        for st in stages:
            end += st.budget_s * args.budget_scale
            what = " ".join(st.command) if st.command else f"({st.note})"
            print(f"{st.name:<20} {st.budget_s * args.budget_scale:>5.0f}s  ends by {end:>5.0f}s  {what}")
        return 0
    env_out = os.environ.get("OUT")
    out = args.out or (Path(env_out) if env_out else Path(tempfile.mkdtemp(prefix="device_run_")))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="device_run_work_"))
    runner = Runner(args, out, work)
    runner.env["PYTHONPATH"] = _pythonpath(work)
    runner.env.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # autotune results shared by the stages' processes
    if args.dry_run:
        runner.env.setdefault("TRITON_INTERPRET", "1")
        runner.env.setdefault("CUDA_VISIBLE_DEVICES", "")
    stages = build_stages(args, out, work)
    if args.dry_run:
        dry_run_budgets(stages)
    if args.only:
        for s in stages:
            if s.name not in args.only and s.name != "build":
                s.command, s.note = None, "not in --only"
    total = sum(s.budget_s for s in stages) * args.budget_scale
    runner.say(f"device_run: {len(stages)} stages, {total:.0f}s of budgets; results to {out}")
    summaries = runner.run(stages)

    pred = _load(PREDICTIONS)
    problems = []
    if args.dry_run:  # the committed predictions are what the model computes
        fresh = json.loads(json.dumps(roofline(), sort_keys=True))
        if pred != fresh:
            problems.append(f"{PREDICTIONS.name} is stale: run bench/device_run.py --write-predictions")
    env = _load(work / "env.json")
    tput = merge_throughput(work, out)
    kernels = _load(out / "kernels_cuda.json")
    distributed = _load(out / "distributed_cuda.json")
    rows, label = (compare(pred, env, _load(work / "profile.json"), kernels, tput, _load(work / "micro.json"),
                           args.dry_run, distributed) if pred else ([], ""))
    tests = next((s for s in stages if s.name == "tests"), None)
    test_line = next((ln for ln in reversed(tests.result.get("tail", [])) if re.search(r"\d+ (passed|failed)", ln)),
                     None) if tests else None
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run, "env": env, "stages": summaries, "tests": test_line,
        "profile": _load(work / "profile.json"), "micro": _load(work / "micro.json"),
        "distributed": (distributed or {}).get("summary"),
        "measured_vs_predicted": rows, "prediction_device": label, "problems": problems,
        "wall_s": round(time.monotonic() - runner.t0, 1),
    }
    (out / "device_run.json").write_text(json.dumps(summary, indent=1) + "\n")
    runner.log.close()
    shutil.rmtree(work, ignore_errors=True)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    if len(files) > MAX_OUT_FILES:
        problems.append(f"{len(files)} files in {out}, more than {MAX_OUT_FILES}")

    print()
    print(f"{'stage':<20} {'budget':>6} {'used':>6} {'ends':>6}  status")
    for s in summaries:
        used = s.get("seconds")
        print(f"{s['stage']:<20} {s['budget_s']:>6.0f} {'-' if used is None else f'{used:.0f}':>6} {s['end_s']:>6.0f}  "
              f"{s['status']}" + (f" ({s['why']})" if "why" in s else ""))
    print(f"tests: {test_line or '-'}")
    if rows:
        print(format_compare(rows, label))
    print(f"wall {summary['wall_s']:.0f}s; {len(files)} files in {out}: {', '.join(p.name for p in files)}")
    for p in problems:
        print("PROBLEM:", p)
    if args.dry_run:
        bad = [s["stage"] for s in summaries if s["status"] not in ("ok", "skipped") and s["stage"] != "canary"]
        canary = next((s for s in summaries if s["stage"] == "canary"), None)
        if (not args.only or "canary" in args.only) and (
                canary is None or canary["status"] != "cut" or canary.get("seconds", 99) > 10):
            bad.append("canary (must be cut within its 2 s budget)")
        if bad or problems:
            print("dry run FAILED:", bad, problems)
            return 1
        print("dry run OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
