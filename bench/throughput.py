"""Throughput and peak memory of one full DP training step, per provider, measured in the same run.

A step is forward, backward and an SGD (momentum 0.9) update on a synthetic batch (random inputs of the
model's real shape, random labels, cross-entropy with reduction "mean"). Providers:

- ``nonprivate``    plain PyTorch.
- ``dpsat_fast``    this project's book-keeping engine + DPOptimizer (ghost norms, one backward).
- ``dpsat_fast_sat``  the same with the DP-SAT optimizer (ρ = ``--rho``; the layers compute at w + ε).
- ``dpsat_fast_per_layer``  DP-SGD with per-layer clipping: each layer clipped and summed during the backward.
- ``opacus_hooks``  Opacus 1.6 ``grad_sample_mode="hooks"``: materialized per-sample gradients.
- ``opacus_ghost``  Opacus 1.6 ``grad_sample_mode="ghost"``: fast gradient / ghost clipping, two backwards.
- ``torch_func``    ``vmap(grad(functional_call))`` per-sample gradients, flat clip, sum, Gaussian noise.

All DP providers use flat clipping (``dpsat_fast_per_layer``: per-layer, C/√L per layer) with C = ``--max-grad-norm``, noise std σC with σ =
``--noise-multiplier``, and divide by the (public) batch size. Every (model, batch, provider) starts from
the same initial weights and the same batch. Timing: median over ``--iters`` steps after ``--warmup``
steps (``time.perf_counter`` on CPU; ``triton.testing.do_bench`` or CUDA events on CUDA). Memory: on
CPU the peak RSS increase over the RSS after model and data creation, in a fresh subprocess per job
(``resource.getrusage``); on CUDA ``torch.cuda.max_memory_allocated`` over the warm-up steps minus the
allocation after model and data creation. Both include gradients and optimizer state.

Usage::

    python bench/throughput.py --models resnet18_gn wrn16_4_gn --batch-sizes 32 64 \
        --providers nonprivate dpsat_fast opacus_hooks opacus_ghost torch_func \
        --device cpu --warmup 2 --iters 5 --out bench/results/throughput_cpu.json

``--baseline TREE`` also runs every dpsat_fast provider from TREE, a checkout of an earlier commit with its
extension built in place (``git worktree add TREE COMMIT && cd TREE && python setup.py build_ext --inplace``),
as ``<provider>@baseline``, interleaved with the current code in every round: a change's cost as ratios of
one run. Rows of dpsat_fast providers report ``fallback_examples`` (certified norms recomputed exactly;
ordinary training: 0).

``--verify`` checks, instead of timing, that each DP provider's update gradient equals the torch.func
clipped mean (σ = 0) and that its noise has std σC/B (σ = 1).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    import dpsat_fast
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import dpsat_fast

from dpsat_fast.models import INPUT_SHAPES, MODELS, NUM_CLASSES, build_model

# Opacus's reminder about secure_mode, and the full-backward-hook note for inputs without grad.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

PROVIDER_NAMES = ("nonprivate", "dpsat_fast", "dpsat_fast_sat", "dpsat_fast_per_layer", "opacus_hooks",
                  "opacus_ghost", "torch_func")
DEFAULT_MODELS = ("resnet18_gn", "wrn16_4_gn")
DEFAULT_BATCH_SIZES = {"cuda": (32, 64, 128, 256, 512), "cpu": (32, 64)}
DEFAULT_WARMUP = {"cuda": 3, "cpu": 1}
DEFAULT_ITERS = {"cuda": 20, "cpu": 3}
DEFAULT_CPU_THREADS = 2


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Hyper-parameters shared by all providers."""

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0
    rho: float = 0.05
    amp: str = "none"  # "bf16": forward under torch.autocast(bfloat16)


class ProviderSkipped(RuntimeError):
    """The provider cannot run in this environment (missing package or module)."""


