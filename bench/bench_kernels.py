"""Micro-benchmark of the per-sample gradient ops, layer by layer, against materializing baselines.

For each distinct Conv2d / Linear layer of a model (traced from ``dpsat_fast.models`` on the meta device,
identical geometries merged, occurrences counted) the bench draws a random layer input ``x`` and output
gradient ``g`` and times one DP step of that layer — per-example squared norms, clip factors
``min(1, C/‖∂θ_i‖)`` with C the median norm, clipped sum plus N(0, 1) noise — for each provider:

- ``dpsat_fast``   this project's ops (:mod:`dpsat_fast.ops`): ``*_weight_sq_norms`` (route chosen
                   automatically: measured on CUDA, FLOP model on CPU) + ``*_clipped_sum_with_noise``
                   (noise_std = 1, counter-based noise). On CUDA tensors these run the Triton kernels; on
                   CPU tensors the C++ kernels (csrc/cpu/per_sample.cpp). The norms alone and the clipped
                   sum alone are timed as well.
- ``pytorch_ops``  the same ops through their pure-PyTorch implementations (``per_sample.TORCH_IMPLS``, the
                   path without the compiled extension; dpsat_fast/ops/torch_impl.py), same route.
- ``materialized`` per-example gradients formed explicitly (Linear: ``torch.bmm``; Conv2d: ``F.unfold``,
                   which allocates the k²-times larger unfolded input, and a batched matmul), then squared
                   norms, the scaled sum ``tensordot`` and ``torch.randn`` noise.
- ``torch_func``   ``vmap(grad(...))`` of ``(functional_call(layer, params, x_i) * g_i).sum()`` over the
                   batch (the gradient of the layer output is then exactly ``g_i``), then norms, scaled sum
                   and ``torch.randn`` noise.

Layers: ``resnet18`` (CIFAR ResNet-18, 32×32), ``wrn16_4`` (Wide-ResNet-16-4, 32×32) and ``resnet50``
(ImageNet ResNet-50, 224×224), i.e. ``resnet18_gn``, ``wrn16_4_gn`` and ``resnet50_gn`` of
``dpsat_fast.models`` (GroupNorm does not change the conv/linear shapes). Each row records the geometry,
T (output positions), D (fan-in per group), P (outputs per group), the route, the median time of each
provider and the ratios materialized/dpsat_fast, torch_func/dpsat_fast and pytorch_ops/dpsat_fast from the same run. A provider
whose estimated memory exceeds ``--max-gib`` is skipped for that layer (recorded with the reason).

``--verify`` (on by default) checks the dpsat_fast results of the benchmarked call itself against the
materialized per-example gradients computed in float64 on the first ``--verify-examples`` examples: the
norms within ``rtol`` (1e-4 for float32 inputs, 1e-2 for bfloat16) and the noiseless clipped sum (the
other examples' clip factors set to 0) within the same relative tolerance in Frobenius norm.

Timing (after two untimed warm-up calls): on CUDA ``triton.testing.do_bench`` per function (median, ms;
triton is imported only there). On CPU ``torch.utils.benchmark.Timer`` with ``--threads`` threads: the
median of ``--cpu-rounds`` ``timeit(number)`` blocks of about ``--cpu-block-s`` seconds each, the rounds
visiting every provider of the layer in turn so that background load on a shared machine hits all
providers alike and the ratios of one run stay comparable.

Usage::

    # CPU (the C++ kernels of the ops, and their pure-PyTorch implementations; batch 8 by default):
    python bench/bench_kernels.py --device cpu --models resnet18 wrn16_4 --out bench/results/kernels_cpu.json
    python bench/bench_kernels.py --device cpu --models resnet50 --batch 2 --max-layers 6 \
        --out bench/results/kernels_cpu_resnet50.json

    # CUDA (Triton kernels; batch 64 by default):
    python bench/bench_kernels.py --device cuda --out bench/results/kernels_cuda.json
    python bench/bench_kernels.py --device cuda --dtype bfloat16 --models resnet50 --batch 32
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    import dpsat_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import throughput  # noqa: E402  (bench/ is on sys.path when this file runs as a script)
from dpsat_fast import ops
from dpsat_fast.ops import per_sample
from dpsat_fast.models import INPUT_SHAPES, build_model

MODEL_NAMES = {"resnet18": "resnet18_gn", "wrn16_4": "wrn16_4_gn", "resnet50": "resnet50_gn"}
PROVIDER_NAMES = ("dpsat_fast", "materialized", "torch_func", "pytorch_ops")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_BATCH = {"cuda": 64, "cpu": 8}
DEFAULT_CPU_THREADS = 2
NOISE_STD = 1.0
SEED = 0
GIB = 2**30


# ------------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------------


def model_layers(model: str) -> list[dict[str, Any]]:
    """Distinct Conv2d / Linear layers of ``model`` in forward order, with per-example input shapes.

    The model is built and run on the meta device (no memory, no compute); layers with the same geometry
    (input shape, weight shape, stride, padding, dilation, groups, bias) are merged into the first one,
    with ``count`` occurrences and all their ``names``."""
    full_name = MODEL_NAMES[model]
    with torch.device("meta"):
        net = build_model(full_name)
    seen: dict[tuple, dict[str, Any]] = {}
    handles = []

    def record(name: str, module: nn.Module, inputs, output) -> None:
        in_shape = tuple(inputs[0].shape[1:])
        if isinstance(module, nn.Conv2d):
            if isinstance(module.padding, str):
                raise ValueError(f"{name}: string padding {module.padding!r} is not supported")
            layer = {"kind": "conv", "in_shape": list(in_shape), "out_shape": list(output.shape[1:]),
                     "weight_shape": list(module.weight.shape), "stride": list(module.stride),
                     "padding": list(module.padding), "dilation": list(module.dilation),
                     "groups": module.groups, "bias": module.bias is not None}
        else:
            layer = {"kind": "linear", "in_shape": list(in_shape), "out_shape": list(output.shape[1:]),
                     "weight_shape": list(module.weight.shape), "bias": module.bias is not None}
        key = json.dumps(layer, sort_keys=True)
        if key in seen:
            seen[key]["count"] += 1
            seen[key]["names"].append(name)
        else:
            seen[key] = {"model": model, "layer": name, **layer, "count": 1, "names": [name]}

    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(
                lambda mod, inp, out, name=name: record(name, mod, inp, out)))
    net(torch.empty(1, *INPUT_SHAPES[full_name], device="meta"))
    for h in handles:
        h.remove()
    layers = list(seen.values())
    for layer in layers:
        ws = layer["weight_shape"]
        if layer["kind"] == "conv":
            groups = layer["groups"]
            layer["T"] = math.prod(layer["out_shape"][1:])
            layer["D"] = math.prod(ws[1:])
            layer["P"] = ws[0] // groups
        else:
            layer["T"] = math.prod(layer["in_shape"][:-1])
            layer["D"], layer["P"] = ws[1], ws[0]
        layer["route_flop_model"] = ops.choose_route(layer["T"], layer["D"], layer["P"])
    return layers


def describe(layer: dict[str, Any]) -> str:
    ws = layer["weight_shape"]
    if layer["kind"] == "linear":
        return f"linear {ws[1]}->{ws[0]}"
    h, w = layer["in_shape"][1:]
    return f"conv {ws[1] * layer['groups']}->{ws[0]} k{ws[2]} s{layer['stride'][0]} @{h}x{w}"


# ------------------------------------------------------------------------------------------------------
# providers: each returns {"step": fn, ...} closures over the layer's tensors
# ------------------------------------------------------------------------------------------------------


class Case:
    """A layer's random input ``x`` and output gradient ``g`` (conv: [B, C, H, W] and [B, C_out, H', W'];
    linear: [B, T, D] and [B, T, P]) plus its geometry."""

    def __init__(self, layer: dict[str, Any], batch: int, device: torch.device, dtype: torch.dtype):
        self.layer, self.B, self.device, self.dtype = layer, batch, device, dtype
        gen = torch.Generator().manual_seed(SEED)
        out_shape = list(layer["out_shape"])
        if layer["kind"] == "linear":  # as [B, T, *]: T = 1 for a final classifier
            in_shape = [1, layer["D"]] if len(layer["in_shape"]) == 1 else list(layer["in_shape"])
            out_shape = [1, layer["P"]] if len(out_shape) == 1 else out_shape
        else:
            in_shape = list(layer["in_shape"])
        self.x = torch.randn(batch, *in_shape, generator=gen).to(device=device, dtype=dtype)
        self.g = torch.randn(batch, *out_shape, generator=gen).to(device=device, dtype=dtype)
        self.weight_shape = list(layer["weight_shape"])
        self.weight_numel = math.prod(self.weight_shape)
        self.bias = layer["bias"]
        self.conv_args = ((self.weight_shape, layer["stride"], layer["padding"], layer["dilation"],
                           layer["groups"]) if layer["kind"] == "conv" else None)
        self.clip_norm = 1.0  # replaced by the median per-example norm (half the examples clipped)


def clip_factors(sq_norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    return (clip_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)


def dpsat_fast_provider(case: Case) -> dict[str, Callable]:
    x, g, bias = case.x, case.g, case.bias
    w_offset, b_offset = 0, case.weight_numel
    if case.conv_args is None:
        def norms(route=None):
            return ops.linear_weight_sq_norms(x, g, route=route, with_bias=bias)

        def clipped_sum(scale, noise_std=NOISE_STD):
            return ops.linear_clipped_sum_with_noise(x, g, scale, with_bias=bias, seed=SEED,
                                                     weight_offset=w_offset, bias_offset=b_offset,
                                                     noise_std=noise_std)
    else:
        args = case.conv_args

        def norms(route=None):
            return ops.conv_weight_sq_norms(x, g, *args, route=route, with_bias=bias)

        def clipped_sum(scale, noise_std=NOISE_STD):
            return ops.conv_clipped_sum_with_noise(x, g, scale, *args, with_bias=bias, seed=SEED,
                                                   weight_offset=w_offset, bias_offset=b_offset,
                                                   noise_std=noise_std)

    def total_sq_norms():
        w_sq, b_sq = norms()
        return w_sq if b_sq is None else w_sq + b_sq

    def step():
        return clipped_sum(clip_factors(total_sq_norms(), case.clip_norm))

    return {"step": step, "norms": total_sq_norms, "clipped_sum": clipped_sum}


def materialized_per_example(case: Case, x: torch.Tensor, g: torch.Tensor):
    """Explicit per-example gradients: (∂W [B, *weight_shape], ∂b [B, C_out] or None)."""
    B = x.shape[0]
    if case.conv_args is None:
        gw = torch.bmm(g.transpose(1, 2), x)  # [B, P, D]
        gb = g.sum(1) if case.bias else None
        return gw, gb
    weight_shape, stride, padding, dilation, groups = case.conv_args
    cols = F.unfold(x, weight_shape[2:], dilation, padding, stride)  # [B, C·k², T]: the k²-larger copy
    cols = cols.view(B, groups, cols.shape[1] // groups, cols.shape[2])  # [B, G, D_k, T]
    gg = g.reshape(B, groups, g.shape[1] // groups, -1)  # [B, G, P_k, T]
    gw = torch.matmul(gg, cols.transpose(-1, -2)).reshape(B, *weight_shape)
    gb = g.sum((2, 3)) if case.bias else None
    return gw, gb


def _noisy_scaled_sums(case: Case, grads: list[torch.Tensor], generator: torch.Generator):
    """Per-example squared norms in fp32, clip factors, scaled sums plus torch.randn noise (fp32 results)."""
    B = case.B
    sq = sum(t.reshape(B, -1).float().pow(2).sum(1) for t in grads)
    scale = clip_factors(sq, case.clip_norm)
    out = []
    for t in grads:
        s = torch.tensordot(scale.to(t.dtype), t, dims=1).float()
        s.add_(torch.randn(s.shape, generator=generator, device=s.device), alpha=NOISE_STD)
        out.append(s)
    return out


def materialized_provider(case: Case) -> dict[str, Callable]:
    generator = torch.Generator(device=case.device).manual_seed(SEED)

    def step():
        gw, gb = materialized_per_example(case, case.x, case.g)
        return _noisy_scaled_sums(case, [gw] if gb is None else [gw, gb], generator)

    return {"step": step}


def torch_func_provider(case: Case) -> dict[str, Callable]:
    from torch.func import functional_call, grad, vmap

    layer = case.layer
    ws = case.weight_shape
    if case.conv_args is None:
        module = nn.Linear(ws[1], ws[0], bias=case.bias)
    else:
        module = nn.Conv2d(ws[1] * layer["groups"], ws[0], ws[2:], stride=layer["stride"],
                           padding=layer["padding"], dilation=layer["dilation"], groups=layer["groups"],
                           bias=case.bias)
    module = module.to(device=case.device, dtype=case.dtype)
    params = {k: v.detach() for k, v in module.named_parameters()}
    generator = torch.Generator(device=case.device).manual_seed(SEED)

    def example_loss(p, xi, gi):
        return (functional_call(module, p, (xi.unsqueeze(0),)) * gi.unsqueeze(0)).sum()

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def step():
        grads = per_example(params, case.x, case.g)
        return _noisy_scaled_sums(case, list(grads.values()), generator)

    return {"step": step}


def pytorch_ops_provider(case: Case) -> dict[str, Callable]:
    """The same two ops through their pure-PyTorch implementations (the path without the compiled
    extension), same route: on CPU, the C++ kernels against PyTorch."""
    impls = per_sample.TORCH_IMPLS
    x, g, bias = case.x, case.g, case.bias
    w_offset, b_offset = 0, case.weight_numel
    if case.conv_args is None:
        route = ops.choose_route(x.shape[1], x.shape[2], g.shape[2])

        def norms():
            return impls["linear_weight_sq_norms"](x, g, route, bias)

        def clipped_sum(scale, noise_std=NOISE_STD):
            return impls["linear_clipped_sum_with_noise"](x, g, scale, bias, SEED, w_offset, b_offset, noise_std)
    else:
        args = case.conv_args
        ws, groups = args[0], args[4]
        route = ops.choose_route(math.prod(g.shape[2:]), math.prod(ws[1:]), ws[0] // groups)

        def norms():
            return impls["conv_weight_sq_norms"](x, g, *args, route, bias)

        def clipped_sum(scale, noise_std=NOISE_STD):
            return impls["conv_clipped_sum_with_noise"](x, g, scale, *args, bias, SEED, w_offset, b_offset,
                                                        noise_std)

    def total_sq_norms():
        w_sq, b_sq = norms()
        return w_sq + b_sq if bias else w_sq

    def step():
        return clipped_sum(clip_factors(total_sq_norms(), case.clip_norm))

    return {"step": step}


PROVIDERS = {"dpsat_fast": dpsat_fast_provider, "materialized": materialized_provider,
             "torch_func": torch_func_provider, "pytorch_ops": pytorch_ops_provider}
# ratios other/dpsat_fast recorded per layer and in the summary
BASELINES = ("materialized", "torch_func", "pytorch_ops")


def estimate_gib(case: Case, provider: str) -> float:
    """Rough peak of temporaries (GiB) of one step beyond x and g; used only for the --max-gib skip."""
    B, el = case.B, case.x.element_size()
    layer = case.layer
    T, D = layer["T"], layer["D"]
    groups = layer.get("groups", 1)
    per_example = B * case.weight_numel
    unfolded = B * groups * D * T if case.conv_args is not None else 0
    g_bytes = case.g.numel() * 4
    if provider == "materialized":
        total = unfolded * el * 2 + per_example * (el + 8)
    elif provider == "torch_func":
        total = per_example * (2 * el + 8) + (case.x.numel() + case.g.numel()) * el * 2
    else:
        chunk = 1 << 24  # dpsat_fast.ops.torch_impl._CHUNK_ELEMENTS; the Triton path needs less
        route = layer["route_flop_model"] if T > 1 else "ghost"
        if route == "ghost":
            norms = unfolded * 4 + max(chunk, T * T) * 4 * 3
        else:
            norms = max(chunk, case.weight_numel) * 4 * 2
        total = norms + g_bytes * 2 + case.x.numel() * 4 + case.weight_numel * 8
    return total / GIB


# ------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up_ms(fn: Callable[[], Any], device: torch.device, calls: int = 2) -> float:
    """Run ``fn`` ``calls`` times untimed (lazy initialization, allocator caches); the last call's ms."""
    ms = 0.0
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        ms = (time.perf_counter() - start) * 1e3
    return ms


