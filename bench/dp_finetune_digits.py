"""Issue 6 experiments on the bundled digits: a public/private class split, private fine-tuning.

Setting: the digits' classes 0-4 are public: a DigitsCNN is pretrained on them without privacy (plain SGD,
per seed). Classes 5-9 are private: the pretrained model is fine-tuned on them with DP-SAT through the
training command (``dpsat_fast.train``), and test accuracy and ECE are measured on the held-out examples of
classes 5-9. Every configuration runs for each seed (``--seeds``, ≥ 5), and the table reports mean ± std.

Studies (``--studies``):

* ``clipping``: accuracy and ECE against the clipping norm C and the style (flat, automatic, per-layer),
  at ε = 3, with lr·C fixed (lr = ``--lr``/C: the clipped gradient scales with C, so the same step size).
* ``selection``: full fine-tuning against selected layers (norms + head, last 2 blocks, head only, biases)
  at ε ∈ {1, 3}.
* ``pruning``: accuracy against the magnitude pre-pruning rate, and against gradient dropping (keep
  fraction), at ε = 3, fine-tuning everything.
* ``pruning_grid``: pre-pruning rate 0 / 50 / 80 % each without and with gradient dropping (keep 50 % of the
  unpruned coordinates per step).

Usage::

    python bench/dp_finetune_digits.py --seeds 0 1 2 3 4 --out bench/results/dp_finetune_digits.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

try:
    import dpsat_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpsat_fast.models import DigitsCNN
from dpsat_fast.train import evaluate_metrics, load_digits_split, parse_args, restrict_to_classes, train

PUBLIC, PRIVATE = "0-4", "5-9"


def pretrain(seed: int, path: Path, epochs: int = 30) -> Dict[str, float]:
    """Non-private training on the public classes 0-4 (SGD, momentum 0.9, batch 64); writes the state_dict."""
    torch.manual_seed(1000 + seed)
    train_set, test_set = load_digits_split(seed)
    train_set = restrict_to_classes(train_set, range(5))
    test_set = restrict_to_classes(test_set, range(5))
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train_set.tensors
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.save(model.state_dict(), path)
    return evaluate_metrics(model, test_set)


def configurations(studies: List[str]) -> List[Dict[str, Any]]:
    configs = []
    if "clipping" in studies:
        for style in ("flat", "automatic", "per_layer"):
            for C in (0.1, 1.0, 10.0):
                configs.append({"study": "clipping", "clipping": style, "max_grad_norm": C, "epsilon": 3.0,
                                "trainable": "all", "lr_scale": 1.0 / C})
    if "selection" in studies:
        for eps in (1.0, 3.0):
            for trainable in ("all", "norms+head", "last:2", "head", "bias"):
                configs.append({"study": "selection", "clipping": "flat", "max_grad_norm": 1.0, "epsilon": eps,
                                "trainable": trainable})
    if "pruning" in studies:
        for rate in (0.0, 0.5, 0.8, 0.9):
            configs.append({"study": "pruning", "clipping": "flat", "max_grad_norm": 1.0, "epsilon": 3.0,
                            "trainable": "all", "prune": rate})
        for keep in (0.5, 0.2, 0.1):
            configs.append({"study": "pruning", "clipping": "flat", "max_grad_norm": 1.0, "epsilon": 3.0,
                            "trainable": "all", "grad_keep": keep})
    if "pruning_grid" in studies:
        for rate in (0.0, 0.5, 0.8):
            for keep in (1.0, 0.5):
                configs.append({"study": "pruning_grid", "clipping": "flat", "max_grad_norm": 1.0, "epsilon": 3.0,
                                "trainable": "all", "prune": rate, "grad_keep": keep if keep < 1 else None})
    return configs


def run(config: Dict[str, Any], seed: int, checkpoint: Path, epochs: int, lr: float) -> Dict[str, Any]:
    argv = ["--no-progress", "--classes", PRIVATE, "--checkpoint", str(checkpoint), "--seed", str(seed),
            "--epochs", str(epochs), "--lr", str(lr * config.get("lr_scale", 1.0)), "--batch-size", "64",
            "--physical-batch-size", "64",
            "--target-epsilon", str(config["epsilon"]), "--clipping", config["clipping"],
            "--max-grad-norm", str(config["max_grad_norm"]), "--trainable", config["trainable"]]
    if config.get("prune"):
        argv += ["--prune", str(config["prune"])]
    if config.get("grad_keep"):
        argv += ["--grad-keep", str(config["grad_keep"])]
    result = train(parse_args(argv))
    return {k: result[k] for k in ("test_accuracy", "test_ece", "epsilon", "noise_multiplier", "seconds")}


def label(config: Dict[str, Any]) -> str:
    parts = [f"{config['clipping']} C={config['max_grad_norm']:g}", f"ε={config['epsilon']:g}",
             f"train {config['trainable']}"]
    if config.get("lr_scale", 1.0) != 1.0:
        parts.append(f"lr×{config['lr_scale']:g}")
    if config.get("prune"):
        parts.append(f"pre-prune {config['prune']:.0%}")
    if config.get("grad_keep"):
        parts.append(f"grad keep {config['grad_keep']:.0%}")
    return ", ".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--studies", nargs="+", default=["clipping", "selection", "pruning"],
                   choices=["clipping", "selection", "pruning", "pruning_grid"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default=None)
    p.add_argument("--max-configs", type=int, default=None, help="only the first N configurations (smoke tests)")
    args = p.parse_args(argv)
    configs = configurations(args.studies)[:args.max_configs]
    rows = [dict(c, runs=[]) for c in configs]
    pretrained = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            ckpt = Path(tmp) / f"public_{seed}.pt"
            public = pretrain(seed, ckpt)
            # the pretrained model on the private classes before any private step (its head never saw them)
            pretrained.append({"seed": seed, "public_test_accuracy": public["accuracy"]})
            for row, config in zip(rows, configs):
                row["runs"].append(dict(seed=seed, **run(config, seed, ckpt, args.epochs, args.lr)))
            print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    lines = ["| study | configuration | test accuracy (mean ± std) | ECE (mean ± std) | σ |", "|---|---|---|---|---|"]
    for row in rows:
        acc = [r["test_accuracy"] for r in row["runs"]]
        ece = [r["test_ece"] for r in row["runs"]]
        row["accuracy_mean"], row["accuracy_std"] = statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0
        row["ece_mean"], row["ece_std"] = statistics.mean(ece), statistics.stdev(ece) if len(ece) > 1 else 0.0
        lines.append(f"| {row['study']} | {label(row)} | {row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} | "
                     f"{row['ece_mean']:.3f} ± {row['ece_std']:.3f} | {row['runs'][0]['noise_multiplier']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        from throughput import collect_metadata  # noqa: E402  (bench/ is on sys.path when run as a script)

        meta = collect_metadata(torch.device("cpu"), torch.get_num_threads(), list(argv or sys.argv[1:]),
                                script="bench/dp_finetune_digits.py")
        meta["setting"] = (f"DigitsCNN pretrained without privacy on public classes {PUBLIC} (30 epochs SGD), "
                           f"fine-tuned with DP-SAT (rho 0.05) on private classes {PRIVATE}, {args.epochs} epochs, "
                           f"batch 64, lr {args.lr}, delta 1e-5, PLD accountant")
        Path(args.out).write_text(json.dumps({"metadata": meta, "pretrained": pretrained, "rows": rows,
                                              "table": table}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