class Provider:
    """One way of doing a training step on ``model`` with the fixed batch ``(x, y)``.

    Subclasses set up in ``__init__`` and implement ``forward_backward`` and ``optimizer_step``; the
    base optimizer's ``p.grad`` after ``optimizer_step`` is the (noisy) gradient used for the update.
    """

    name = ""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: StepConfig):
        self.model, self.x, self.y, self.cfg = model, x, y, cfg
        self.batch_size = x.shape[0]

    def _sgd(self, params) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum)

    def forward_backward(self) -> None:
        raise NotImplementedError

    def optimizer_step(self) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16"):
            self.forward_backward()
        self.optimizer_step()
        self.zero_grad()

    def close(self) -> None:
        """Detach hooks so the model is plain again."""


class NonPrivate(Provider):
    name = "nonprivate"

    def __init__(self, model, x, y, cfg):
        super().__init__(model, x, y, cfg)
        self.optimizer = self._sgd(model.parameters())

    def forward_backward(self):
        F.cross_entropy(self.model(self.x), self.y).backward()

    def optimizer_step(self):
        self.optimizer.step()


class DpsatFast(Provider):
    """This project's engine; see dpsat_fast/engine.py and dpsat_fast/optim."""

    name = "dpsat_fast"
    clipping = "flat"

    def __init__(self, model, x, y, cfg):
        super().__init__(model, x, y, cfg)
        try:
            from dpsat_fast.engine import BookKeepingEngine
            from dpsat_fast.optim import DPOptimizer
        except ImportError as exc:
            raise ProviderSkipped(f"dpsat_fast engine not importable ({exc})") from exc
        self.engine = BookKeepingEngine(model, max_grad_norm=cfg.max_grad_norm, loss_reduction="mean",
                                        clipping=self.clipping)
        self.optimizer = DPOptimizer(
            self._sgd(model.parameters()),
            engine=self.engine,
            noise_multiplier=cfg.noise_multiplier,
            expected_batch_size=self.batch_size,
            seed=cfg.seed,
            **({"allow_non_private": True} if cfg.noise_multiplier == 0 else {}),
        )

    def forward_backward(self):
        F.cross_entropy(self.model(self.x), self.y).backward()

    def optimizer_step(self):
        self.optimizer.step()

    def close(self):
        self.engine.detach()


class DpsatFastSAT(DpsatFast):
    """DP-SAT: the weights are perturbed along the previous noisy gradient before the forward."""

    name = "dpsat_fast_sat"

    def __init__(self, model, x, y, cfg):
        Provider.__init__(self, model, x, y, cfg)
        from dpsat_fast.engine import BookKeepingEngine
        from dpsat_fast.optim import DPSAT

        self.engine = BookKeepingEngine(model, max_grad_norm=cfg.max_grad_norm, loss_reduction="mean")
        self.optimizer = DPSAT(self._sgd(model.parameters()), engine=self.engine, rho=cfg.rho,
                               noise_multiplier=cfg.noise_multiplier, expected_batch_size=self.batch_size,
                               seed=cfg.seed, **({"allow_non_private": True} if cfg.noise_multiplier == 0 else {}))

    def close(self):
        self.optimizer.detach()
        self.engine.detach()


def _opacus_private(provider: Provider, grad_sample_mode: str, **extra):
    """``PrivacyEngine.make_private`` with a dummy loader whose only role is to give sample rate 1 and
    expected batch size B (Opacus reads both from ``len(loader)`` and ``len(loader.dataset)``)."""
    try:
        from opacus import PrivacyEngine
    except ImportError as exc:
        raise ProviderSkipped(f"opacus not installed ({exc})") from exc
    from torch.utils.data import DataLoader, TensorDataset

    batch_size, cfg = provider.batch_size, provider.cfg
    loader = DataLoader(TensorDataset(torch.zeros(batch_size, 1)), batch_size=batch_size)
    generator = torch.Generator(device=provider.x.device).manual_seed(cfg.seed)
    return PrivacyEngine(accountant="rdp").make_private(
        module=provider.model,
        optimizer=provider._sgd(provider.model.parameters()),
        data_loader=loader,
        noise_multiplier=cfg.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        grad_sample_mode=grad_sample_mode,
        poisson_sampling=False,
        noise_generator=generator,
        **extra,
    )


