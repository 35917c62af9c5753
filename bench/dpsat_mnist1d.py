"""DP-SAT on MNIST-1D: a tuned, paired comparison with DP-SGD, sharpness, and the fine-tuning studies.

MNIST-1D (Greydanus, 2020) is generated locally by the ``mnist1d`` package (``make_dataset``, no download;
generation parameters in every JSON): 40,000 training, 5,000 validation and 10,000 test examples by default;
the model is ``dpsat_fast.models.MNIST1DCNN`` (GroupNorm 1-D CNN, 134,666 parameters). Every run goes through
the training command (``dpsat_fast.train.train``, ``--dataset mnist1d``): Poisson sampling, σ calibrated with
PLD so that ε ≤ target at δ = 1e-5 after all steps, SGD momentum 0.9, flat clipping C = 1 unless a study
varies it. Selection is ALWAYS on the validation split; the test split is only read for the reported numbers.

Studies (``--study``; ``--preset smoke|pilot|reduced|full`` sets the sizes, any option overrides it):

* ``main`` — the fair protocol. For each method (``dpsgd``; ``dpsat``: the paper's perturbation along the
  previous noisy gradient; ``dpsat_last``: along the last update; ``dpsam``: two noisy queries per step, so a
  larger σ) and each tuning ε, the SAME number of tuning runs, |``--lrs``| × |``--rhos``|, on seeds not among
  the final ones (``--tune-seed`` …): the ρ methods run every (lr, ρ) once (ρ grid around the paper's values,
  {0.01, 0.02, 0.05, 0.1} in the full preset); DP-SGD runs every lr of the same grid |ρ grid| times with
  different seeds and selects on their mean, so it spends the budget the others spend on ρ on a less noisy
  choice. The (lr, ρ) with the best validation accuracy is then run with every seed at every ε (tuned per ε,
  or with ``--tune-epsilons`` at fewer ε and reused at the nearest). Reported: mean ± std of test accuracy and
  ECE, and the paired per-seed differences to DP-SGD with a paired t-test (same seed = same initialization
  and data; the Poisson sampling and the noise stay secret and independent per run unless
  ``--insecure-noise-seed`` is given, which makes every method of one seed see the same batches and noise
  draws, for a tighter pairing, and makes the runs NOT private). Each final model's sharpness is measured
  (below). Plots: accuracy vs ε per method, sharpness per method.
* ``sharpness`` — the mechanism: DP-SGD and DP-SAT trained at given settings (``--lr``, ``--rho``, or
  ``--settings-from`` a main JSON), then, on the released model with the engine detached, on a fixed public
  batch (the first ``--sharpness-examples`` validation examples: never trained on): the top Hessian
  eigenvalue (power iteration with Hessian-vector products) and the loss increase under a random and an
  adversarial (gradient-direction) perturbation of each radius in ``--sharpness-rhos``
  (``dpsat_fast.sharpness``).
* ``selection`` — layer selection for private fine-tuning: an MNIST1DCNN is pretrained WITHOUT privacy on the
  public classes 0–4 of the training split, then fine-tuned privately on the private classes 5–9 with only the
  selected layers trainable (``all``, ``last:3``, ``last:2``, ``norms+head``, ``head``, ``bias``) at ε = 1 and 3;
  lr tuned per configuration on validation (``--lrs``).
* ``clipping`` — clipping norm vs calibration: test accuracy and ECE at C ∈ {0.1, 1, 10} (from scratch, all
  classes, ε = 3), the learning rate retuned per C on validation over ``--lrs`` × 1/C.
* ``pruning`` — magnitude pre-pruning of the public pretrained model (rates {0, 0.5, 0.8, 0.9}) and gradient
  dropping (keep {0.5, 0.2, 0.1}), private fine-tuning as in ``selection`` at ε = 3; plot: accuracy vs rate.
* ``plot`` — redraw the PNGs of result JSONs (``--inputs``).

The side studies use DP-SAT with ρ = 0.05 by default, as the digits studies (``--method``, ``--rho``).

Cost. One epoch of a 40,000-example run at batch 250 (160 DP steps) took 6.5 s of training with 2 threads on an
idle 2-core AMD EPYC machine (plus 8 s for a final run's sharpness measurements); with one thread per process
and 3-6 processes sharing the two cores it takes 15-60 s (DP-SAM about twice as long). An "epoch-run" below is
one epoch of one run (DP-SAM: two; fine-tuning on the private half of the classes: half). Full runs, with
estimates at 6.5 s per epoch-run on that idle machine:

    python bench/dpsat_mnist1d.py --study main --preset full         # 4 methods × 3 ε × (20 tuning + 5 seeds), 15 epochs: ~5,600 epoch-runs, ~10 h
    python bench/dpsat_mnist1d.py --study sharpness --preset full --settings-from bench/results/dpsat_mnist1d_main_full.json   # 150 epoch-runs: ~20 min
    python bench/dpsat_mnist1d.py --study selection --preset full    # 6 selections × 2 ε × (3 lrs + 5 seeds): ~720 epoch-runs, ~80 min
    python bench/dpsat_mnist1d.py --study clipping --preset full     # 3 C × (4 lrs + 5 seeds): ~400 epoch-runs, ~45 min
    python bench/dpsat_mnist1d.py --study pruning --preset full      # 7 configurations × (3 lrs + 5 seeds): ~420 epoch-runs, ~45 min

The full preset is meant for a GPU or an idle many-core machine (``--threads``); ``--resume`` continues it.

What was run here (results in ``bench/results/dpsat_mnist1d_*_cpu*.json``, summarized in docs/dpsat_evidence.md
with every command and its wall time), on the 40,000 training examples at batch 250:

* the main result: the ``cpu`` preset at three epochs, tuned separately at each ε over lr {0.125, 0.25, 0.5} ×
  ρ {0.02, 0.05, 0.1}, 10 seeds, all four methods, in three parallel parts merged with ``--reuse``
  (``--study main --preset cpu --epochs 3 --tune-epsilons 1 3 8 --lrs 0.125 0.25 0.5 --rhos 0.02 0.05 0.1
  --seeds 0 1 2 3 4 5 6 7 8 9``; 228 runs, about 70 minutes on 2 cores), and its widened grid for DP-SGD and
  DP-SAT (``--tuning-only``, lr down to 0.0625 and up to 1, ρ up to 0.2);
* a training-length check at ten epochs (``--study sharpness --epochs 10 --settings-from`` the main result);
* earlier and smaller: the ``cpu`` preset as it is (one epoch, tuned at ε = 3 only, 5 seeds: 76 runs) and the same
  at three epochs, and DP-SGD vs DP-SAT at the one-epoch settings for three epochs with 10 seeds;
* the side studies, ``--study selection|clipping|pruning --preset cpu`` (5 seeds, 4 learning rates each; 10-15
  minutes each).

Pilot (ε = 3, 2 seeds, 1 epoch; DP-SGD vs DP-SAT, 4 tuning runs each): ``--study main --preset pilot``.
Smoke (what CI runs, tiny sizes, seconds per study): ``--preset smoke``. ``--resume`` reuses the runs already in
``--out``: the JSON is rewritten after every run, so a long run can be stopped and continued.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

try:
    import dpsat_fast  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import dpsat_fast  # noqa: F401

from dpsat_fast import train as train_module
from dpsat_fast.models import MNIST1DCNN
from dpsat_fast.sharpness import cross_entropy_loss, hessian_top_eigenvalue, perturbation_sharpness
from dpsat_fast.train import evaluate_metrics, load_mnist1d_split, parse_args, restrict_to_classes

STUDIES = ("main", "sharpness", "selection", "clipping", "pruning", "plot")
METHODS = ("dpsgd", "dpsat", "dpsat_last", "dpsam")
LABELS = {"dpsgd": "DP-SGD", "dpsat": "DP-SAT", "dpsat_last": "DP-SAT (last update)", "dpsam": "DP-SAM"}
PUBLIC, PRIVATE = "0-4", "5-9"
RESULTS = Path(__file__).resolve().parent / "results"

# Every option of the studies, by preset; the command line overrides any of them.
COMMON = {
    "smoke": dict(n_train=400, n_val=100, n_test=200, epochs=1, batch_size=100, physical_batch_size=100,
                  seeds=[0, 1], tune_seed=100, sharpness_examples=64, sharpness_iters=5, sharpness_random=2,
                  pretrain_epochs=1),
    "pilot": dict(n_train=40_000, n_val=5_000, n_test=10_000, epochs=1, batch_size=1000, physical_batch_size=500,
                  seeds=[0, 1], tune_seed=100, sharpness_examples=256, sharpness_iters=15, sharpness_random=5,
                  pretrain_epochs=3),
    "reduced": dict(n_train=40_000, n_val=5_000, n_test=10_000, epochs=1, batch_size=1000, physical_batch_size=500,
                    seeds=[0, 1, 2, 3, 4], tune_seed=100, sharpness_examples=256, sharpness_iters=15,
                    sharpness_random=5, pretrain_epochs=3),
    # sized for a 2-core CPU: one epoch of 160 Poisson steps at batch 250, the main study tuned at ε = 3 only
    # (the main result adds --epochs 3 --tune-epsilons 1 3 8, a 3 × 3 grid and 10 seeds), side studies 5 seeds
    "cpu": dict(n_train=40_000, n_val=5_000, n_test=10_000, epochs=1, batch_size=250, physical_batch_size=250,
                seeds=[0, 1, 2, 3, 4], tune_seed=100, sharpness_examples=256, sharpness_iters=20, sharpness_random=5,
                pretrain_epochs=3),
    "full": dict(n_train=40_000, n_val=5_000, n_test=10_000, epochs=15, batch_size=1000, physical_batch_size=500,
                 seeds=[0, 1, 2, 3, 4], tune_seed=100, sharpness_examples=1024, sharpness_iters=50,
                 sharpness_random=10, pretrain_epochs=5),
}
STUDY_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "main": {
        "smoke": dict(epsilons=[3.0], methods=list(METHODS), lrs=[1.0], rhos=[0.02, 0.05]),
        "pilot": dict(epsilons=[3.0], methods=["dpsgd", "dpsat"], lrs=[0.5, 1.0], rhos=[0.02, 0.05]),
        "reduced": dict(epsilons=[1.0, 3.0, 8.0], tune_epsilons=[3.0], methods=["dpsgd", "dpsat"],
                        lrs=[0.25, 0.5, 1.0], rhos=[0.02, 0.05]),
        "cpu": dict(epsilons=[1.0, 3.0, 8.0], tune_epsilons=[3.0], methods=list(METHODS), lrs=[0.25, 0.5],
                    rhos=[0.02, 0.05]),
        "full": dict(epsilons=[1.0, 3.0, 8.0], methods=list(METHODS), lrs=[0.125, 0.25, 0.5, 1.0, 2.0],
                     rhos=[0.01, 0.02, 0.05, 0.1]),
    },
    "sharpness": {p: dict(epsilons=[3.0], methods=["dpsgd", "dpsat"], lr=1.0, rho=0.05,
                          sharpness_rhos=[0.05, 0.1, 0.5]) for p in COMMON},
    "selection": {
        "smoke": dict(epsilons=[1.0], selections=["all", "head"], lrs=[1.0]),
        "cpu": dict(epsilons=[1.0, 3.0], selections=["all", "last:2", "head"], lrs=[0.25, 0.5, 1.0, 2.0]),
        **{p: dict(epsilons=[1.0, 3.0], selections=["all", "last:3", "last:2", "norms+head", "head", "bias"],
                   lrs=[0.5, 1.0, 2.0]) for p in ("pilot", "reduced", "full")},
    },
    "clipping": {
        "smoke": dict(epsilons=[3.0], clip_norms=[0.1, 10.0], lrs=[1.0]),
        "cpu": dict(epsilons=[3.0], clip_norms=[0.1, 1.0, 10.0], lrs=[0.125, 0.25, 0.5, 1.0]),
        **{p: dict(epsilons=[3.0], clip_norms=[0.1, 1.0, 10.0], lrs=[0.25, 0.5, 1.0, 2.0])
           for p in ("pilot", "reduced", "full")},
    },
    "pruning": {
        "smoke": dict(epsilons=[3.0], prune_rates=[0.0, 0.8], grad_keeps=[0.5], lrs=[1.0]),
        "cpu": dict(epsilons=[3.0], prune_rates=[0.0, 0.5, 0.8, 0.9], grad_keeps=[0.5, 0.2, 0.1],
                    lrs=[0.25, 0.5, 1.0, 2.0]),
        **{p: dict(epsilons=[3.0], prune_rates=[0.0, 0.5, 0.8, 0.9], grad_keeps=[0.5, 0.2, 0.1],
                   lrs=[0.5, 1.0, 2.0]) for p in ("pilot", "reduced", "full")},
    },
    "plot": {p: {} for p in COMMON},
}


# ---------------------------------------------------------------------------------------------------------------
# one private run through the training command

@contextlib.contextmanager
def sam_direction(direction: Optional[str]):
    """Make the training command's DP-SAT use ``sam_direction=direction`` (the command has no flag for it):
    its PrivacyEngine is swapped for a subclass for the duration; ``applied`` tells whether it was used."""
    state = {"applied": False}
    if direction is None:
        yield state
        return
    original = train_module.PrivacyEngine

    class DirectedEngine(original):
        def make_private(self, **kwargs):
            if kwargs.get("sam_method") == "dpsat" and kwargs.get("sam_rho", 0.0) > 0:
                kwargs["sam_direction"] = direction
                state["applied"] = True
            return super().make_private(**kwargs)

    train_module.PrivacyEngine = DirectedEngine
    try:
        yield state
    finally:
        train_module.PrivacyEngine = original


def data_args(opts) -> List[str]:
    return ["--dataset", "mnist1d", "--n-train", str(opts.n_train), "--n-val", str(opts.n_val),
            "--n-test", str(opts.n_test), "--data-seed", str(opts.data_seed)]


def run_key(spec: Dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


# what, besides a study's own spec, decides a run's outcome: part of every stored spec (and of the resume key)
RUN_OPTIONS = ("epochs", "batch_size", "n_train", "n_val", "n_test", "data_seed", "insecure_noise_seed")


class Runner:
    """Runs specs through ``dpsat_fast.train.train``, measures sharpness when asked, keeps every row, rewrites the
    JSON after each run (``--resume`` reuses rows whose spec matches)."""

    def __init__(self, opts, study: str, out: Path):
        self.opts, self.study, self.out = opts, study, out
        self.rows: List[Dict[str, Any]] = []
        self.previous: Dict[str, Dict[str, Any]] = {}
        self.extra: Dict[str, Any] = {}
        self.started = time.perf_counter()
        self.earlier_seconds = 0.0
        self.kept: List[Dict[str, Any]] = []  # --resume: the file's runs, kept in it until the study is complete
        sources = ([out] if opts.resume and out.exists() else []) + [Path(r) for r in opts.reuse]
        for source in sources:  # --resume: this study's own JSON; --reuse: runs of other JSONs (e.g. parallel parts)
            prior = json.loads(source.read_text())
            for row in prior.get("runs", []):
                self.previous.setdefault(run_key(row["spec"]), row)
            if source == out:  # a resumed study: its wall time adds up over the processes
                self.earlier_seconds = float(prior.get("wall_seconds") or 0.0)
                self.kept = list(prior.get("runs", []))
            else:  # where merged runs come from: each part's command and wall time
                self.extra.setdefault("reused_from", []).append(
                    {"file": source.name, "command": prior.get("metadata", {}).get("command"),
                     "wall_seconds": prior.get("wall_seconds"), "complete": prior.get("complete"),
                     "runs": len(prior.get("runs", []))})
        self._public: Dict[Any, Any] = {}
        self.tmp = tempfile.TemporaryDirectory()
        self.checkpoints: Dict[str, Path] = {}  # spec label → file (pretrain_public)

    # the fixed public batch for sharpness: the first examples of the validation split (never trained on)
    def public_batch(self, classes: Optional[Sequence[int]] = None):
        key = None if classes is None else tuple(classes)
        if key not in self._public:
            _, val, _, _ = load_mnist1d_split(self.opts.n_train, self.opts.n_val, self.opts.n_test,
                                              data_seed=self.opts.data_seed)
            x, y = restrict_to_classes(val, classes).tensors
            k = min(self.opts.sharpness_examples, len(y))
            self._public[key] = (x[:k], y[:k])
        return self._public[key]

    def run(self, spec: Dict[str, Any], sharpness_rhos: Sequence[float] = ()) -> Dict[str, Any]:
        o = self.opts
        spec = {**{k: getattr(o, k) for k in RUN_OPTIONS}, **spec}
        if sharpness_rhos:
            spec["sharpness"] = {"examples": o.sharpness_examples, "iters": o.sharpness_iters,
                                 "random": o.sharpness_random, "rhos": list(sharpness_rhos)}
        key = run_key(spec)
        if key in self.previous:
            row = self.previous[key]
            self.rows.append(row)
            return row
        method = spec["method"]
        model_path = Path(self.tmp.name) / "model.pt"
        argv = data_args(o) + [
            "--method", "dpsat" if method == "dpsat_last" else method, "--rho", str(spec.get("rho", 0.0)),
            "--lr", str(spec["lr"]), "--target-epsilon", str(spec["epsilon"]), "--seed", str(spec["seed"]),
            "--epochs", str(spec["epochs"]), "--batch-size", str(spec["batch_size"]),
            "--physical-batch-size", str(o.physical_batch_size), "--max-grad-norm", str(spec.get("max_grad_norm", 1.0)),
            "--clipping", spec.get("clipping", "flat"), "--trainable", spec.get("trainable", "all"),
            "--no-progress", "--save-model", str(model_path)]
        for flag, key_ in (("--classes", "classes"), ("--prune", "prune"), ("--grad-keep", "grad_keep")):
            if spec.get(key_) not in (None, 0.0, 1.0, ""):
                argv += [flag, str(spec[key_])]
        if spec.get("checkpoint"):  # a label in the spec (stable across processes), the file of this process
            argv += ["--checkpoint", str(self.checkpoints[spec["checkpoint"]])]
        if o.insecure_noise_seed is not None:
            # common random numbers: every method of one seed gets the same sampling and noise streams
            argv += ["--insecure-noise-seed", str(o.insecure_noise_seed + 1000 * spec["seed"])]
        log = io.StringIO()
        with sam_direction("last_update" if method == "dpsat_last" else None) as state, \
                (contextlib.nullcontext() if o.verbose else contextlib.redirect_stdout(log)):
            result = train_module.train(parse_args(argv))
        if method == "dpsat_last" and spec.get("rho", 0.0) > 0 and not state["applied"]:
            raise RuntimeError("the last-update direction was not applied")
        row = {"spec": spec, "phase": spec.get("phase"), "val_accuracy": result.get("val_accuracy"),
               "val_ece": result.get("val_ece"), "epsilon_spent": result["epsilon"],
               "noise_multiplier": result["noise_multiplier"], "steps": result["steps"], "seconds": result["seconds"],
               "n_train_used": result["data"]["n_train_used"]}
        if spec.get("phase") != "tune":  # tuning runs never look at the test split's numbers
            row.update(test_accuracy=result["test_accuracy"], test_ece=result["test_ece"])
        if sharpness_rhos:
            start = time.perf_counter()
            model = MNIST1DCNN()
            model.load_state_dict(torch.load(model_path, weights_only=True))
            classes = train_module.parse_classes(spec.get("classes"))
            x, y = self.public_batch(classes)
            loss_fn = cross_entropy_loss(x, y, batch_size=256)
            eig = hessian_top_eigenvalue(model, loss_fn, iters=o.sharpness_iters, tol=1e-3, seed=0)
            reports = []
            for rho in sharpness_rhos:
                rep = perturbation_sharpness(model, loss_fn, rho, n_random=o.sharpness_random, seed=0)
                reports.append({k: rep[k] for k in ("rho", "loss", "random_increase_mean", "random_increase_std",
                                                      "adversarial_increase", "gradient_norm")})
            row["sharpness"] = {"hessian_top_eigenvalue": eig["eigenvalue"], "hessian_iterations": eig["iterations"],
                                "hessian_converged": eig["converged"],
                                "public_batch": f"first {len(y)} validation examples", "perturbations": reports,
                                "seconds": time.perf_counter() - start}
        self.rows.append(row)
        self.save(complete=False)
        return row

    def save(self, complete: bool) -> None:
        rows = self.rows
        if not complete:  # a resumed study stopped again must not lose the runs it had not reached yet
            done = {run_key(r["spec"]) for r in rows}
            rows = rows + [r for r in self.kept if run_key(r["spec"]) not in done]
        payload = {"metadata": metadata(self.opts, self.study), "complete": complete,
                   "wall_seconds": self.earlier_seconds + time.perf_counter() - self.started, **self.extra, "runs": rows}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, self.out)


def cpu_model() -> str:
    """The CPU's model name (machines differ: compare times only within one run's JSON)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def metadata(opts, study: str) -> Dict[str, Any]:
    _, _, _, info = load_mnist1d_split(opts.n_train, opts.n_val, opts.n_test, data_seed=opts.data_seed)
    return {"study": study, "preset": opts.preset,
            "command": " ".join(shlex.quote(a) for a in ["python", "bench/dpsat_mnist1d.py", *opts.argv]),
            "options": {k: v for k, v in vars(opts).items() if k not in ("argv",)},
            "data": info, "model": "MNIST1DCNN (134,666 parameters)",
            "training": "dpsat_fast.train: Poisson sampling, PLD accountant, delta 1e-5, SGD momentum 0.9, flat "
                        "clipping unless varied; selection on validation accuracy",
            "torch": torch.__version__, "dpsat_fast": dpsat_fast.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "noise": ("INSECURE common random numbers: --insecure-noise-seed "
                      f"{opts.insecure_noise_seed} + 1000·seed; NOT private" if opts.insecure_noise_seed is not None
                      else "secret (OS) noise key and Poisson sampling in every run")}


