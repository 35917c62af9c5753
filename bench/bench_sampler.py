"""Time of one Poisson sampling step (one batch of indices) of :class:`dpsat_fast.data.PoissonBatchSampler`.

Modes, each at N = 10^5, 10^6, 10^7 with q = 256/N (expected batch 256) and q = 0.01:

- ``secure``  the default: OS CSPRNG (``os.urandom``), exact rate ceil(q·2^53)/2^53.
- ``seeded``  the insecure reproducible mode (``insecure_seed=``): the same rule on bytes from a seeded
  ``torch.Generator``.
- ``torch_rand_fp32`` (reference only, not used by the library): the former ``torch.rand(N) < q`` on fp32's
  2^-24 grid with torch's Mersenne Twister, plus ``nonzero().tolist()``.
- ``os_urandom_only`` (reference): ``os.urandom(N)`` alone, the floor of the secure mode (one byte/example).

A step is ``next(iter(sampler))``: the random bytes, the lazy 53-bit comparison and the ``list`` of indices a
``DataLoader`` receives. Timing: ``time.perf_counter`` per step, median and minimum over ``--repeats`` steps
after one warm-up step; single process, CPU.

Usage::

    python bench/bench_sampler.py --out bench/results/sampler_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpsat_fast.data import InsecureSamplingWarning, PoissonBatchSampler  # noqa: E402
from throughput import collect_metadata  # noqa: E402

MODES = ("secure", "seeded", "torch_rand_fp32", "os_urandom_only")


def make_step(mode: str, n: int, q: float) -> Callable[[], list[int] | bytes]:
    if mode == "secure":
        sampler = PoissonBatchSampler(n, q, steps=1)
        assert sampler.secure
        return lambda: next(iter(sampler))
    if mode == "seeded":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureSamplingWarning)
            sampler = PoissonBatchSampler(n, q, steps=1, insecure_seed=0)
        return lambda: next(iter(sampler))
    if mode == "torch_rand_fp32":
        g = torch.Generator().manual_seed(0)
        return lambda: (torch.rand(n, generator=g) < q).nonzero().flatten().tolist()
    if mode == "os_urandom_only":
        return lambda: os.urandom(n)
    raise ValueError(mode)


def time_step(step: Callable[[], Any], repeats: int) -> dict[str, Any]:
    step()  # warm-up
    times, sizes = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        if isinstance(out, list):
            sizes.append(len(out))
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "repeats": repeats,
        "mean_batch_size": statistics.mean(sizes) if sizes else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    rows = []
    for n in args.sizes:
        for q_label, q in (("256/N", 256 / n), ("0.01", 0.01)):
            for mode in args.modes:
                if mode == "os_urandom_only" and q_label != "256/N":
                    continue  # independent of q
                row = {"N": n, "q": q, "q_label": q_label, "mode": mode,
                       **time_step(make_step(mode, n, q), args.repeats)}
                rows.append(row)
                print(f"N={n:>9,} q={q_label:<6} {mode:<16} {row['median_ms']:9.2f} ms (min {row['min_ms']:.2f})",
                      file=sys.stderr, flush=True)
    header = f"| N | q | {' | '.join(args.modes)} |"
    lines = [header, "|" + "---|" * (2 + len(args.modes))]
    for n in args.sizes:
        for q_label in ("256/N", "0.01"):
            cells = []
            for mode in args.modes:
                r = [x for x in rows if x["N"] == n and x["q_label"] == q_label and x["mode"] == mode]
                cells.append(f"{r[0]['median_ms']:.2f}" if r else "—")
            lines.append(f"| {n:,} | {q_label} | {' | '.join(cells)} |")
    table = "median ms per step\n" + "\n".join(lines)
    print(table)
    metadata = collect_metadata(torch.device("cpu"), torch.get_num_threads(), argv, script="bench/bench_sampler.py")
    metadata.update({
        "numpy": np.__version__,
        "loadavg_1_5_15min_at_start": load_at_start,
        "loadavg_1_5_15min_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timing": {"timer": "time.perf_counter per step (next(iter(sampler)))", "warmup_steps": 1,
                   "repeats": args.repeats, "statistic": "median (min also given)"},
    })
    result = {"metadata": metadata, "results": rows, "table": table}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
