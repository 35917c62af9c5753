"""Private data-parallel training over torch.distributed (gloo, 2-3 processes spawned by the tests).

A distributed step equals the single-process step on the union batch, the noise enters once (not once per
rank), every rank ends with bit-identical weights, one example moves the release by at most lr·C/B̄, the
accountant counts the global q and steps, uneven shards and empty batches are normal, one rank's refusal
stops every rank (no silent hang), and a rank-0 checkpoint resumes on another world size.
"""

import datetime
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from dpsat_fast import PrivacyEngine
from dpsat_fast.accounting import compute_epsilon
from dpsat_fast.distributed import DistributedPoissonDataLoader
from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.optim import DPOptimizer
from dpsat_fast.validation import PrivacyConfigError

C, B_BAR = 1.0, 12.0


def _launch(fn, world: int, *args):
    """Run ``fn(rank, world, out_dir, *args)`` on ``world`` gloo ranks; returns each rank's saved result."""
    with tempfile.TemporaryDirectory() as out:
        # a file store: no TCP port to race for with other jobs
        mp.spawn(_worker, args=(world, os.path.join(out, "store"), out, fn, args), nprocs=world, join=True)
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]


def _worker(rank, world, store, out, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"{rank}.pt"))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _examples(seed, n):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _flat(ts):
    return torch.cat([t.detach().flatten() for t in ts])


# -- one release: the union batch, the noise once -------------------------------------------------------

def _release_on_shards(rank, world, sigma, key, n=7, extra_on_last=None, lr=1.0):
    """Rank r holds examples r, r + world, ... of one fixed batch of n (and the last rank ``extra_on_last``);
    returns its released gradient and its weights after one SGD step."""
    x, y = _examples(1, n)
    model = _model()
    engine = BookKeepingEngine(model, max_grad_norm=C, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), engine=engine, noise_multiplier=sigma,
                      expected_batch_size=B_BAR, allow_non_private=sigma == 0, seed=key)
    assert opt.distributed and engine.noise_planner is None
    xs, ys = x[rank::world], y[rank::world]
    if extra_on_last is not None and rank == world - 1:
        xs, ys = torch.cat([xs, extra_on_last[0]]), torch.cat([ys, extra_on_last[1]])
    if len(ys):
        F.cross_entropy(model(xs), ys, reduction="sum").backward()
    opt.step()
    return {"grad": _flat(p.grad for p in model.parameters()), "key": opt.noise_seed,
            "comm": opt.last_communication_seconds, "weights": _flat(model.parameters())}


def _release_single(sigma, key, n=7):
    x, y = _examples(1, n)
    model = _model()
    engine = BookKeepingEngine(model, max_grad_norm=C, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine=engine, noise_multiplier=sigma,
                      expected_batch_size=B_BAR, allow_non_private=sigma == 0, seed=key, distributed=False)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.privatize_gradients()
    return _flat(p.grad for p in model.parameters())


@pytest.mark.parametrize("world,n", [(2, 7), (3, 7), (3, 2)])  # (3, 2): the last rank's batch is empty
def test_distributed_release_equals_the_single_process_release_on_the_union_batch(world, n):
    results = _launch(_release_on_shards, world, 0.0, None, n)
    reference = _release_single(0.0, None, n)
    for r in results:
        torch.testing.assert_close(r["grad"], reference, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(r["grad"], results[0]["grad"]) for r in results)  # identical on every rank


def _pure_noise(rank, world, key):
    """An empty step on every rank of a model with ~1e6 parameters: the release is the noise alone."""
    torch.manual_seed(0)
    model = nn.Linear(1000, 1000)
    engine = BookKeepingEngine(model, max_grad_norm=C)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine=engine, noise_multiplier=1.0,
                      expected_batch_size=B_BAR, seed=key)
    opt.privatize_gradients()
    return _flat(p.grad for p in model.parameters())