def progress(total: int, desc: str, opts):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=opts.no_progress, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------------
# statistics

def mean_std(values: Sequence[float]) -> Dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired(a: Dict[int, float], b: Dict[int, float]) -> Dict[str, Any]:
    """Per-seed differences a − b over the seeds both have: mean, std, paired t-test, wins."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out: Dict[str, Any] = {"seeds": seeds, "differences": diffs, **{f"diff_{k}": v for k, v in mean_std(diffs).items()},
                           "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}
    if len(diffs) > 1 and statistics.stdev(diffs) > 0:
        from scipy import stats

        t = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
        out.update(t_statistic=float(t.statistic), p_value=float(t.pvalue))
        half = float(stats.t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        out["ci95"] = [out["diff_mean"] - half, out["diff_mean"] + half]
    return out


def holm(p_values: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (``None`` stays ``None`` and is not counted): the
    k-th smallest of m becomes max over j ≤ k of min(1, (m − j + 1)·p_(j)). Rejecting where the adjusted p < α
    controls the family-wise error rate at α."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    out: List[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def adjust_family(comparisons: List[Dict[str, Any]], metric: str = "test_accuracy") -> None:
    """Adds ``p_holm`` to ``c[metric]`` of every comparison (one family: all of them)."""
    adjusted = holm([c[metric].get("p_value") for c in comparisons])
    for c, p in zip(comparisons, adjusted):
        if p is not None:
            c[metric]["p_holm"] = p


def summarize(rows: List[Dict[str, Any]], group_keys: Sequence[str]) -> List[Dict[str, Any]]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        if r["phase"] == "final":
            groups.setdefault(tuple(r["spec"].get(k) for k in group_keys), []).append(r)
    out = []
    for key, rs in groups.items():
        s = {k: v for k, v in zip(group_keys, key)}
        s.update(lr=rs[0]["spec"]["lr"], rho=rs[0]["spec"].get("rho", 0.0), noise_multiplier=rs[0]["noise_multiplier"],
                 seeds=[r["spec"]["seed"] for r in rs])
        for metric in ("test_accuracy", "test_ece", "val_accuracy", "seconds"):
            s[metric] = mean_std([r.get(metric) for r in rs])
        if all("sharpness" in r for r in rs):
            s["hessian_top_eigenvalue"] = mean_std([r["sharpness"]["hessian_top_eigenvalue"] for r in rs])
            for i, p in enumerate(rs[0]["sharpness"]["perturbations"]):
                for m in ("random_increase_mean", "adversarial_increase", "loss"):
                    s[f"{m}@rho={p['rho']:g}"] = mean_std([r["sharpness"]["perturbations"][i][m] for r in rs])
        out.append(s)
    return out


def fmt(ms: Dict[str, float], digits: int = 4) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


# ---------------------------------------------------------------------------------------------------------------
# studies

def candidates(method: str, opts) -> List[Dict[str, Any]]:
    """The tuning runs of one method, the same number for every method: the ρ methods run every (lr, ρ) of
    ``--lrs`` × ``--rhos`` once (seed ``--tune-seed``); DP-SGD runs every lr of the same grid ``|ρ grid|`` times
    (seeds ``--tune-seed`` + 0, 1, ...), so it spends the budget that the others spend on ρ on a less noisy
    choice of lr (its selection averages the replicates)."""
    if method == "dpsgd":
        return [{"lr": lr, "rho": 0.0, "seed": opts.tune_seed + i} for lr in opts.lrs for i in range(len(opts.rhos))]
    return [{"lr": lr, "rho": rho, "seed": opts.tune_seed} for lr in opts.lrs for rho in opts.rhos]


def select(rows: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """The (lr, ρ) with the best mean validation accuracy over its tuning runs (ties: the first in grid order)."""
    groups: Dict[tuple, List[float]] = {}
    for r in rows:
        groups.setdefault((r["spec"]["lr"], r["spec"].get("rho", 0.0)), []).append(r["val_accuracy"])
    (lr, rho), accs = max(groups.items(), key=lambda kv: statistics.fmean(kv[1]))
    return {"lr": lr, "rho": rho, "val_accuracy": statistics.fmean(accs), "runs": len(accs)}


def study_main(opts, runner: Runner) -> None:
    tune_eps = opts.tune_epsilons or opts.epsilons
    n_tune = sum(len(candidates(m, opts)) for m in opts.methods) * len(tune_eps)
    n_final = 0 if opts.tuning_only else len(opts.methods) * len(opts.epsilons) * len(opts.seeds)
    bar = progress(n_tune + n_final, "main", opts)
    selected: Dict[str, Dict[str, Any]] = {}
    tuning = {}
    for eps in tune_eps:
        for method in opts.methods:
            rows = []
            for c in candidates(method, opts):
                spec = {"phase": "tune", "method": method, "epsilon": eps, **c}
                rows.append(runner.run(spec))
                bar.set_postfix_str(f"tune {method} ε={eps:g} lr={c['lr']:g} ρ={c['rho']:g}: "
                                    f"val {rows[-1]['val_accuracy']:.3f}")
                bar.update()
            selected[f"{method}@{eps:g}"] = select(rows)
            tuning[f"{method}@{eps:g}"] = [{"lr": r["spec"]["lr"], "rho": r["spec"]["rho"], "seed": r["spec"]["seed"],
                                            "val_accuracy": r["val_accuracy"]} for r in rows]
    runner.extra.update(selected=selected, tuning_grid=tuning,
                        protocol={"tune_epsilons": tune_eps, "lrs": opts.lrs, "rhos": opts.rhos,
                                  "tune_runs_per_method_and_epsilon": len(opts.lrs) * len(opts.rhos),
                                  "selection": "best mean validation accuracy per (lr, rho); DP-SGD runs each lr "
                                               "len(rhos) times with different seeds, the rho methods each (lr, rho) "
                                               "once", "candidates": {m: candidates(m, opts) for m in opts.methods}})
    if opts.tuning_only:  # e.g. to widen a grid next to a study still running its final runs (then --reuse both)
        bar.close()
        runner.extra["tuning_only"] = True
        print(json.dumps(selected, indent=1))
        return
    def setting(method: str, eps: float) -> Dict[str, Any]:
        from_eps = eps if eps in tune_eps else min(tune_eps, key=lambda e: abs(math.log(e / eps)))
        sel = selected[f"{method}@{from_eps:g}"]
        return {"lr": sel["lr"], "rho": sel["rho"], "tuned_at_epsilon": from_eps}

    final_runs(opts, runner, bar, setting,
               lambda method, eps, seed, row: f"{method} ε={eps:g} seed {seed}: test {row['test_accuracy']:.3f}")
    finish_main(opts, runner)


def final_runs(opts, runner: Runner, bar, setting: Callable[[str, float], Dict[str, Any]],
               describe: Callable[[str, float, int, Dict[str, Any]], str]) -> None:
    """Every (seed, ε, method) final run with its ``setting(method, ε)``, sharpness measured. Seed-major: a study
    stopped early still has every (method, ε) at the seeds it finished, for paired comparisons."""
    for seed in opts.seeds:
        for eps in opts.epsilons:
            for method in opts.methods:
                spec = {"phase": "final", "method": method, "epsilon": eps, "seed": seed, **setting(method, eps)}
                row = runner.run(spec, sharpness_rhos=opts.sharpness_rhos)
                bar.set_postfix_str(describe(method, eps, seed, row))
                bar.update()
    bar.close()


def finish_main(opts, runner: Runner) -> None:
    finals = [r for r in runner.rows if r["phase"] == "final"]
    summary = summarize(finals, ("epsilon", "method"))
    comparisons = []
    for eps in opts.epsilons:
        by = {m: {r["spec"]["seed"]: r for r in finals if r["spec"]["method"] == m and r["spec"]["epsilon"] == eps}
              for m in opts.methods}
        if "dpsgd" not in by:
            continue
        for m in opts.methods:
            if m == "dpsgd":
                continue
            comp = {"epsilon": eps, "method": m, "baseline": "dpsgd",
                    "test_accuracy": paired({s: r["test_accuracy"] for s, r in by[m].items()},
                                            {s: r["test_accuracy"] for s, r in by["dpsgd"].items()})}
            if all("sharpness" in r for r in list(by[m].values()) + list(by["dpsgd"].values())):
                comp["hessian_top_eigenvalue"] = paired(
                    {s: r["sharpness"]["hessian_top_eigenvalue"] for s, r in by[m].items()},
                    {s: r["sharpness"]["hessian_top_eigenvalue"] for s, r in by["dpsgd"].items()})
                comp["adversarial_increase"] = paired(
                    {s: r["sharpness"]["perturbations"][0]["adversarial_increase"] for s, r in by[m].items()},
                    {s: r["sharpness"]["perturbations"][0]["adversarial_increase"] for s, r in by["dpsgd"].items()})
            comparisons.append(comp)
    adjust_family(comparisons)
    runner.extra.update(summary=summary, paired_vs_dpsgd=comparisons,
                        multiple_comparisons="p_holm: Holm's adjustment over every accuracy comparison of this study")
    lines = ["| ε | method | lr | ρ | σ | test accuracy | test ECE | λ_max (Hessian) | adv. increase | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        sharp = (f"{fmt(s['hessian_top_eigenvalue'], 2)} | {fmt(s[next(k for k in s if k.startswith('adversarial_increase'))], 4)}"
                 if "hessian_top_eigenvalue" in s else "– | –")
        lines.append(f"| {s['epsilon']:g} | {LABELS[s['method']]} | {s['lr']:g} | {s['rho']:g} | "
                     f"{s['noise_multiplier']:.3f} | {fmt(s['test_accuracy'])} | {fmt(s['test_ece'])} | {sharp} | "
                     f"{len(s['seeds'])} |")
    lines += ["", "| ε | method − DP-SGD (paired by seed) | Δ test accuracy (mean ± std) | 95% CI | p (paired t) | "
                  "p (Holm) | wins/losses | Δ λ_max |", "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        t = c["test_accuracy"]
        ci = f"[{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]" if "ci95" in t else "–"
        p = f"{t['p_value']:.3f}" if "p_value" in t else "–"
        p_holm = f"{t['p_holm']:.3f}" if "p_holm" in t else "–"
        h = (f"{c['hessian_top_eigenvalue']['diff_mean']:+.2f} ± {c['hessian_top_eigenvalue']['diff_std']:.2f}"
             if "hessian_top_eigenvalue" in c else "–")
        lines.append(f"| {c['epsilon']:g} | {LABELS[c['method']]} | {t['diff_mean']:+.4f} ± {t['diff_std']:.4f} | {ci} | "
                     f"{p} | {p_holm} | {t['wins']}/{t['losses']} | {h} |")
    runner.extra["table"] = "\n".join(lines)
    print(runner.extra["table"])


def study_sharpness(opts, runner: Runner) -> None:
    settings = {m: {"lr": opts.lr, "rho": 0.0 if m == "dpsgd" else opts.rho} for m in opts.methods}
    if opts.settings_from:
        prior = json.loads(Path(opts.settings_from).read_text())["selected"]
        for m in opts.methods:
            eps = opts.epsilons[0]
            key = f"{m}@{eps:g}" if f"{m}@{eps:g}" in prior else next(k for k in prior if k.startswith(m + "@"))
            settings[m] = {"lr": prior[key]["lr"], "rho": prior[key]["rho"], "from": key}
    runner.extra["settings"] = settings
    bar = progress(len(opts.methods) * len(opts.epsilons) * len(opts.seeds), "sharpness", opts)
    final_runs(opts, runner, bar, lambda m, eps: {"lr": settings[m]["lr"], "rho": settings[m]["rho"]},
               lambda m, eps, seed, row: f"{m} seed {seed}: λ_max {row['sharpness']['hessian_top_eigenvalue']:.2f}")
    finish_main(opts, runner)


def pretrain_public(opts, runner: Runner) -> str:
    """Non-private pretraining of an MNIST1DCNN on the public classes 0-4 of the training split (SGD momentum 0.9,
    lr 0.05, batch 128, ``--pretrain-epochs``); one model shared by every configuration and seed."""
    path = Path(runner.tmp.name) / "public.pt"
    train, val, _, _ = load_mnist1d_split(opts.n_train, opts.n_val, opts.n_test, data_seed=opts.data_seed)
    train, val = restrict_to_classes(train, range(5)), restrict_to_classes(val, range(5))
    torch.manual_seed(12345)
    model = MNIST1DCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train.tensors
    gen = torch.Generator().manual_seed(12345)
    start = time.perf_counter()
    for _ in range(opts.pretrain_epochs):
        for idx in torch.randperm(len(y), generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.save(model.state_dict(), path)
    public = evaluate_metrics(model, val)
    # the spec names the model by what decides it (deterministic: fixed seeds), not by this process' temp file,
    # so that --resume and --reuse find runs of another process
    label = f"public classes {PUBLIC}, {opts.pretrain_epochs} epochs, seed 12345"
    runner.checkpoints[label] = path
    runner.extra["pretrained"] = {"public_classes": PUBLIC, "examples": len(y), "epochs": opts.pretrain_epochs,
                                  "public_val_accuracy": public["accuracy"], "seconds": time.perf_counter() - start,
                                  "label": label}
    return label


def tuned_configs(opts, runner: Runner, configs: List[Dict[str, Any]], name: str,
                  reference: Callable[[Dict[str, Any]], bool], lr_scale=lambda c: 1.0) -> None:
    """For every configuration: tune lr over ``--lrs`` (× lr_scale) on validation with the tuning seed, then every
    seed at the best lr; then every configuration against the ``reference`` one at its ε, paired by seed."""
    bar = progress(len(configs) * (len(opts.lrs) + len(opts.seeds)), name, opts)
    chosen = []
    for config in configs:
        rows = []
        for lr in opts.lrs:
            spec = {"phase": "tune", **config, "seed": opts.tune_seed, "lr": round(lr * lr_scale(config), 8)}
            rows.append(runner.run(spec))
            bar.set_postfix_str(f"tune {label(config)} lr={spec['lr']:g}: val {rows[-1]['val_accuracy']:.3f}")
            bar.update()
        best = select(rows)
        chosen.append({"config": config, "lr": best["lr"], "val_accuracy": best["val_accuracy"]})
        for seed in opts.seeds:
            row = runner.run({"phase": "final", **config, "seed": seed, "lr": best["lr"]})
            bar.set_postfix_str(f"{label(config)} seed {seed}: test {row['test_accuracy']:.3f}")
            bar.update()
    bar.close()
    runner.extra["selected"] = chosen
    keys = [k for k in ("epsilon", "trainable", "clipping", "max_grad_norm", "prune", "grad_keep") if
            any(k in c for c in configs)]
    summary = summarize(runner.rows, keys)
    runner.extra["summary"] = summary
    lines = ["| configuration | lr (selected on val) | test accuracy | test ECE | σ | seeds |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {label(s)} | {s['lr']:g} | {fmt(s['test_accuracy'])} | {fmt(s['test_ece'])} | "
                     f"{s['noise_multiplier']:.3f} | {len(s['seeds'])} |")
    comparisons = compare_with_reference(runner.rows, configs, reference)
    runner.extra.update(paired_vs_reference=comparisons,
                        multiple_comparisons="p_holm: Holm's adjustment over every comparison of this study, "
                                             "accuracy and ECE separately")
    lines += ["", "| configuration − reference (paired by seed) | Δ test accuracy | 95% CI | p | p (Holm) | "
                  "wins/losses | Δ test ECE (p, Holm) |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        t, e = c["test_accuracy"], c["test_ece"]
        ci = f"[{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]" if "ci95" in t else "–"
        lines.append(f"| {label(c['config'])} − {label(c['reference'])} | {t['diff_mean']:+.4f} ± {t['diff_std']:.4f} | "
                     f"{ci} | {t.get('p_value', float('nan')):.3f} | {t.get('p_holm', float('nan')):.3f} | "
                     f"{t['wins']}/{t['losses']} | {e['diff_mean']:+.4f} ({e.get('p_value', float('nan')):.3f}, "
                     f"{e.get('p_holm', float('nan')):.3f}) |")
    runner.extra["table"] = "\n".join(lines)
    print(runner.extra["table"])


def compare_with_reference(rows: List[Dict[str, Any]], configs: List[Dict[str, Any]],
                           reference: Callable[[Dict[str, Any]], bool]) -> List[Dict[str, Any]]:
    """Every configuration's final runs minus those of the reference configuration at the same ε, paired by seed
    (test accuracy and ECE); Holm-adjusted over the accuracy comparisons."""
    def finals(config):
        return {r["spec"]["seed"]: r for r in rows
                if r["phase"] == "final" and all(r["spec"].get(k) == v for k, v in config.items())}

    comparisons = []
    for ref in (c for c in configs if reference(c)):
        base = finals(ref)
        for config in configs:
            if reference(config) or config["epsilon"] != ref["epsilon"]:
                continue
            runs = finals(config)
            comparisons.append({
                "config": config, "reference": ref,
                **{m: paired({s: r[m] for s, r in runs.items()}, {s: r[m] for s, r in base.items()})
                   for m in ("test_accuracy", "test_ece")}})
    adjust_family(comparisons, "test_accuracy")
    adjust_family(comparisons, "test_ece")
    return comparisons


def label(c: Dict[str, Any]) -> str:
    parts = [f"ε={c['epsilon']:g}"]
    if "trainable" in c:
        parts.append(f"train {c.get('trainable', 'all')}")
    if "max_grad_norm" in c:
        parts.append(f"C={c['max_grad_norm']:g}")
    if c.get("prune") is not None:
        parts.append(f"pre-prune {c['prune']:.0%}")
    if c.get("grad_keep") is not None:
        parts.append(f"grad keep {c['grad_keep']:.0%}")
    return ", ".join(parts)


def side_method(opts) -> Dict[str, Any]:
    return {"method": opts.method, "rho": 0.0 if opts.method == "dpsgd" else opts.rho}


def study_selection(opts, runner: Runner) -> None:
    ckpt = pretrain_public(opts, runner)
    configs = [{**side_method(opts), "epsilon": eps, "trainable": t, "classes": PRIVATE, "checkpoint": ckpt}
               for eps in opts.epsilons for t in opts.selections]
    tuned_configs(opts, runner, configs, "selection", reference=lambda c: c["trainable"] == "all")


def study_clipping(opts, runner: Runner) -> None:
    configs = [{**side_method(opts), "epsilon": eps, "max_grad_norm": C} for eps in opts.epsilons
               for C in opts.clip_norms]
    # the claim under test: large clipping norms calibrate better; every smaller C against the largest
    tuned_configs(opts, runner, configs, "clipping", reference=lambda c: c["max_grad_norm"] == max(opts.clip_norms),
                  lr_scale=lambda c: 1.0 / c["max_grad_norm"])


def study_pruning(opts, runner: Runner) -> None:
    ckpt = pretrain_public(opts, runner)
    base = {**side_method(opts), "classes": PRIVATE, "checkpoint": ckpt}
    configs = [{**base, "epsilon": eps, "prune": rate, "grad_keep": None} for eps in opts.epsilons
               for rate in opts.prune_rates]
    configs += [{**base, "epsilon": eps, "prune": None, "grad_keep": keep} for eps in opts.epsilons
                for keep in opts.grad_keeps]
    tuned_configs(opts, runner, configs, "pruning",
                  reference=lambda c: not c.get("prune") and c.get("grad_keep") is None)


# ---------------------------------------------------------------------------------------------------------------
# plots

def plot(result: Dict[str, Any], out_prefix: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = result["metadata"]["study"]
    summary = result.get("summary", [])
    written = []
    epochs = result["metadata"].get("options", {}).get("epochs")
    tag = (f"{result['metadata'].get('preset')}, n_train={result['metadata']['data']['n_train']}"
           + (f", {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else ""))
    if study in ("main", "sharpness") and summary:
        methods = [m for m in METHODS if any(s["method"] == m for s in summary)]
        if study == "main":
            fig, ax = plt.subplots(figsize=(5.5, 4))
            for m in methods:
                ss = sorted((s for s in summary if s["method"] == m), key=lambda s: s["epsilon"])
                ax.errorbar([s["epsilon"] for s in ss], [s["test_accuracy"]["mean"] for s in ss],
                            yerr=[s["test_accuracy"]["std"] for s in ss], marker="o", capsize=3, label=LABELS[m])
            ax.set_xscale("log")
            ax.set_xticks(sorted({s["epsilon"] for s in summary}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("ε (δ = 1e-5)")
            ax.set_ylabel("test accuracy (mean ± std over seeds)")
            ax.set_title(f"MNIST-1D, settings tuned on validation ({tag})", fontsize=8)
            ax.legend()
            fig.tight_layout()
            path = out_prefix.with_name(out_prefix.name + "_accuracy_vs_epsilon.png")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
        if any("hessian_top_eigenvalue" in s for s in summary):
            eps_list = sorted({s["epsilon"] for s in summary})
            adv_key = next(k for k in summary[0] if k.startswith("adversarial_increase"))
            # the random increase at the largest radius: at small ρ it is below the float32 resolution of the loss
            rnd_key = [k for k in summary[0] if k.startswith("random_increase_mean")][-1]
            fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
            width = 0.8 / len(methods)
            for i, m in enumerate(methods):
                for ax, key, title in zip(axes, ("hessian_top_eigenvalue", adv_key, rnd_key),
                                          ("top Hessian eigenvalue", f"adversarial loss increase ({adv_key.split('@')[1]})",
                                           f"random loss increase ({rnd_key.split('@')[1]})")):
                    ss = [next((s for s in summary if s["method"] == m and s["epsilon"] == e), None) for e in eps_list]
                    xs = [j + (i - (len(methods) - 1) / 2) * width for j, s in enumerate(ss) if s]
                    ax.bar(xs, [s[key]["mean"] for s in ss if s], width, yerr=[s[key]["std"] for s in ss if s],
                           capsize=2, label=LABELS[m])
                    ax.set_xticks(range(len(eps_list)))
                    ax.set_xticklabels([f"ε={e:g}" for e in eps_list])
                    ax.set_title(title, fontsize=9)
            axes[0].legend(fontsize=8)
            fig.suptitle(f"Sharpness at the end of training, public batch of validation examples ({tag})", fontsize=9)
            fig.tight_layout()
            path = out_prefix.with_name(out_prefix.name + "_sharpness.png")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    if study == "pruning" and summary:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for kind, key, xlabel in (("pre-pruning", "prune", "rate"), ("gradient dropping", "grad_keep", "rate")):
            ss = [s for s in summary if s.get(key) is not None]
            if key == "grad_keep":  # dropping rate = 1 − keep; rate 0 is the unpruned baseline
                ss = [dict(s, x=1 - s[key]) for s in ss] + [dict(s, x=0.0) for s in summary if s.get("prune") == 0.0]
            else:
                ss = [dict(s, x=s[key]) for s in ss]
            ss.sort(key=lambda s: s["x"])
            ax.errorbar([s["x"] for s in ss], [s["test_accuracy"]["mean"] for s in ss],
                        yerr=[s["test_accuracy"]["std"] for s in ss], marker="o", capsize=3,
                        label=f"{kind} (fraction removed{' per step' if key == 'grad_keep' else ''})")
        ax.set_xlabel("pruning rate")
        ax.set_ylabel("test accuracy (mean ± std)")
        ax.set_title(f"MNIST-1D private fine-tuning, ε = {summary[0]['epsilon']:g} ({tag})", fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_prefix.with_name(out_prefix.name + "_accuracy_vs_pruning.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if study in ("selection", "clipping") and summary:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        labels = [label(s) for s in summary]
        for ax, metric in zip(axes, ("test_accuracy", "test_ece")):
            ax.barh(range(len(summary)), [s[metric]["mean"] for s in summary],
                    xerr=[s[metric]["std"] for s in summary], capsize=2)
            ax.set_yticks(range(len(summary)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_xlabel(metric.replace("_", " "))
            ax.invert_yaxis()
        fig.suptitle(f"MNIST-1D {study} study ({tag})", fontsize=9)
        fig.tight_layout()
        path = out_prefix.with_name(out_prefix.name + ".png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_rho_sweep(results: Sequence[Dict[str, Any]], path: Path, epsilon: float = 3.0) -> Optional[Path]:
    """Test accuracy and top Hessian eigenvalue vs ρ of DP-SAT (ρ = 0: DP-SGD), final runs at ``epsilon`` with
    sharpness, pooled from several JSONs (the main study and ``--study sharpness --rho R`` runs at the same
    settings and epochs); mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[float, Dict[int, Dict[str, Any]]] = {}
    epochs = set()
    for result in results:
        for r in result["runs"]:
            spec = r["spec"]
            if (r["phase"] == "final" and spec["epsilon"] == epsilon and spec["method"] in ("dpsgd", "dpsat")
                    and "sharpness" in r):
                groups.setdefault(float(spec.get("rho", 0.0)), {})[spec["seed"]] = r
                epochs.add(spec["epochs"])
    if len(groups) < 2 or len(epochs) != 1:
        return None
    rhos = sorted(groups)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "test_accuracy", "test accuracy"), (axes[1], "lam", "top Hessian eigenvalue")):
        vals = [[r["sharpness"]["hessian_top_eigenvalue"] if key == "lam" else r[key] for r in groups[rho].values()]
                for rho in rhos]
        ax.errorbar(range(len(rhos)), [statistics.fmean(v) for v in vals],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals], marker="o", capsize=3)
        ax.set_xticks(range(len(rhos)))
        ax.set_xticklabels(["0\n(DP-SGD)" if rho == 0 else f"{rho:g}" for rho in rhos])
        ax.set_xlabel("DP-SAT radius ρ")
        ax.set_title(title, fontsize=9)
    seeds = sorted(set.intersection(*(set(g) for g in groups.values())))
    fig.suptitle(f"MNIST-1D, ε = {epsilon:g}, {epochs.pop()} epoch(s), same lr; seeds {seeds} (mean ± std)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------

def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=STUDIES, required=True)
    p.add_argument("--preset", choices=sorted(COMMON), default="smoke")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/dpsat_mnist1d_<study>_<preset>.json)")
    p.add_argument("--plots", default=None, help="prefix of the PNGs (default: the JSON path without .json)")
    p.add_argument("--inputs", nargs="+", default=[], help="--study plot: result JSONs to draw")
    p.add_argument("--rho-sweep", default=None,
                   help="--study plot: also draw accuracy and top Hessian eigenvalue vs ρ (at the first of --epsilons, "
                        "default 3) pooled over --inputs into this PNG")
    p.add_argument("--resume", action="store_true", help="reuse the runs already in --out")
    p.add_argument("--reuse", nargs="+", default=[],
                   help="also reuse the runs (same spec) of these JSONs: run parts of a study in parallel processes "
                        "(e.g. --methods dpsgd dpsat and --methods dpsam), then merge them with every method and "
                        "--reuse PART1 PART2 (no new run if every spec is there)")
    p.add_argument("--verbose", action="store_true", help="show the training command's output")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    ints, floats = dict(type=int, default=None), dict(type=float, default=None)
    for name in ("n_train", "n_val", "n_test", "epochs", "batch_size", "physical_batch_size", "tune_seed",
                 "sharpness_examples", "sharpness_iters", "sharpness_random", "pretrain_epochs"):
        p.add_argument("--" + name.replace("_", "-"), **ints)
    p.add_argument("--data-seed", type=int, default=42)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    for name in ("lr", "rho"):
        p.add_argument("--" + name.replace("_", "-"), **floats)
    for name in ("epsilons", "tune_epsilons", "rhos", "lrs", "clip_norms", "prune_rates", "grad_keeps",
                 "sharpness_rhos"):
        p.add_argument("--" + name.replace("_", "-"), type=float, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--method", choices=("dpsgd", "dpsat", "dpsam"), default="dpsat",
                   help="side studies' method (default DP-SAT, ρ = --rho, 0.05)")
    p.add_argument("--selections", nargs="+", default=None)
    p.add_argument("--tuning-only", action="store_true", help="--study main: stop after the tuning runs")
    p.add_argument("--settings-from", default=None, help="--study sharpness: take lr and ρ from a main-study JSON")
    p.add_argument("--insecure-noise-seed", type=int, default=None,
                   help="INSECURE, NOT PRIVATE: seed the noise and the sampling (seed + 1000·run seed), so that the "
                        "methods of one seed share them (common random numbers); default: secret, from the OS")
    opts = p.parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {**COMMON[opts.preset], **STUDY_PRESETS[opts.study][opts.preset]}
    defaults.setdefault("sharpness_rhos", [0.05, 0.5])
    defaults.setdefault("rho", 0.05)
    for k, v in defaults.items():
        if getattr(opts, k, None) is None:
            setattr(opts, k, v)
    return opts


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    opts = parse(argv)
    torch.set_num_threads(opts.threads)
    if opts.study == "plot":
        written = []
        results = [json.loads(Path(path).read_text()) for path in opts.inputs]
        for path, result in zip(opts.inputs, results):
            written += plot(result, Path(path).with_suffix(""))
        if opts.rho_sweep:
            eps = opts.epsilons[0] if opts.epsilons else 3.0
            written += [p for p in [plot_rho_sweep(results, Path(opts.rho_sweep), eps)] if p is not None]
        print("\n".join(map(str, written)))
        return {"plots": [str(p) for p in written]}
    out = Path(opts.out) if opts.out else RESULTS / f"dpsat_mnist1d_{opts.study}_{opts.preset}.json"
    runner = Runner(opts, opts.study, out)
    {"main": study_main, "sharpness": study_sharpness, "selection": study_selection, "clipping": study_clipping,
     "pruning": study_pruning}[opts.study](opts, runner)
    runner.save(complete=True)
    result = json.loads(out.read_text())
    plots = plot(result, Path(opts.plots) if opts.plots else out.with_suffix(""))
    print(f"wrote {out}" + "".join(f"\nwrote {p}" for p in plots))
    runner.tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