def time_all_ms(fns: dict[str, Callable[[], Any]], device: torch.device, args: argparse.Namespace
                ) -> dict[str, dict[str, Any]]:
    """Median time in ms of each (already warmed-up) function.

    CUDA: ``triton.testing.do_bench`` per function. CPU: ``--cpu-rounds`` rounds that visit every function
    in turn, each visit one ``torch.utils.benchmark.Timer.timeit(number)`` block of about
    ``--cpu-block-s`` seconds (at least one call); interleaving makes background load on a shared machine
    hit all providers alike, so the ratios of one run stay comparable."""
    if device.type == "cuda":
        from triton.testing import do_bench

        out = {}
        for label, fn in fns.items():
            times = [float(t) for t in do_bench(fn, warmup=args.cuda_warmup_ms, rep=args.cuda_rep_ms,
                                                return_mode="all")]
            out[label] = {"ms": statistics.median(times), "samples": len(times)}
        return out
    from torch.utils.benchmark import Timer

    timers, numbers, samples = {}, {}, {label: [] for label in fns}
    for label, fn in fns.items():
        estimate_ms = max(_warm_up_ms(fn, device, calls=1), 1e-3)
        numbers[label] = max(1, int(args.cpu_block_s * 1e3 / estimate_ms))
        timers[label] = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    for _ in range(args.cpu_rounds):
        for label, timer in timers.items():
            samples[label].append(timer.timeit(numbers[label]).median * 1e3)
    return {label: {"ms": statistics.median(times), "samples": len(times), "number_per_sample": numbers[label],
                    "min_ms": min(times), "max_ms": max(times)}
            for label, times in samples.items()}