def test_noise_is_added_once_over_all_ranks():
    results = _launch(_pure_noise, 2, None)
    noise = results[0]
    assert torch.equal(noise, results[1])
    scale = 1.0 * C / B_BAR
    z = noise.double().numpy()
    assert stats.kstest(z, "norm", args=(0, scale)).pvalue > 1e-3
    assert stats.kstest(z, "norm", args=(0, math.sqrt(2) * scale)).pvalue < 1e-6  # once per rank would be √2×


def test_the_noise_key_is_agreed_from_rank_0_and_fresh_per_run():
    a = _launch(_release_on_shards, 2, 1.0, None)
    b = _launch(_release_on_shards, 2, 1.0, None)
    assert a[0]["key"] == a[1]["key"] and b[0]["key"] == b[1]["key"] and a[0]["key"] != b[0]["key"]


# -- training: identical weights, neighbour replay, accounting, uneven shards ------------------------------

def _dataset(n, extra=None):
    x, y = _examples(2, n)
    if extra is not None:
        x, y = torch.cat([x, extra[0]]), torch.cat([y, extra[1]])
    return TensorDataset(x, y)


def _train(rank, world, method, steps, n, extra, key, lr):
    model = _model()
    pe = PrivacyEngine("rdp")
    loader = DistributedPoissonDataLoader(_dataset(n, extra), sample_rate=0.25, world_size=world, rank=rank,
                                          steps=steps, insecure_seed=None if key is None else key + rank)
    kw = dict(sam_rho=0.1) if method == "dpsat" else {}
    model, opt, loader = pe.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=C, seed=key, **kw)
    sizes = []
    for x, y in loader:
        opt.zero_grad()
        if len(y):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        sizes.append(len(y))
    return {"weights": _flat(model.parameters()), "eps": pe.get_epsilon(1e-5), "steps": pe.accountant.steps,
            "q": loader.sample_rate, "B": opt.expected_batch_size, "sizes": sizes, "shard": loader.num_samples}


@pytest.mark.parametrize("method", ["dpsgd", "dpsat"])
def test_every_rank_ends_with_identical_weights_and_the_global_accounting(method):
    results = _launch(_train, 3, method, 6, 31, None, None, 0.5)  # 31 examples: uneven shards 11/10/10
    assert [r["shard"] for r in results] == [11, 10, 10]
    for r in results[1:]:
        assert torch.equal(r["weights"], results[0]["weights"])
    q = results[0]["q"]
    assert q == 0.25 and results[0]["B"] == pytest.approx(0.25 * 31)
    assert all(r["steps"] == 6 for r in results)
    assert results[0]["eps"] == pytest.approx(compute_epsilon(1.0, 0.25, 6, 1e-5, "rdp"))


def test_neighbour_replay_across_ranks():
    """Two batches that differ in one example (added on the last rank), the same key and weights: the
    weights after one step differ by at most lr·C/B̄ (and by more than half of it: the example counts)."""
    lr = 0.3
    outlier = (1e3 * torch.randn(1, 1, 6, 6), torch.tensor([1]))
    base = _launch(_release_on_shards, 2, 1.0, 11, 7, None, lr)
    plus = _launch(_release_on_shards, 2, 1.0, 11, 7, outlier, lr)
    diff = (base[0]["weights"] - plus[0]["weights"]).norm().item()
    assert 0.5 * lr * C / B_BAR < diff <= lr * C / B_BAR * (1 + 1e-4)


# -- refusals do not hang the other ranks -----------------------------------------------------------------

def _one_rank_refuses(rank, world):
    model = _model()
    engine = BookKeepingEngine(model, max_grad_norm=C)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine=engine, noise_multiplier=1.0,
                      expected_batch_size=B_BAR)
    if rank == 1:
        opt._noise_multiplier = 0.0  # a broken schedule on one rank
    try:
        opt.step()
    except PrivacyConfigError as exc:
        return str(exc)
    return "released"


