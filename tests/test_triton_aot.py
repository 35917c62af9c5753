"""bench/triton_aot.py: the ahead-of-time compile matrix of the Triton kernels for real GPUs (sm_80, sm_90).

The full matrix runs in .ci/triton_aot (minutes); here: the matrix names every ``@triton.jit`` kernel of
dpsat_fast/ops/triton (a new kernel cannot be left out), the budget check fails what it must, and one real
kernel config compiles for sm_90 with the installed triton (skipped without triton's AOT API or ptxas).
The kernels are imported in a subprocess: conftest turns the interpreter on for this process, and the
interpreter's kernels cannot be compiled.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "triton_aot.py"

_spec = importlib.util.spec_from_file_location("triton_aot", SCRIPT)
aot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot)  # standard library only at import

KERNELS = {"_ghost_sq_norms_kernel", "_instantiate_sq_norms_kernel", "_clipped_sum_kernel", "_affine_grads_kernel",
           "_sum_noise_scale_kernel", "_per_example_clipped_sum_kernel"}


def _run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def _needs_triton():
    pytest.importorskip("triton")


def test_jit_kernels_are_the_launched_ones():
    found = aot.jit_kernels()
    assert set(found) >= KERNELS, found
    assert "_load_a" not in found and "_load_g" not in found  # inlined helpers, not kernels
    assert found["_clipped_sum_kernel"] == "weight_grads.py"


def test_jit_kernels_sees_a_new_kernel(tmp_path):
    (tmp_path / "k.py").write_text(
        "import triton\n\n@triton.jit\ndef helper(x):\n    return x\n\n"
        "@triton.jit(do_not_specialize=['n'])\ndef new_kernel(p, n):\n    helper(p)\n\n"
        "def host():\n    new_kernel[(1,)](0, 1)\n")
    assert aot.jit_kernels(tmp_path) == {"new_kernel": "k.py"}
    jobs = [dict(kernel=k) for k in set(aot.jit_kernels()) - {"_affine_grads_kernel"}]
    assert aot.uncovered_kernels(jobs) == ["_affine_grads_kernel"]


def test_matrix_covers_every_kernel():
    _needs_triton()
    res = _run("--list")
    assert res.returncode == 0, res.stdout + res.stderr
    listing = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(listing["jobs_per_kernel"]) == set(aot.jit_kernels()) >= KERNELS
    assert listing["uncovered"] == []
    # every autotune config of weight_grads, both targets, both scalar profiles
    assert listing["targets"] == [80, 90] and listing["scalars"] == ["contiguous", "strided"]
    assert all(n >= 2 * 2 * 3 for n in listing["jobs_per_kernel"].values()), listing


def test_budget_check():
    usage = dict(regs=128, spill_stores=0, spill_loads=0, stack=0)
    job = dict(kernel="_clipped_sum_kernel", constexprs=dict(IS_CONV=True))
    assert aot.budget_problems(90, aot.SMEM_OPTIN[90], usage, job) == ([], None)
    # A100 and H100 opt-in limits per block: 163 KiB and 227 KiB
    assert (aot.SMEM_OPTIN[80], aot.SMEM_OPTIN[90]) == (166912, 232448)
    problems, _ = aot.budget_problems(80, aot.SMEM_OPTIN[80] + 1, usage, job)
    assert len(problems) == 1 and "shared memory 166913 B" in problems[0]
    assert aot.budget_problems(90, aot.SMEM_OPTIN[80] + 1, usage, job) == ([], None)
    spilling = dict(usage, regs=255, spill_stores=96, spill_loads=48)
    problems, _ = aot.budget_problems(90, 1024, spilling, job)
    assert len(problems) == 1 and "register spills" in problems[0]
    assert aot.budget_problems(90, 1024, dict(usage, regs=None), job)[0] == ["no ptxas register report"]


def test_budget_check_allowed_spill(monkeypatch):
    spilling = dict(regs=40, spill_stores=4, spill_loads=4, stack=40)
    monkeypatch.setattr(aot, "ALLOWED_SPILLS", [("_k", dict(HAS_NOISE=True), 8, "a recorded reason")])
    assert aot.budget_problems(90, 0, spilling, dict(kernel="_k", constexprs=dict(HAS_NOISE=True))) == (
        [], "a recorded reason")
    assert aot.budget_problems(90, 0, spilling, dict(kernel="_k", constexprs=dict(HAS_NOISE=False)))[0]
    assert aot.budget_problems(90, 0, dict(spilling, spill_stores=8), dict(kernel="_k",
                                                                              constexprs=dict(HAS_NOISE=True)))[0]


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    40 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 384 bytes cmem[0]\n")
    assert aot.parse_ptxas_log(log) == dict(regs=168, spill_stores=8, spill_loads=4, stack=40)


def test_compile_one_config_for_sm90(tmp_path):
    _needs_triton()
    compiler = pytest.importorskip("triton.compiler")
    if not hasattr(compiler, "ASTSource"):
        pytest.skip("this triton has no triton.compiler.ASTSource")
    pytest.importorskip("triton.backends.compiler").GPUTarget  # noqa: B018
    try:
        ptxas = aot._ptxas_path(90)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no ptxas: {e}")
    if not (ptxas and os.path.exists(ptxas)):
        pytest.skip("no ptxas in the triton installation")
    out = tmp_path / "aot.json"
    res = _run("--kernels", "_clipped_sum_kernel", "--dtypes", "fp32", "--targets", "90", "--scalars", "contiguous",
               "--where", "IS_CONV=True", "--limit", "1", "--processes", "1", "--quiet", "--all-results",
               "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = json.loads(out.read_text())["runs"]
    (r,) = run["results"]
    assert r["ok"] and r["budget_ok"], r
    assert r["target"] == 90 and r["constexprs"]["PREC"] == "tf32x3" and r["constexprs"]["IS_CONV"] is True
    assert 0 < r["shared"] <= aot.SMEM_OPTIN[90] and 0 < r["regs"] <= 255
    (row,) = run["summary"]
    assert row["passed"] and row["kernel"] == "_clipped_sum_kernel" and row["dtype"] == "fp32"