class OpacusHooks(Provider):
    name = "opacus_hooks"

    def __init__(self, model, x, y, cfg):
        super().__init__(model, x, y, cfg)
        self.module, self.optimizer, _ = _opacus_private(self, "hooks")

    def forward_backward(self):
        F.cross_entropy(self.module(self.x), self.y).backward()

    def optimizer_step(self):
        # Opacus's DPOptimizer silently degrades to a non-private step when no grad_sample exists.
        if self.optimizer.grad_samples is None or len(self.optimizer.grad_samples) == 0:
            raise RuntimeError("opacus_hooks: no per-sample gradients were computed")
        self.optimizer.step()

    def close(self):
        self.module._close()


class OpacusGhost(Provider):
    """Opacus fast gradient clipping: norms from a first backward, a second backward of Σ c_i ℓ_i."""

    name = "opacus_ghost"

    def __init__(self, model, x, y, cfg):
        super().__init__(model, x, y, cfg)
        self.module, self.optimizer, self.criterion, _ = _opacus_private(
            self, "ghost", criterion=nn.CrossEntropyLoss(reduction="mean")
        )

    def forward_backward(self):
        # A DPTensorFastGradientClipping: its backward() runs both backward passes.
        self.criterion(self.module(self.x), self.y).backward()

    def optimizer_step(self):
        self.optimizer.step()

    def close(self):
        self.module._close()


class TorchFunc(Provider):
    """Per-sample gradients by ``vmap(grad(...))`` over ``functional_call``; flat clip, noisy sum."""

    name = "torch_func"

    def __init__(self, model, x, y, cfg):
        super().__init__(model, x, y, cfg)
        from torch.func import functional_call, grad, vmap

        self.optimizer = self._sgd(model.parameters())
        self.named_params = dict(model.named_parameters())
        # Detached aliases share storage, so they follow the optimizer's in-place updates.
        self.param_values = {k: p.detach() for k, p in self.named_params.items()}
        self.buffers = {k: b.detach() for k, b in model.named_buffers()}
        self.generator = torch.Generator(device=x.device).manual_seed(cfg.seed)

        def example_loss(params, buffers, xi, yi):
            logits = functional_call(model, (params, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(logits, yi.unsqueeze(0))

        self.per_sample_grads = vmap(grad(example_loss), in_dims=(None, None, 0, 0))

    def forward_backward(self):
        grads = self.per_sample_grads(self.param_values, self.buffers, self.x, self.y)
        sq_norms = sum(g.reshape(self.batch_size, -1).pow(2).sum(1) for g in grads.values())
        clip = (self.cfg.max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)  # [B]
        noise_std = self.cfg.noise_multiplier * self.cfg.max_grad_norm
        for name, p in self.named_params.items():
            clipped_sum = torch.tensordot(clip, grads[name], dims=1)
            if noise_std > 0:
                noise = torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
                clipped_sum.add_(noise, alpha=noise_std)
            p.grad = clipped_sum.div_(self.batch_size)

    def optimizer_step(self):
        self.optimizer.step()


class DpsatFastPerLayer(DpsatFast):
    """DP-SGD with per-layer clipping (budget C/√L per layer): each layer is clipped, summed and noised during
    the backward, and no output gradient is kept to its end."""

    name = "dpsat_fast_per_layer"
    clipping = "per_layer"


PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls for cls in (NonPrivate, DpsatFast, DpsatFastSAT, DpsatFastPerLayer, OpacusHooks, OpacusGhost,
                              TorchFunc)
}


def make_inputs(model_name: str, batch_size: int, device: torch.device, seed: int):
    """The model (seeded init) and a synthetic batch, identical for every provider and device."""
    torch.manual_seed(seed)
    model = build_model(model_name).to(device).train()
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, *INPUT_SHAPES[model_name], generator=generator)
    y = torch.randint(0, NUM_CLASSES[model_name], (batch_size,), generator=generator)
    return model, x.to(device), y.to(device)


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _touch_kernels(model: nn.Module, x: torch.Tensor) -> None:
    """One forward/backward on a single example (gradients dropped) and a throwaway optimizer, then a
    heap trim: lazy initialization (the first ``torch.optim`` optimizer imports torch._dynamo, ~150 MB)
    and first-touch code pages then fall before the memory baseline instead of into the step."""
    F.cross_entropy(model(x[:1]), torch.zeros(1, dtype=torch.long, device=x.device)).backward()
    model.zero_grad(set_to_none=True)
    torch.optim.SGD(model.parameters(), lr=0.0)
    gc.collect()
    if x.device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_steps_ms(step: Callable[[], None], device: torch.device, warmup: int) -> list[float]:
    """Run ``max(warmup, 1)`` untimed steps (the first allocates optimizer state); their wall times in ms."""
    times = []
    for _ in range(max(warmup, 1)):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_steps_ms(step: Callable[[], None], device: torch.device, iters: int, cuda_timer: str,
                  estimate_ms: float) -> list[float]:
    """Per-step times in ms of ``iters`` steps (already warmed up); ``estimate_ms`` is one step's time."""
    if device.type == "cuda" and cuda_timer == "do_bench":
        from triton.testing import do_bench

        # do_bench's budgets are in ms (it flushes L2 before each run); convert step counts to budgets.
        times = do_bench(step, warmup=0.5 * estimate_ms, rep=(iters + 0.5) * estimate_ms,
                         return_mode="all")
        return [float(t) for t in times]
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _import_provider_deps(provider_name: str) -> None:
    """Import what a provider needs before the memory baseline, so imports are not counted as its memory."""
    modules = {"opacus_hooks": ["opacus"], "opacus_ghost": ["opacus"], "torch_func": ["torch.func"],
               "dpsat_fast": ["dpsat_fast.engine", "dpsat_fast.optim"]}.get(provider_name, [])
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            pass  # the provider itself reports the skip


