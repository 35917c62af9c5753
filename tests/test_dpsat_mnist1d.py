"""MNIST-1D: the local generation (no network, deterministic, cached, no global RNG side effect), and every
study of bench/dpsat_mnist1d.py end to end at smoke sizes (JSON with every run, the protocol's selection on
validation, plots)."""

import importlib.util
import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsat_fast.train import load_mnist1d_split

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "dpsat_mnist1d.py"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPSAT_FAST_DATA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_dpsat_mnist1d", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generation_is_local_deterministic_and_cached(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D generation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    np.random.seed(7)
    random.seed(7)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    train, val, test, info = load_mnist1d_split(170, 30, 50, data_seed=3, cache_dir=tmp_path / "a")
    assert (len(train), len(val), len(test)) == (170, 30, 50)
    assert train.tensors[0].shape == (170, 1, 40) and train.tensors[0].dtype == torch.float32
    assert set(train.tensors[1].tolist()) <= set(range(10))
    assert info["generation"]["num_samples"] == 250 and info["generation"]["seed"] == 3
    # numpy's and Python's global RNGs are left as they were (make_dataset seeds them)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    # the same parameters give the same data, from the cache file or regenerated without one
    cached = load_mnist1d_split(170, 30, 50, data_seed=3, cache_dir=tmp_path / "a")
    fresh = load_mnist1d_split(170, 30, 50, data_seed=3, cache_dir=None)
    for a, b, c in zip((train, val, test), cached[:3], fresh[:3]):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a.tensors, b.tensors, c.tensors))
    other = load_mnist1d_split(170, 30, 50, data_seed=4, cache_dir=None)
    assert not torch.equal(other[0].tensors[0], train.tensors[0])
    assert len(list((tmp_path / "a").glob("mnist1d_*.npz"))) == 1
    # splits are disjoint examples (no validation or test example is a training example)
    flat = lambda d: {tuple(r.tolist()) for r in d.tensors[0].flatten(1)}  # noqa: E731
    assert not (flat(train) & flat(val)) and not (flat(train) & flat(test))


def test_sizes_not_a_multiple_of_ten_and_bad_sizes():
    train, val, test, info = load_mnist1d_split(123, 7, 45, cache_dir=None)
    assert (len(train), len(val), len(test)) == (123, 7, 45) and info["generation"]["num_samples"] == 180
    with pytest.raises(ValueError):
        load_mnist1d_split(0, 10, 10, cache_dir=None)


def _check_runs(result, phases=("tune", "final")):
    assert result["complete"] is True
    assert result["metadata"]["data"]["generation"]["seed"] == 42
    assert {r["phase"] for r in result["runs"]} == set(phases)
    for r in result["runs"]:
        assert r["epsilon_spent"] <= r["spec"]["epsilon"] + 1e-9
        if r["phase"] == "tune":
            assert "test_accuracy" not in r and 0.0 <= r["val_accuracy"] <= 1.0  # tuning never reads test
        else:
            assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_ece"] <= 1.0