# ------------------------------------------------------------------------------------------------------
# one layer
# ------------------------------------------------------------------------------------------------------


def measured_route(case: Case) -> str | None:
    """The route dpsat_fast resolved for this call: on CUDA the one its per-shape timing picked (looked up
    in its cache), elsewhere the FLOP model."""
    if case.device.type != "cuda":
        return case.layer["route_flop_model"] if case.layer["T"] > 1 else "ghost"
    try:
        from dpsat_fast.ops import per_sample

        x = case.x
        if case.conv_args is None:
            key = ("linear", x.shape[0], x.shape[1], x.shape[2], case.g.shape[2], x.dtype)
        else:
            ws, stride, padding, dilation, groups = case.conv_args
            key = ("conv", tuple(x.shape), tuple(ws), tuple(stride), tuple(padding), tuple(dilation), groups,
                   x.dtype)
        return per_sample._measured_routes.get(key, "ghost" if case.layer["T"] == 1 else None)
    except Exception:  # noqa: BLE001 - informational only
        return None


def verify_case(case: Case, k: int, rtol: float) -> dict[str, Any]:
    """dpsat_fast norms and noiseless clipped sum of the benchmarked call vs fp64 materialized gradients of
    the first ``k`` examples (the clip factors of the others are set to 0)."""
    fns = dpsat_fast_provider(case)
    sq = fns["norms"]().double()
    k = min(k, case.B)
    gw, gb = materialized_per_example(case, case.x[:k].double(), case.g[:k].double())
    ref_sq = gw.reshape(k, -1).pow(2).sum(1) + (gb.pow(2).sum(1) if gb is not None else 0)
    norms_err = float(((sq[:k] - ref_sq).abs() / ref_sq.abs().clamp(min=1e-30)).max())
    scale = torch.zeros(case.B, device=case.device)
    scale[:k] = torch.linspace(0.25, 1.0, k, device=case.device)
    w, b = fns["clipped_sum"](scale, noise_std=0.0)
    ref_w = torch.tensordot(scale[:k].double(), gw, dims=1)
    sum_err = float((w.double() - ref_w).norm() / ref_w.norm().clamp(min=1e-30))
    if gb is not None:
        ref_b = torch.tensordot(scale[:k].double(), gb, dims=1)
        sum_err = max(sum_err, float((b.double() - ref_b).norm() / ref_b.norm().clamp(min=1e-30)))
    return {"examples": k, "rtol": rtol, "norms_max_rel_err": norms_err, "sum_rel_err": sum_err,
            "ok": norms_err <= rtol and sum_err <= rtol}