def test_one_ranks_refusal_makes_every_rank_refuse():
    messages = _launch(_one_rank_refuses, 2)
    assert "another rank refused" in messages[0] and "noise_multiplier" in messages[1]


def _ranks_with_settings(rank, world, settings):
    model = _model()
    engine = BookKeepingEngine(model, max_grad_norm=settings[rank].get("C", C))
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine=engine,
                      noise_multiplier=settings[rank].get("sigma", 1.0),
                      expected_batch_size=settings[rank].get("B", B_BAR))
    before = _flat(model.parameters())
    x, y = _examples(rank, 3)
    F.cross_entropy(model(x), y).backward()
    try:
        opt.step()
    except PrivacyConfigError as exc:
        assert torch.equal(_flat(model.parameters()), before)
        return str(exc)
    return "released"


@pytest.mark.parametrize("other", [{"sigma": 0.5}, {"C": 2.0}, {"B": 6.0}], ids=["sigma", "C", "batch"])
def test_ranks_with_different_privacy_settings_release_nothing(other):
    # the noise goes in once, by every rank alike: a rank with a smaller noise (a larger C, a smaller batch)
    # would hold weights less private than the accountant says
    messages = _launch(_ranks_with_settings, 2, [{}, other])
    assert all("disagree on the privacy settings" in m for m in messages), messages
    assert _launch(_ranks_with_settings, 2, [{}, {}]) == ["released", "released"]


# -- checkpoint on one world size, resume on another --------------------------------------------------------

def _private_run(rank, world, steps):
    """This rank's private model, privacy engine, optimizer and Poisson loader (31 examples, q = 0.25)."""
    model = _model()
    pe = PrivacyEngine("rdp")
    loader = DistributedPoissonDataLoader(_dataset(31), sample_rate=0.25, world_size=world, rank=rank, steps=steps)
    model, opt, loader = pe.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=C)
    return model, pe, opt, loader


def _train_on(model, opt, loader):
    for x, y in loader:
        opt.zero_grad()
        if len(y):
            F.cross_entropy(model(x), y).backward()
        opt.step()


def _train_and_save(rank, world, path):
    model, pe, opt, loader = _private_run(rank, world, steps=3)
    _train_on(model, opt, loader)
    if rank == 0:
        pe.save_checkpoint(path)
    return _flat(model.parameters())


def _resume(rank, world, path):
    model, pe, opt, loader = _private_run(rank, world, steps=2)
    pe.load_checkpoint(path)
    resumed = _flat(model.parameters())
    _train_on(model, opt, loader)
    return {"resumed": resumed, "steps": pe.accountant.steps, "weights": _flat(model.parameters())}


def test_checkpoint_of_rank_0_resumes_on_another_world_size(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    saved = _launch(_train_and_save, 2, path)[0]
    results = _launch(_resume, 3, path)
    for r in results:
        assert torch.equal(r["resumed"], saved) and r["steps"] == 5
        assert torch.equal(r["weights"], results[0]["weights"])


def test_the_torchrun_example_trains_privately_on_two_processes():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "examples/distributed_digits.py", "--epochs", "2"], cwd=root, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes: test accuracy" in out.stdout and "ε = 2.98" in out.stdout


def test_an_index_listed_twice_is_refused_even_when_the_copies_land_on_different_ranks():
    # [0, 0, 1, 1] over 2 ranks: each shard alone is [0, 1] (distinct), but example 0 would be sampled by
    # both ranks, i.e. with probability ≈ 2q per step
    data = TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    for rank in (0, 1):
        with pytest.raises(ValueError, match="duplicates"):
            DistributedPoissonDataLoader(data, sample_rate=0.5, world_size=2, rank=rank, indices=[0, 0, 1, 1])
    loader = DistributedPoissonDataLoader(data, sample_rate=0.5, world_size=2, rank=1, indices=[3, 0, 2, 1])
    assert list(loader.indices) == [0, 1] and loader.global_num_samples == 4