def test_main_study_smoke(bench, tmp_path):
    out = tmp_path / "main.json"
    result = bench.main(["--study", "main", "--preset", "smoke", "--out", str(out), "--no-progress"])
    _check_runs(result)
    runs = result["runs"]
    # the same tuning budget for every method: DP-SGD over lrs, the ρ methods over lr × ρ
    for m in ("dpsgd", "dpsat", "dpsat_last", "dpsam"):
        tune = [r for r in runs if r["phase"] == "tune" and r["spec"]["method"] == m]
        assert len(tune) == 2
        best = max(tune, key=lambda r: r["val_accuracy"])
        finals = [r for r in runs if r["phase"] == "final" and r["spec"]["method"] == m]
        assert [r["spec"]["seed"] for r in finals] == [0, 1]
        assert all((r["spec"]["lr"], r["spec"]["rho"]) == (best["spec"]["lr"], best["spec"]["rho"]) for r in finals)
        assert all(r["sharpness"]["hessian_top_eigenvalue"] > 0 for r in finals)
    assert {r["spec"]["rho"] for r in runs if r["spec"]["method"] == "dpsgd"} == {0.0}
    sigma = {r["spec"]["method"]: r["noise_multiplier"] for r in runs}
    assert sigma["dpsam"] > sigma["dpsgd"] == sigma["dpsat"] == sigma["dpsat_last"]  # DP-SAM pays two queries
    comps = {c["method"]: c for c in result["paired_vs_dpsgd"]}
    assert set(comps) == {"dpsat", "dpsat_last", "dpsam"} and comps["dpsat"]["test_accuracy"]["seeds"] == [0, 1]
    assert bench.holm([c["test_accuracy"].get("p_value") for c in result["paired_vs_dpsgd"]]) == \
        [c["test_accuracy"].get("p_holm") for c in result["paired_vs_dpsgd"]]
    assert (tmp_path / "main_accuracy_vs_epsilon.png").stat().st_size > 0
    assert (tmp_path / "main_sharpness.png").stat().st_size > 0
    # --resume reuses every run; sharpness study takes the selected settings from the main JSON
    again = bench.main(["--study", "main", "--preset", "smoke", "--out", str(out), "--no-progress", "--resume"])
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in runs]
    assert again["wall_seconds"] >= result["wall_seconds"]  # a resumed study's wall time adds up
    # --reuse merges parts run in parallel (here: one method's part) into a new JSON without a new run
    part = bench.main(["--study", "main", "--preset", "smoke", "--out", str(tmp_path / "part.json"), "--no-progress",
                       "--methods", "dpsam", "--reuse", str(out)])
    assert [r["seconds"] for r in part["runs"]] == [r["seconds"] for r in runs if r["spec"]["method"] == "dpsam"]
    merged = bench.main(["--study", "main", "--preset", "smoke", "--out", str(tmp_path / "merged.json"),
                         "--no-progress", "--reuse", str(tmp_path / "part.json"), str(out)])
    assert sorted(r["seconds"] for r in merged["runs"]) == sorted(r["seconds"] for r in runs)
    assert merged["summary"] == result["summary"]
    assert [(r["file"], r["runs"]) for r in merged["reused_from"]] == [("part.json", 4), ("main.json", len(runs))]
    assert all("--study main" in r["command"] for r in merged["reused_from"])
    sharp = bench.main(["--study", "sharpness", "--preset", "smoke", "--out", str(tmp_path / "sharp.json"),
                        "--no-progress", "--settings-from", str(out), "--seeds", "0"])
    _check_runs(sharp, phases=("final",))
    assert sharp["settings"]["dpsat"]["rho"] == result["selected"]["dpsat@3"]["rho"]
    assert [p["rho"] for p in sharp["runs"][0]["sharpness"]["perturbations"]] == [0.05, 0.1, 0.5]
    # accuracy and λ_max vs ρ, pooled over JSONs (DP-SGD is ρ = 0)
    sweep = tmp_path / "sweep.png"
    drawn = bench.main(["--study", "plot", "--inputs", str(out), str(tmp_path / "sharp.json"), "--rho-sweep", str(sweep)])
    assert str(sweep) in drawn["plots"] and sweep.stat().st_size > 0


def test_last_update_direction_reaches_the_optimizer(bench, monkeypatch):
    from dpsat_fast import train as train_module
    from dpsat_fast.optim import DPSAT

    seen = []
    original = DPSAT.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.direction)

    monkeypatch.setattr(DPSAT, "__init__", spy)
    with bench.sam_direction("last_update") as state:
        train_module.train(train_module.parse_args(["--epochs", "1", "--no-progress", "--noise-multiplier", "1",
                                                    "--accountant", "rdp"]))
    assert state["applied"] and seen == ["last_update"]
    assert train_module.PrivacyEngine.__name__ == "PrivacyEngine"  # restored


@pytest.mark.parametrize("study", ["selection", "clipping", "pruning"])
def test_side_studies_smoke(bench, tmp_path, study):
    out = tmp_path / f"{study}.json"
    result = bench.main(["--study", study, "--preset", "smoke", "--out", str(out), "--no-progress"])
    _check_runs(result)
    summary = result["summary"]
    if study == "selection":
        assert [s["trainable"] for s in summary] == ["all", "head"]
        assert result["pretrained"]["public_val_accuracy"] > 0.2  # a real (if tiny) public model
        assert all(r["n_train_used"] < 400 for r in result["runs"])  # private classes only
        assert (tmp_path / "selection.png").exists()
    if study == "clipping":
        assert [s["max_grad_norm"] for s in summary] == [0.1, 10.0]
        lrs = {r["spec"]["max_grad_norm"]: r["spec"]["lr"] for r in result["runs"] if r["phase"] == "tune"}
        assert lrs == {0.1: 10.0, 10.0: 0.1}  # the lr grid scales with 1/C
    if study == "pruning":
        assert [(s["prune"], s["grad_keep"]) for s in summary] == [(0.0, None), (0.8, None), (None, 0.5)]
        assert (tmp_path / "pruning_accuracy_vs_pruning.png").exists()
    # every configuration against the reference one (all layers / the largest C / unpruned), paired by seed
    comps = [(bench.label(c["config"]), bench.label(c["reference"])) for c in result["paired_vs_reference"]]
    assert comps == {"selection": [("ε=1, train head", "ε=1, train all")], "clipping": [("ε=3, C=0.1", "ε=3, C=10")],
                     "pruning": [("ε=3, pre-prune 80%", "ε=3, pre-prune 0%"),
                                 ("ε=3, grad keep 50%", "ε=3, pre-prune 0%")]}[study]
    for c in result["paired_vs_reference"]:
        runs = {r["spec"]["seed"]: r for r in result["runs"] if r["phase"] == "final"
                and all(r["spec"].get(k) == v for k, v in c["config"].items())}
        ref = {r["spec"]["seed"]: r for r in result["runs"] if r["phase"] == "final"
               and all(r["spec"].get(k) == v for k, v in c["reference"].items())}
        assert c["test_accuracy"]["differences"] == [runs[s]["test_accuracy"] - ref[s]["test_accuracy"] for s in (0, 1)]
    replot = bench.main(["--study", "plot", "--inputs", str(out)])
    assert replot["plots"]


