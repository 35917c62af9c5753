"""DP-SGD vs DP-SAT vs DP-SAM on scikit-learn's digits with the small GroupNorm CNN.

Same hyperparameters for every method (those of `python -m dpsat_fast.train`) except ρ (0 for DP-SGD);
σ calibrated per method so that ε ≤ target at δ = 1e-5 after all steps (DP-SAM pays two compositions per
step, so it gets a larger σ). Writes mean ± std of test accuracy and wall time over seeds.

    python bench/dpsat_digits.py --seeds 0 1 2 3 4 --epsilons 1 3 8 --rho 0.05
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch

import dpsat_fast
from dpsat_fast.train import METHOD_NAMES, parse_args, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--methods", nargs="+", default=["dpsgd", "dpsat", "dpsam"])
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--out", default="bench/results/dpsat_digits")
    args = p.parse_args()
    torch.set_num_threads(2)
    runs = []
    for eps in args.epsilons:
        for method in args.methods:
            for seed in args.seeds:
                r = train(parse_args(["--method", method, "--rho", str(args.rho), "--target-epsilon", str(eps),
                                      "--seed", str(seed), "--no-progress"]))
                runs.append({"target_epsilon": eps, "seed": seed, **r})
    summary = []
    for eps in args.epsilons:
        for method in args.methods:
            rs = [r for r in runs if r["target_epsilon"] == eps and r["method"] == method]
            acc, sec = [r["test_accuracy"] for r in rs], [r["seconds"] for r in rs]
            summary.append({"target_epsilon": eps, "method": method, "rho": rs[0]["rho"],
                            "noise_multiplier": rs[0]["noise_multiplier"], "epsilon": rs[0]["epsilon"],
                            "accuracy_mean": statistics.fmean(acc), "accuracy_std": statistics.stdev(acc),
                            "seconds_mean": statistics.fmean(sec), "seconds_std": statistics.stdev(sec),
                            "seeds": len(rs)})
    meta = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
            "dpsat_fast": dpsat_fast.__version__, "python": platform.python_version(), "threads": 2,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python bench/dpsat_digits.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if k != "out"),
            "defaults": {k: v for k, v in vars(parse_args([])).items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"metadata": meta, "summary": summary, "runs": runs}, indent=1))
    lines = ["| ε (δ=1e-5) | method | ρ | σ | test accuracy (mean ± std) | wall time s (mean ± std) |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['target_epsilon']:g} | {METHOD_NAMES[s['method']]} | {s['rho']:g} | {s['noise_multiplier']:.3f} "
                     f"| {s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} | {s['seconds_mean']:.1f} ± {s['seconds_std']:.1f} |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(f"{meta['command']}\n\n{len(args.seeds)} seeds, CPU ({meta['device']}), "
                                      f"torch {meta['torch']}, {meta['date']}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