def run_job(model_name: str, batch_size: int, provider_name: str, device: str, warmup: int,
            iters: int, cfg: StepConfig, cuda_timer: str = "do_bench",
            measure_cpu_memory: bool = True) -> dict[str, Any]:
    """Set up one provider on a fresh model and time it; failures are returned as a row, not raised."""
    dev = torch.device(device)
    row: dict[str, Any] = {"model": model_name, "batch_size": batch_size, "provider": provider_name,
                           "status": "ok", "error": None, "ms_per_step": None, "examples_per_s": None,
                           "peak_mb": None, "times_ms": []}
    provider = None
    try:
        _import_provider_deps(provider_name)
        model, x, y = make_inputs(model_name, batch_size, dev, cfg.seed)
        _touch_kernels(model, x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            baseline_mb = torch.cuda.memory_allocated(dev) / 2**20
        else:
            baseline_mb = _current_rss_mb()
        provider = PROVIDERS[provider_name](model, x, y, cfg)
        warm_times = warmup_steps_ms(provider.step, dev, warmup)
        if dev.type == "cuda":
            # Read before timing: do_bench allocates a 256 MB L2-flush buffer that is not the step's.
            row["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20 - baseline_mb
        times = time_steps_ms(provider.step, dev, iters, cuda_timer, estimate_ms=min(warm_times))
        median_ms = statistics.median(times)
        row.update(ms_per_step=median_ms, ms_min=min(times), ms_mean=statistics.fmean(times),
                   examples_per_s=batch_size / (median_ms / 1e3), times_ms=times)
        if dev.type == "cpu" and measure_cpu_memory:
            row["peak_mb"] = _peak_rss_mb() - baseline_mb
        if provider_name.startswith("dpsat_fast"):
            row["fallback_examples"] = _fallback_examples()
    except ProviderSkipped as exc:
        row.update(status="skipped", error=str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="oom", error=f"OutOfMemoryError: {str(exc).splitlines()[0]}")
    except Exception as exc:  # noqa: BLE001 - a failing provider must not stop the run
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        if provider is not None:
            try:
                provider.close()
            except Exception:  # noqa: BLE001
                pass
        provider = None
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _fallback_examples() -> int | None:
    """Examples whose certified clipping norm was loose enough to be recomputed exactly, over all steps of the
    job (ordinary training: 0). None for a dpsat_fast without certified norms (an older baseline)."""
    try:
        from dpsat_fast.layers.bounds import fallback_counts
    except ImportError:
        return None
    return int(sum(fallback_counts.values()))


BASELINE_SUFFIX = "@baseline"


def _run_job_in_subprocess(job: dict[str, Any], timeout_s: float, baseline: Path | None = None) -> dict[str, Any]:
    """Run ``run_job`` in a fresh interpreter so peak RSS belongs to this job alone. A provider named
    ``<name>@baseline`` runs ``<name>`` with the ``dpsat_fast`` of the source tree ``baseline`` (e.g. a
    checkout of an earlier commit with its extension built in place) first on ``PYTHONPATH``."""
    env = None
    name = job["provider_name"]
    if name.endswith(BASELINE_SUFFIX):
        job = {**job, "provider_name": name[:-len(BASELINE_SUFFIX)]}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(baseline), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    base = {"model": job["model_name"], "batch_size": job["batch_size"],
            "provider": name, "ms_per_step": None, "examples_per_s": None,
            "peak_mb": None, "times_ms": []}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "provider": name}
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {**base, "status": "error", "error": f"worker exited with {proc.returncode}: {tail}"}


def _worker_main(job_json: str) -> None:
    job = json.loads(job_json)
    job["cfg"] = StepConfig(**job["cfg"])
    torch.set_num_threads(job.pop("threads"))
    row = run_job(**job)
    row["dpsat_fast_dir"] = str(Path(dpsat_fast.__file__).resolve().parent.parent)  # which tree ran
    print(json.dumps(row), flush=True)


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds of one job: the median over rounds of the per-round median step time (the
    rounds interleave the providers, so a burst of load on a shared machine hits all of them alike)."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if len(rounds) == 1 or not ok:
        return rounds[0]
    row = dict(ok[0])
    row["round_ms"] = [r["ms_per_step"] for r in ok]
    row["ms_per_step"] = statistics.median(row["round_ms"])
    row["examples_per_s"] = row["batch_size"] / (row["ms_per_step"] / 1e3)
    row["times_ms"] = [t for r in ok for t in r["times_ms"]]
    peaks = [r["peak_mb"] for r in ok if r["peak_mb"] is not None]
    row["peak_mb"] = statistics.median(peaks) if peaks else None
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Throughput and memory of each row relative to ``nonprivate`` at the same model and batch size."""
    reference = {(r["model"], r["batch_size"]): r for r in rows
                 if r["provider"] == "nonprivate" and r["status"] == "ok"}
    for r in rows:
        base = reference.get((r["model"], r["batch_size"]))
        ok = base is not None and r["status"] == "ok"
        r["throughput_ratio"] = r["examples_per_s"] / base["examples_per_s"] if ok else None
        r["memory_ratio"] = (r["peak_mb"] / base["peak_mb"]
                             if ok and r["peak_mb"] is not None and base["peak_mb"] else None)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "batch", "provider", "ms/step", "examples/s", "peak MB", "thr/nonpriv",
              "mem/nonpriv")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [header]
    for r in rows:
        if r["status"] != "ok":
            lines.append((r["model"], str(r["batch_size"]), r["provider"],
                          f"{r['status']}: {r['error']}"[:90], "", "", "", ""))
            continue
        lines.append((r["model"], str(r["batch_size"]), r["provider"], fmt(r["ms_per_step"], ".1f"),
                      fmt(r["examples_per_s"], ".1f"), fmt(r["peak_mb"], ".0f"),
                      fmt(r["throughput_ratio"], ".3f"), fmt(r["memory_ratio"], ".2f")))
    widths = [max(len(line[i]) for line in lines if line[4] or i < 3) for i in range(len(header))]
    out = []
    for line in lines:
        if not line[4] and line is not header:
            out.append("  ".join(c.ljust(w) for c, w in zip(line[:3], widths)) + "  " + line[3])
        else:
            out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    return "\n".join(out)


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_metadata(device: torch.device, threads: int, argv: list[str],
                     script: str = "bench/throughput.py") -> dict[str, Any]:
    """Device, versions, date and the command line of a benchmark run (shared by the bench scripts)."""
    def version(module_name: str) -> str | None:
        try:
            return __import__(module_name).__version__
        except Exception:  # noqa: BLE001
            return None

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_model_name()
    return {
        "device": device.type,
        "device_name": device_name,
        "cpu_name": _cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "num_threads": threads,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "opacus": version("opacus"),
        "triton": version("triton"),
        "dpsat_fast": dpsat_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", script, *argv]),
    }


def verify_provider(provider_name: str, model_name: str = "digits_cnn", batch_size: int = 16,
                    device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Check that a DP provider releases Σ_i clip(g_i) / B + N(0, σ²C²) / B with flat clipping.

    The oracle is per-sample gradients from ``torch.func`` (independent of the provider's code path).
    C is set to the median per-sample norm, so half the examples are clipped. With σ = 0 the update
    gradient must equal the clipped mean; with σ = 1 the residual must have mean ≈ 0 and std ≈ σC/B.
    Returns the max relative error (σ = 0) and the measured/expected noise std ratio (σ = 1).
    """
    from torch.func import functional_call, grad, vmap

    dev = torch.device(device)
    model, x, y = make_inputs(model_name, batch_size, dev, seed)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def example_loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    norms = sum(g.reshape(batch_size, -1).double().pow(2).sum(1) for g in per_sample.values()).sqrt()
    clip_norm = float(norms.median())
    factors = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    expected = {k: torch.tensordot(factors, g.double(), dims=1) / batch_size
                for k, g in per_sample.items()}

    def released_grads(noise_multiplier: float) -> dict[str, torch.Tensor]:
        model_copy, _, _ = make_inputs(model_name, batch_size, dev, seed)
        cfg = StepConfig(noise_multiplier=noise_multiplier, max_grad_norm=clip_norm, lr=0.0, seed=seed)
        provider = PROVIDERS[provider_name](model_copy, x, y, cfg)
        try:
            provider.forward_backward()
            provider.optimizer_step()
            return {k: p.grad.detach().double().clone() for k, p in model_copy.named_parameters()}
        finally:
            provider.close()

    noiseless = released_grads(0.0)
    max_rel_err = max(float((noiseless[k] - expected[k]).norm() / expected[k].norm().clamp(min=1e-12))
                      for k in expected)
    noisy = released_grads(1.0)
    residual = torch.cat([(noisy[k] - expected[k]).flatten() for k in expected])
    expected_std = clip_norm / batch_size
    return {"max_rel_err_noiseless": max_rel_err,
            "noise_std_ratio": float(residual.std() / expected_std),
            "noise_mean_over_std": float(residual.mean() / expected_std),
            "fraction_clipped": float((norms > clip_norm).double().mean())}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="default: 32 64 128 256 512 on cuda, 32 64 on cpu")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDER_NAMES), choices=PROVIDER_NAMES)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: cpu 1, cuda 3)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default: cpu 3, cuda 20)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads (default: {DEFAULT_CPU_THREADS} on cpu, torch's on cuda)")
    parser.add_argument("--isolation", choices=("subprocess", "inprocess"), default=None,
                        help="fresh process per job (default on cpu: needed for per-job peak RSS) or "
                             "one process (default on cuda; CPU peak memory is then not reported)")
    parser.add_argument("--cuda-timer", choices=("do_bench", "events"), default="do_bench")
    parser.add_argument("--job-timeout", type=float, default=1800.0, help="seconds per subprocess job")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a source tree of an earlier dpsat_fast (extension built in place): every dpsat_fast "
                             "provider also runs from it, as <provider>@baseline, interleaved in the same run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every provider this many times, interleaved; report the median round")
    parser.add_argument("--rho", type=float, default=0.05, help="DP-SAT radius of dpsat_fast_sat")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none",
                        help="bf16: forward under torch.autocast (mixed precision) for every provider")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for rows and metadata")
    parser.add_argument("--verify", action="store_true",
                        help="check the DP providers' released gradients instead of timing")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "cuda" if args.device == "cuda" else "cpu"
    args.batch_sizes = args.batch_sizes or list(DEFAULT_BATCH_SIZES[dtype])
    args.warmup = DEFAULT_WARMUP[dtype] if args.warmup is None else args.warmup
    args.iters = DEFAULT_ITERS[dtype] if args.iters is None else args.iters
    if args.threads is None:
        args.threads = DEFAULT_CPU_THREADS if dtype == "cpu" else torch.get_num_threads()
    if args.isolation is None:
        args.isolation = "subprocess" if dtype == "cpu" else "inprocess"
    if args.cuda_timer == "do_bench" and dtype == "cuda":
        try:
            import triton.testing  # noqa: F401
        except ImportError:
            args.cuda_timer = "events"
    return args


