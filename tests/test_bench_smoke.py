"""Smoke tests of bench/throughput.py on the smallest model: rows are produced, and each DP provider
really releases the flat-clipped mean plus N(0, σ²C²)/B² noise (checked against torch.func); and of
bench/bench_kernels.py on two ResNet-18 layers."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

BENCH_PATH = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"
KERNELS_BENCH_PATH = BENCH_PATH.with_name("bench_kernels.py")


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("isolation", ["subprocess", "inprocess"])
def test_main_produces_rows(throughput, tmp_path, isolation):
    out = tmp_path / "throughput.json"
    result = throughput.main([
        "--models", "digits_cnn", "--batch-sizes", "8", "--iters", "1", "--warmup", "1",
        "--providers", "nonprivate", "torch_func", "--device", "cpu", "--isolation", isolation,
        "--out", str(out),
    ])
    rows = result["rows"]
    assert [(r["model"], r["batch_size"], r["provider"]) for r in rows] == [
        ("digits_cnn", 8, "nonprivate"), ("digits_cnn", 8, "torch_func")]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["ms_per_step"] > 0 and r["examples_per_s"] > 0
        assert len(r["times_ms"]) == 1
        assert r["throughput_ratio"] > 0
        if isolation == "subprocess":
            assert r["peak_mb"] is not None and r["peak_mb"] >= 0
    assert rows[0]["throughput_ratio"] == pytest.approx(1.0)
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(rows))
    metadata = written["metadata"]
    for key in ("device_name", "torch", "opacus", "dpsat_fast", "python", "num_threads", "date", "command"):
        assert key in metadata
    assert metadata["num_threads"] == 2


def test_failing_provider_is_recorded_not_raised(throughput, monkeypatch):
    class Broken(throughput.Provider):
        name = "broken"

        def __init__(self, *args):
            raise RuntimeError("boom")

    monkeypatch.setitem(throughput.PROVIDERS, "broken", Broken)
    row = throughput.run_job("digits_cnn", 4, "broken", "cpu", warmup=1, iters=1,
                             cfg=throughput.StepConfig())
    assert row["status"] == "error" and "boom" in row["error"]


@pytest.mark.parametrize("provider", ["opacus_hooks", "opacus_ghost", "torch_func", "dpsat_fast"])
def test_dp_provider_clips_and_adds_noise(throughput, provider):
    try:
        report = throughput.verify_provider(provider, "digits_cnn", batch_size=16)
    except throughput.ProviderSkipped as exc:
        pytest.skip(str(exc))
    assert report["fraction_clipped"] == pytest.approx(0.5)
    assert report["max_rel_err_noiseless"] < 1e-4
    # ~14k noise coordinates: the sample std is within a few percent of σC/B.
    assert abs(report["noise_std_ratio"] - 1.0) < 0.05
    assert abs(report["noise_mean_over_std"]) < 0.05


def test_bench_kernels_cpu_smoke(tmp_path):
    """bench_kernels.py end to end in a subprocess: two ResNet-18 layers at batch 2, all providers timed
    (positive medians, ratios from the same run) and the dpsat_fast results verified."""
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, str(KERNELS_BENCH_PATH), "--device", "cpu", "--batch", "2", "--max-layers", "2",
         "--models", "resnet18", "--cpu-rounds", "3", "--cpu-block-s", "0.01", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    metadata = result["metadata"]
    assert metadata["device"] == "cpu" and metadata["device_name"]
    for key in ("torch", "triton", "dpsat_fast", "python", "num_threads", "date", "command"):
        assert key in metadata
    rows = result["results"]
    assert [(r["model"], r["kind"]) for r in rows] == [("resnet18", "conv"), ("resnet18", "conv")]
    for r in rows:
        assert r["T"] > 0 and r["D"] > 0 and r["P"] > 0 and r["route"] in ("ghost", "instantiate")
        for provider in ("dpsat_fast", "materialized", "torch_func", "pytorch_ops"):
            assert r["providers"][provider]["ms"] > 0, r["providers"][provider]
        assert r["providers"]["dpsat_fast"]["norms_ms"] > 0
        assert r["providers"]["dpsat_fast"]["clipped_sum_ms"] > 0
        assert r["materialized/dpsat_fast"] > 0 and r["torch_func/dpsat_fast"] > 0
        assert r["verify"]["ok"], r["verify"]
    assert result["summary"]["resnet18"]["layers"] == 2


def test_dp_finetune_digits_smoke(tmp_path):
    """The issue-6 experiment script end to end: public pretraining, private fine-tuning of a selection, JSON."""
    out = tmp_path / "finetune.json"
    script = BENCH_PATH.with_name("dp_finetune_digits.py")
    proc = subprocess.run([sys.executable, str(script), "--seeds", "0", "1", "--studies", "selection", "--epochs", "1",
                           "--max-configs", "2", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["trainable"] for r in result["rows"]] == ["all", "norms+head"]
    for row in result["rows"]:
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        assert all(r["epsilon"] <= 1.0 + 1e-9 for r in row["runs"])  # the selection study's first ε is 1
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and 0.0 <= row["ece_mean"] <= 1.0
    assert all(p["public_test_accuracy"] > 0.8 for p in result["pretrained"])  # the public model is a real one