def test_cpu_preset_is_the_documented_protocol(bench):
    """The preset the committed results were run with: ≥ 40k training examples, 5 seeds at ε ∈ {1, 3, 8} for every
    method, the same tuning budget (|lrs| × |rhos|) per method, and smaller side studies."""
    main = bench.parse(["--study", "main", "--preset", "cpu"])
    assert (main.n_train, main.n_val, main.n_test, main.epochs, main.batch_size) == (40_000, 5_000, 10_000, 1, 250)
    assert main.epsilons == [1.0, 3.0, 8.0] and main.tune_epsilons == [3.0] and main.seeds == [0, 1, 2, 3, 4]
    assert main.methods == list(bench.METHODS)
    assert len({len(bench.candidates(m, main)) for m in main.methods}) == 1
    sel = bench.parse(["--study", "selection", "--preset", "cpu"])
    assert sel.epsilons == [1.0, 3.0] and sel.seeds == [0, 1, 2, 3, 4] and "head" in sel.selections
    assert bench.parse(["--study", "clipping", "--preset", "cpu"]).clip_norms == [0.1, 1.0, 10.0]


def test_holm_adjustment(bench):
    # sorted 0.01, 0.03, 0.04 -> 3·0.01, max(0.03, 2·0.03), max(0.06, 1·0.04); None is not part of the family
    assert bench.holm([0.04, None, 0.01, 0.03]) == pytest.approx([0.06, None, 0.03, 0.06])
    assert bench.holm([0.04, 0.001, 0.02]) == pytest.approx([0.04, 0.003, 0.04])
    assert bench.holm([0.9, 0.8]) == [1.0, 1.0] and bench.holm([]) == []


def test_a_stopped_resumed_study_keeps_the_runs_it_had_not_reached(bench, tmp_path):
    """--resume rewrites the JSON after every run: until the study completes, the runs of the file that this process
    has not reached yet stay in it (a second stop loses nothing); the wall time adds up over the processes."""
    import json

    out = tmp_path / "main.json"
    row = {"spec": {"phase": "final", "method": "dpsgd", "seed": 3}, "phase": "final", "seconds": 1.0}
    out.write_text(json.dumps({"wall_seconds": 100.0, "runs": [row]}))
    opts = bench.parse(["--study", "main", "--preset", "smoke", "--resume", "--out", str(out)])
    runner = bench.Runner(opts, "main", out)
    runner.save(complete=False)
    saved = json.loads(out.read_text())
    assert saved["runs"] == [row] and saved["wall_seconds"] >= 100.0
    runner.save(complete=True)  # a complete study holds exactly the runs it asked for
    assert json.loads(out.read_text())["runs"] == []


def test_tuning_only_then_reuse(bench, tmp_path):
    """--tuning-only stops after the tuning runs (selection recorded, no final run); a later full study reuses them."""
    args = ["--study", "main", "--preset", "smoke", "--methods", "dpsgd", "dpsat", "--seeds", "0", "--no-progress"]
    tune = bench.main(args + ["--tuning-only", "--out", str(tmp_path / "tune.json")])
    assert tune["tuning_only"] and {r["phase"] for r in tune["runs"]} == {"tune"}
    assert set(tune["selected"]) == {"dpsgd@3", "dpsat@3"}
    full = bench.main(args + ["--out", str(tmp_path / "full.json"), "--reuse", str(tmp_path / "tune.json")])
    tuned = [r for r in full["runs"] if r["phase"] == "tune"]
    assert [r["seconds"] for r in tuned] == [r["seconds"] for r in tune["runs"]]  # reused, not re-run
    assert full["selected"] == tune["selected"] and "tuning_only" not in full
    assert {r["phase"] for r in full["runs"]} == {"tune", "final"}