def _main_verify(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for name in args.providers:
        if name == "nonprivate":
            continue
        row: dict[str, Any] = {"provider": name, "model": args.models[0]}
        if name == "dpsat_fast_per_layer":  # not the flat-clipped mean; tests/test_clipping.py checks it
            row.update(status="skipped", error="per-layer clipping is not compared with the flat torch.func mean")
            print(json.dumps(row), flush=True)
            results.append(row)
            continue
        try:
            row.update(verify_provider(name, args.models[0], min(args.batch_sizes), args.device,
                                       args.seed))
            row["status"] = "ok"
        except ProviderSkipped as exc:
            row.update(status="skipped", error=str(exc))
        except Exception as exc:  # noqa: BLE001
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def _describe_tree(path: Path) -> dict[str, Any]:
    """The baseline source tree: its path and git commit (if it is a checkout)."""
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"path": str(path), "commit": commit}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"metadata": ..., "rows": [...]}`` (also written to ``--out``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        _worker_main(argv[1])
        return {}
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.verify:
        return {"verify": _main_verify(args)}
    cfg = StepConfig(noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm,
                     seed=args.seed, rho=args.rho, amp=args.amp)
    metadata = collect_metadata(torch.device(args.device), args.threads, argv)
    metadata.update(warmup=args.warmup, iters=args.iters, isolation=args.isolation,
                    timer=("perf_counter" if args.device == "cpu" else args.cuda_timer),
                    step_config=dataclasses.asdict(cfg),
                    memory=("peak RSS increase over RSS after model+data creation"
                            if args.device == "cpu" else
                            "torch.cuda.max_memory_allocated minus allocation after model+data"))
    metadata.update(rounds=args.rounds)
    providers = list(args.providers)
    if args.baseline is not None:
        if args.isolation != "subprocess":
            raise SystemExit("--baseline needs --isolation subprocess")
        providers += [p + BASELINE_SUFFIX for p in args.providers if p.startswith("dpsat_fast")]
        metadata.update(baseline=_describe_tree(args.baseline))
    rows = []
    for model_name in args.models:
        for batch_size in args.batch_sizes:
            per_provider: dict[str, list] = {name: [] for name in providers}
            for _round, provider_name in [(r, p) for r in range(args.rounds) for p in providers]:
                job = {"model_name": model_name, "batch_size": batch_size,
                       "provider_name": provider_name, "device": args.device,
                       "warmup": args.warmup, "iters": args.iters, "cuda_timer": args.cuda_timer}
                if args.isolation == "subprocess":
                    row = _run_job_in_subprocess(
                        {**job, "cfg": dataclasses.asdict(cfg), "threads": args.threads},
                        args.job_timeout, args.baseline)
                else:
                    row = run_job(**job, cfg=cfg, measure_cpu_memory=False)
                if row["status"] == "skipped":
                    print(f"{model_name} b={batch_size} {provider_name}: skipped: {row['error']}",
                          flush=True)
                elif row["status"] != "ok":
                    print(f"{model_name} b={batch_size} {provider_name}: {row['status']}: "
                          f"{row['error']}", flush=True)
                else:
                    peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
                    print(f"{model_name} b={batch_size} {provider_name}: "
                          f"{row['ms_per_step']:.1f} ms/step, peak {peak} MB", flush=True)
                per_provider[provider_name].append(row)
            rows.extend(merge_rounds(per_provider[name]) for name in providers)
    add_ratios(rows)
    print(format_table(rows))
    result = {"metadata": metadata, "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
