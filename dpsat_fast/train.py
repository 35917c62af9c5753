"""Private training of a small GroupNorm CNN on scikit-learn's bundled digits (8×8, 10 classes).

    python -m dpsat_fast.train --target-epsilon 3 --epochs 20 --method dpsat --rho 0.05

``--dataset mnist1d`` trains the 135K-parameter GroupNorm 1-D CNN (``models.MNIST1DCNN``) on MNIST-1D
(Greydanus, 2020), generated locally by the ``mnist1d`` package from its templates (nothing is downloaded)
with ``--n-train``/``--n-val``/``--n-test`` examples and ``--data-seed``; the generation parameters are in
the result. ``--n-val`` examples are held out of training for model selection (validation metrics are
reported next to the test metrics).

DP-SAT by default (--method dpsgd or dpsam for the baselines). Poisson sampling with rate q = batch_size / N, σ calibrated so that ε ≤ target after all steps (or given
with --noise-multiplier), clipping at --max-grad-norm (--clipping flat, automatic or per_layer), noise added
once per logical batch, logical batches split into physical micro-batches of at most --physical-batch-size
examples. Prints a progress bar per epoch and, at the end, test accuracy, expected calibration error (ECE,
15 bins) and the ε spent (PLD accountant by default).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm import tqdm

from .clipping import STYLES
from .data import PoissonDataLoader, split_micro_batches
from .diagnostics import step_diagnostics
from .metrics import expected_calibration_error
from .models import MNIST1DCNN, DigitsCNN
from .optim import DPSAT
from .privacy_engine import PrivacyEngine
from .pruning import CombinedSparsity, GradientDropping, MagnitudePrePruning
from .selection import parse_selection, select_trainable
from .validation import check_delta


METHOD_NAMES = {"dpsat": "DP-SAT", "dpsgd": "DP-SGD", "dpsam": "DP-SAM"}
DATASETS = ("digits", "mnist1d")
MNIST1D_SIZES = {"n_train": 40_000, "n_val": 5_000, "n_test": 10_000}
"""Default MNIST-1D split sizes of the training command (the package's own default is 4,000 / 1,000)."""


def parse_classes(spec: Optional[str]) -> Optional[List[int]]:
    """``"5,6,7"`` or ``"5-9"`` -> sorted class list; None -> all classes."""
    if spec is None:
        return None
    classes = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        classes.update(range(int(lo), int(hi or lo) + 1))
    if not classes or min(classes) < 0 or max(classes) > 9:
        raise ValueError(f"classes must be digits 0-9, got {spec!r}")
    return sorted(classes)


def restrict_to_classes(dataset: TensorDataset, classes: Optional[Sequence[int]]) -> TensorDataset:
    if classes is None:
        return dataset
    x, y = dataset.tensors
    keep = torch.isin(y, torch.tensor(list(classes)))
    return TensorDataset(x[keep], y[keep])


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's digits as float tensors [N, 1, 8, 8] in [0, 1], split deterministically by ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def mnist1d_generation_args(n_samples: int, train_split: float, seed: int = 42, **overrides) -> Dict[str, Any]:
    """The ``mnist1d`` package's generation parameters (``mnist1d.data.get_dataset_args()``, its defaults:
    template length 12, padding [36, 60], scale 0.4, translation 48, correlated noise 0.25, iid noise 0.02,
    shear 0.75, 40 samples per signal) with ``num_samples``, ``train_split`` and ``seed`` set; the download
    URL is dropped (nothing is fetched)."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    unknown = sorted(set(overrides) - set(args))
    if unknown:
        raise ValueError(f"unknown MNIST-1D generation parameters {unknown}; known: {sorted(args)}")
    args.update(overrides, num_samples=int(n_samples), train_split=float(train_split), seed=int(seed))
    return args


def _default_cache_dir() -> Optional[Path]:
    spec = os.environ.get("DPSAT_FAST_DATA_CACHE")
    if spec is not None:
        return None if spec.lower() in ("", "none", "off") else Path(spec)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpsat_fast"


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(generation_json: str, cache_dir: Optional[str]) -> Tuple[torch.Tensor, ...]:
    """(x_train_pool, y_train_pool, x_test, y_test) for these generation parameters: from the cache file if
    it holds exactly these parameters, else generated with ``mnist1d.data.make_dataset`` (a pure function of
    them: numpy's legacy global RNG seeded from ``seed``; about 0.5 ms per example on one core)."""
    import numpy as np

    generation = json.loads(generation_json)
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(generation_json.encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"mnist1d_{key}.npz"
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as f:
                    if str(f["generation"]) == generation_json:
                        return tuple(torch.from_numpy(f[k].copy()) for k in ("x", "y", "x_test", "y_test"))
            except (OSError, ValueError, KeyError):
                pass  # unreadable or another generation: regenerate and overwrite
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset seeds numpy's and Python's global RNGs: restore them afterwards (no side effect on the caller)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(ObjectView(dict(generation)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (data["x"].astype(np.float32), data["y"].astype(np.int64),
              data["x_test"].astype(np.float32), data["y_test"].astype(np.int64))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, x=arrays[0], y=arrays[1], x_test=arrays[2], y_test=arrays[3],
                     generation=np.array(generation_json))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the regeneration
    return tuple(torch.from_numpy(a) for a in arrays)


def load_mnist1d_split(n_train: int = MNIST1D_SIZES["n_train"], n_val: int = MNIST1D_SIZES["n_val"],
                       n_test: int = MNIST1D_SIZES["n_test"], data_seed: int = 42,
                       cache_dir: Optional[os.PathLike] = "default", **generation_overrides):
    """MNIST-1D as float tensors ``[N, 1, 40]`` (standardized by the package) and labels, split into
    ``(train, validation, test, info)``.

    The ``mnist1d`` package generates ``n_train + n_val + n_test`` examples (rounded up to a multiple of 10: it
    makes the same number per class) with seed ``data_seed``, shuffles them and cuts its test split at
    ``train_split``; the validation examples are the last ``n_val`` of its training part. The split depends on
    the generation parameters only (not on ``--seed``), so every run and method sees the same examples.
    ``info`` records the generation parameters and sizes. ``cache_dir``: where the generated arrays are kept
    (``"default"``: ``$DPSAT_FAST_DATA_CACHE`` or ``~/.cache/dpsat_fast``; ``None``: no file)."""
    if n_train < 1 or n_val < 0 or n_test < 1:
        raise ValueError(f"MNIST-1D sizes must be n_train >= 1, n_val >= 0, n_test >= 1; got {n_train}, {n_val}, "
                         f"{n_test}")
    pool = n_train + n_val
    total = -(-(pool + n_test) // 10) * 10
    generation = mnist1d_generation_args(total, pool / total, data_seed, **generation_overrides)
    if int(total * generation["train_split"]) != pool:  # the package cuts at int(N · train_split)
        generation["train_split"] = (pool + 0.5) / total
    cache = _default_cache_dir() if cache_dir == "default" else cache_dir
    x, y, x_test, y_test = _mnist1d_arrays(json.dumps(generation, sort_keys=True),
                                           None if cache is None else str(cache))
    assert len(y) == pool, (len(y), pool)
    x, x_test = x.unsqueeze(1), x_test.unsqueeze(1)
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:], y[n_train:])
    test = TensorDataset(x_test[:n_test], y_test[:n_test])
    info = {"name": "mnist1d", "n_train": n_train, "n_val": n_val, "n_test": n_test, "generation": generation,
            "split": "package generation shuffled by its seed; test = its test split (first n_test), validation = "
                     "the last n_val of its training split, train = the rest"}
    return train, val, test, info


def load_dataset(args: argparse.Namespace):
    """``(train, validation or None, test, info)`` for the command's ``--dataset`` and size options."""
    if args.dataset == "mnist1d":
        sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in MNIST1D_SIZES.items()}
        return load_mnist1d_split(**sizes, data_seed=args.data_seed,
                                  cache_dir="default" if args.data_cache is None else (
                                      None if args.data_cache.lower() == "none" else args.data_cache))
    train_set, test_set = load_digits_split(args.seed)
    n_val = args.n_val or 0
    if args.n_train is not None or args.n_test is not None:
        raise ValueError("--n-train and --n-test are MNIST-1D options (digits: a fixed 80/20 split by --seed)")
    if not 0 <= n_val < len(train_set):
        raise ValueError(f"--n-val must be in [0, {len(train_set)}) on digits, got {n_val}")
    x, y = train_set.tensors
    val_set = TensorDataset(x[len(y) - n_val:], y[len(y) - n_val:]) if n_val else None
    train_set = TensorDataset(x[:len(y) - n_val], y[:len(y) - n_val])
    info = {"name": "digits", "n_train": len(train_set), "n_val": n_val, "n_test": len(test_set),
            "split": f"scikit-learn digits, 80/20 split permuted by --seed {args.seed}; validation = the last n_val "
                     f"of the training part"}
    return train_set, val_set, test_set, info


@torch.no_grad()
def evaluate_metrics(model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 4096) -> Dict[str, float]:
    """Test accuracy and expected calibration error (15 bins) of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    x, y = dataset.tensors
    probs = torch.cat([model(xb).softmax(1) for xb in x.split(batch_size)]) if len(y) else torch.zeros(0, 10)
    model.train(was_training)
    return {"accuracy": (probs.argmax(1) == y).float().mean().item(),
            "ece": expected_calibration_error(probs, y)}


def evaluate(model: torch.nn.Module, dataset: TensorDataset) -> float:
    return evaluate_metrics(model, dataset)["accuracy"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpsat_fast.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits (scikit-learn's 8×8, DigitsCNN; default) or mnist1d (generated locally by the mnist1d "
                        "package, the 135K-parameter MNIST1DCNN)")
    p.add_argument("--n-train", type=int, default=None,
                   help=f"MNIST-1D training examples (default {MNIST1D_SIZES['n_train']})")
    p.add_argument("--n-val", type=int, default=None,
                   help=f"validation examples held out of training (MNIST-1D default {MNIST1D_SIZES['n_val']}; "
                        f"digits default 0: taken from its training split)")
    p.add_argument("--n-test", type=int, default=None,
                   help=f"MNIST-1D test examples (default {MNIST1D_SIZES['n_test']})")
    p.add_argument("--data-seed", type=int, default=42,
                   help="MNIST-1D generation seed (the package's default 42); fixes the data and its split")
    p.add_argument("--data-cache", default=None,
                   help="directory for the generated MNIST-1D arrays (default $DPSAT_FAST_DATA_CACHE or "
                        "~/.cache/dpsat_fast; 'none': regenerate every time)")
    p.add_argument("--method", choices=["dpsat", "dpsgd", "dpsam"], default="dpsat",
                   help="DP-SAT (default), plain DP-SGD, or the two-query DP-SAM baseline")
    p.add_argument("--rho", type=float, default=0.05, help="perturbation radius ρ of DP-SAT / DP-SAM")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="expected (logical) batch size q·N")
    p.add_argument("--physical-batch-size", type=int, default=64, help="max examples per forward/backward")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C")
    p.add_argument("--clipping", choices=STYLES, default="flat",
                   help="flat (one norm), automatic (normalization C/(‖g‖+0.01)) or per_layer (budget C/√L per layer)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-epsilon", type=float, default=3.0)
    g.add_argument("--noise-multiplier", type=float, default=None, help="σ (instead of --target-epsilon)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", choices=["pld", "rdp"], default="pld")
    p.add_argument("--checkpoint", default=None,
                   help="start from these weights: a model state_dict, or a dpsat_fast checkpoint (its 'model')")
    p.add_argument("--trainable", default="all",
                   help="which parameters train (the rest is frozen and costs nothing): all, or '+'-joined "
                        "last:K, norms, head, bias, pattern:GLOB[,GLOB] (e.g. norms+head)")
    p.add_argument("--save-model", default=None, help="write the final model's state_dict here")
    p.add_argument("--prune", type=float, default=0.0,
                   help="magnitude pre-pruning: remove this fraction of the conv/linear weights (global threshold) "
                        "before private training; they stay zero and get no noise")
    p.add_argument("--grad-keep", type=float, default=1.0,
                   help="gradient dropping: each step update only this fraction of each weight tensor, chosen by "
                        "the previous noisy gradient (public); noise only on the kept coordinates (with --prune: "
                        "among the unpruned ones)")
    p.add_argument("--diagnostics", action="store_true",
                   help="print per-epoch NON-PRIVATE diagnostics (clipped fraction, norm quantiles of the last "
                        "batch, computed from private data; nothing extra is released)")
    p.add_argument("--classes", default=None,
                   help="train, validate and test on these classes only, e.g. 5,6,7,8,9 (the private half of a "
                        "public/private class split)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the data split and the model's initialization (public choices); the noise key and "
                        "the Poisson sampling always come from the OS unless --insecure-noise-seed is given")
    p.add_argument("--insecure-noise-seed", type=int, default=None,
                   help="INSECURE, NOT PRIVATE: fix the noise key and the Poisson sampling to this seed so that a run "
                        "can be reproduced exactly (experiments only: anyone who knows the seed can remove the noise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.noise_multiplier is not None:
        args.target_epsilon = None
    return args


def train(args: argparse.Namespace) -> Dict[str, float]:
    torch.manual_seed(args.seed)
    train_set, val_set, test_set, data_info = load_dataset(args)
    classes = parse_classes(args.classes)
    train_set, test_set = restrict_to_classes(train_set, classes), restrict_to_classes(test_set, classes)
    val_set = None if val_set is None or len(val_set) == 0 else restrict_to_classes(val_set, classes)
    n = len(train_set)
    sample_rate = args.batch_size / n
    steps_per_epoch = int(round(1 / sample_rate))
    total_steps = args.epochs * steps_per_epoch
    torch.manual_seed(args.seed)  # the same initialization whatever the data generation consumed
    model = MNIST1DCNN() if args.dataset == "mnist1d" else DigitsCNN()
    if args.checkpoint is not None:
        state = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(state["model"] if "model" in state and "format_version" in state else state)
    trainable = select_trainable(model, **parse_selection(args.trainable))
    methods = ([MagnitudePrePruning(model, args.prune)] if args.prune > 0 else []) + \
        ([GradientDropping(args.grad_keep)] if args.grad_keep < 1 else [])
    sparsity = None if not methods else methods[0] if len(methods) == 1 else CombinedSparsity(*methods)
    params = [p for p in model.parameters() if p.requires_grad]
    base = (torch.optim.SGD(params, lr=args.lr, momentum=args.momentum) if args.optimizer == "sgd"
            else torch.optim.Adam(params, lr=args.lr))
    insecure = args.insecure_noise_seed
    if insecure is not None:
        print(f"WARNING: --insecure-noise-seed {insecure}: the noise and the sampled batches are reproducible from "
              f"this seed; this run is NOT differentially private (experiments only)")
    loader = PoissonDataLoader(train_set, sample_rate=sample_rate, steps=steps_per_epoch,
                               insecure_seed=None if insecure is None else insecure + 1)
    if args.noise_multiplier is None:
        budget = dict(target_epsilon=args.target_epsilon, target_delta=args.delta, epochs=args.epochs)
    else:
        check_delta(args.delta, n)
        budget = dict(noise_multiplier=args.noise_multiplier)
    privacy_engine = PrivacyEngine(args.accountant)
    model, optimizer, loader = privacy_engine.make_private(
        module=model, optimizer=base, data_loader=loader, max_grad_norm=args.max_grad_norm, loss_reduction="mean",
        clipping=args.clipping, sparsity=sparsity,
        seed=insecure, sam_rho=0.0 if args.method == "dpsgd" else args.rho,
        sam_method="dpsam" if args.method == "dpsam" else "dpsat", **budget)
    engine, accountant, sigma = privacy_engine.engine, privacy_engine.accountant, optimizer.noise_multiplier
    print(f"{METHOD_NAMES[args.method]} on {args.dataset}: N={n}, q={sample_rate:.4f}, steps={total_steps}, σ={sigma:.4f}, "
          f"C={args.max_grad_norm} ({args.clipping}), δ={args.delta:g}, {sum(p.numel() for p in engine.params)} "
          f"trainable parameters in {len(trainable)} tensors ({args.trainable})")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress, leave=False)
        seen, loss_sum = 0, 0.0
        for batch in bar:
            def closure():
                nonlocal loss_sum, seen
                total = 0.0
                for x, y in split_micro_batches(batch, args.physical_batch_size):
                    if len(y) == 0:
                        continue
                    loss = F.cross_entropy(model(x), y)  # mean over the micro-batch (loss_reduction="mean")
                    loss.backward()
                    total += loss.item() * len(y)
                    loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
                return total

            optimizer.step(closure)
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}")
        if not args.no_progress:
            tqdm.write(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / max(seen, 1):.4f}, "
                       f"test accuracy {evaluate(model, test_set):.4f}")
        if args.diagnostics and engine.last_sq_norms:
            print(f"epoch {epoch + 1}: {step_diagnostics(engine, optimizer)}")
    seconds = time.perf_counter() - start
    if isinstance(optimizer, DPSAT):
        optimizer.detach()
    engine.detach()
    metrics = evaluate_metrics(model, test_set)
    val_metrics = evaluate_metrics(model, val_set) if val_set is not None else None
    if args.save_model is not None:
        torch.save(model.state_dict(), args.save_model)
    result = {"method": args.method, "rho": args.rho if args.method != "dpsgd" else 0.0,
              "clipping": args.clipping, "max_grad_norm": args.max_grad_norm, "trainable": args.trainable,
              "prune": args.prune, "grad_keep": args.grad_keep,
              "test_accuracy": metrics["accuracy"], "test_ece": metrics["ece"],
              "epsilon": accountant.get_epsilon(args.delta), "delta": args.delta, "noise_multiplier": sigma,
              "steps": accountant.steps, "seconds": seconds, "dataset": args.dataset}
    if val_metrics is not None:
        result.update(val_accuracy=val_metrics["accuracy"], val_ece=val_metrics["ece"])
    if args.dataset != "digits":
        result["data"] = dict(data_info, n_train_used=n, classes=classes)
    print(f"{METHOD_NAMES[args.method]}: test accuracy: {result['test_accuracy']:.4f}  ECE: {result['test_ece']:.4f}  "
          f"ε = {result['epsilon']:.3f} (δ = {args.delta:g}, {args.accountant.upper()}, σ = {sigma:.4f}, "
          f"{result['steps']} steps, {result['seconds']:.1f} s)")
    return result


def main(argv: Optional[List[str]] = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