def run_layer(layer: dict[str, Any], args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype) -> dict[str, Any]:
    row = {k: v for k, v in layer.items()}
    row.update(batch=args.batch, dtype=args.dtype, providers={})
    case = Case(layer, args.batch, device, dtype)
    try:
        sq = dpsat_fast_provider(case)["norms"]()
        case.clip_norm = float(sq.sqrt().median())
        row["clip_norm"] = case.clip_norm
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    row["route"] = measured_route(case)

    fns: dict[str, Callable[[], Any]] = {}
    for provider in args.providers:
        entry: dict[str, Any] = {"est_gib": round(estimate_gib(case, provider), 4)}
        row["providers"][provider] = entry
        if entry["est_gib"] > args.max_gib:
            entry["skipped"] = f"estimated {entry['est_gib']:.2f} GiB > --max-gib {args.max_gib}"
            continue
        try:
            provider_fns = PROVIDERS[provider](case)
            if device.type == "cuda":
                _synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                provider_fns["step"]()
                _synchronize(device)
                entry["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            _warm_up_ms(provider_fns["step"], device)
            fns[provider] = provider_fns["step"]
            if provider == "dpsat_fast":
                scale = clip_factors(provider_fns["norms"](), case.clip_norm)
                fns["dpsat_fast:norms"] = provider_fns["norms"]
                fns["dpsat_fast:clipped_sum"] = functools.partial(provider_fns["clipped_sum"], scale)
        except torch.cuda.OutOfMemoryError as exc:
            entry["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0]}"
        except Exception as exc:  # noqa: BLE001 - a failing provider must not stop the run
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            provider_fns = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    try:
        timings = time_all_ms(fns, device, args)
        for label, stats in timings.items():
            provider, _, part = label.partition(":")
            if part:
                row["providers"][provider][f"{part}_ms"] = stats["ms"]
            else:
                row["providers"][provider].update(stats)
    except Exception as exc:  # noqa: BLE001
        row["timing_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    fns.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    base = row["providers"].get("dpsat_fast", {}).get("ms")
    for provider in BASELINES:
        ms = row["providers"].get(provider, {}).get("ms")
        row[f"{provider}/dpsat_fast"] = ms / base if ms and base else None

    if args.verify and "error" not in row:
        try:
            row["verify"] = verify_case(case, args.verify_examples,
                                        1e-4 if dtype == torch.float32 else 1e-2)
        except Exception as exc:  # noqa: BLE001
            row["verify"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return row


# ------------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: median over layers of each ratio, and totals over the model's layers (each distinct layer
    weighted by its occurrences) on the layers where all three providers ran."""
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        entry: dict[str, Any] = {"layers": len(mrows)}
        for ratio in (f"{b}/dpsat_fast" for b in BASELINES):
            values = [r[ratio] for r in mrows if r.get(ratio)]
            entry[f"median {ratio}"] = statistics.median(values) if values else None
            entry[f"min {ratio}"] = min(values) if values else None
            entry[f"max {ratio}"] = max(values) if values else None
        ran = [p for p in PROVIDER_NAMES if any(p in r["providers"] for r in mrows)]
        complete = [r for r in mrows if all(p in r["providers"] and r["providers"][p].get("ms") for p in ran)]
        if complete and "dpsat_fast" in ran:
            totals = {p: sum(r["providers"][p]["ms"] * r["count"] for r in complete) for p in ran}
            entry["weighted_total_ms"] = totals
            entry["weighted_total_layers"] = len(complete)
            for b in BASELINES:
                if b in totals:
                    entry[f"total {b}/dpsat_fast"] = totals[b] / totals["dpsat_fast"]
        verified = [r["verify"] for r in mrows if "verify" in r]
        if verified:
            entry["verified_layers"] = len(verified)
            entry["verify_all_ok"] = all(v.get("ok") for v in verified)
        summary[model] = entry
    return summary


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "layer", "shape", "n", "T", "D", "P", "route", "dpsat ms", "norms", "sum",
              "mat ms", "tfunc ms", "pt ms", "mat/dp", "tf/dp", "pt/dp", "verify")

    def ms(row, provider, key="ms"):
        entry = row["providers"].get(provider)
        if entry is None:
            return "-"
        if "skipped" in entry:
            return "skip"
        if "error" in entry:
            return "err"
        return f"{entry[key]:.3g}" if entry.get(key) is not None else "-"

    def ratio(value):
        return "-" if value is None else f"{value:.2f}"

    lines = [header]
    for r in rows:
        v = r.get("verify")
        verify = "-" if v is None else ("ok" if v.get("ok") else "FAIL")
        lines.append((r["model"], r["layer"], describe(r), str(r["count"]), str(r["T"]), str(r["D"]),
                      str(r["P"]), str(r["route"]), ms(r, "dpsat_fast"), ms(r, "dpsat_fast", "norms_ms"),
                      ms(r, "dpsat_fast", "clipped_sum_ms"), ms(r, "materialized"), ms(r, "torch_func"),
                      ms(r, "pytorch_ops"), ratio(r.get("materialized/dpsat_fast")),
                      ratio(r.get("torch_func/dpsat_fast")), ratio(r.get("pytorch_ops/dpsat_fast")), verify))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def collect_metadata(device: torch.device, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    metadata = throughput.collect_metadata(device, torch.get_num_threads(), argv, script="bench/bench_kernels.py")
    metadata.update({
        "dtype": args.dtype,
        "batch": args.batch,
        "kernel_backend": ops.kernel_backend(),
        "ops_path": "triton" if device.type == "cuda" and ops.use_triton(torch.empty(0, device=device))
        else "torch",
        "noise_std": NOISE_STD,
        "loadavg_1_5_15min_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timing": ({"timer": "triton.testing.do_bench", "warmup_ms": args.cuda_warmup_ms,
                    "rep_ms": args.cuda_rep_ms} if device.type == "cuda" else
                   {"timer": "torch.utils.benchmark.Timer.timeit, providers interleaved",
                    "rounds": args.cpu_rounds, "block_s": args.cpu_block_s}),
    })
    return metadata


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=list(MODEL_NAMES))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDER_NAMES), choices=PROVIDER_NAMES)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on cuda, 8 on cpu")
    parser.add_argument("--max-layers", type=int, default=None, help="first N distinct layers per model")
    parser.add_argument("--max-gib", type=float, default=8.0,
                        help="skip a provider on a layer whose estimated temporaries exceed this (GiB)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads (default: {DEFAULT_CPU_THREADS} on cpu, torch's on cuda)")
    parser.add_argument("--cpu-rounds", type=int, default=7,
                        help="cpu: timed rounds over all providers of a layer (median reported)")
    parser.add_argument("--cpu-block-s", type=float, default=0.05,
                        help="cpu: target seconds of one timeit block (at least one call)")
    parser.add_argument("--cuda-warmup-ms", type=float, default=25.0, help="do_bench warmup budget")
    parser.add_argument("--cuda-rep-ms", type=float, default=100.0, help="do_bench measurement budget")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check dpsat_fast norms and clipped sums against fp64 materialized gradients")
    parser.add_argument("--verify-examples", type=int, default=2, help="examples checked per layer")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for results and metadata")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch is None:
        args.batch = DEFAULT_BATCH[args.device]
    if args.threads is None:
        args.threads = DEFAULT_CPU_THREADS if args.device == "cpu" else torch.get_num_threads()
    if args.batch < 1:
        parser.error("--batch must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    layers = []
    for model in args.models:
        layers.extend(model_layers(model)[:args.max_layers])
    rows = []
    for i, layer in enumerate(layers):
        start = time.perf_counter()
        row = run_layer(layer, args, device, dtype)
        rows.append(row)
        print(f"[{i + 1}/{len(layers)}] {row['model']} {row['layer']} ({describe(row)}): "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    metadata = {**collect_metadata(device, args, argv), "loadavg_1_5_15min_at_start": load_at_start}
    result = {"metadata": metadata, "results": rows, "summary": summarize(rows)}
    print(format_table(rows))
    print()
    for model, entry in result["summary"].items():
        parts = [f"{k} {v:.2f}" for k, v in entry.items() if k.startswith(("median", "total")) and v]
        print(f"{model}: " + ", ".join(parts))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
