"""Tests for dpsat_fast.data.

The statistical tests run on both sampling modes: the default secure one (OS
CSPRNG, different draws on every run) and the insecure seeded one (fixed seed,
deterministic). Thresholds come from the theory (|z| < 5, Bonferroni-corrected
maxima, chi-square p-values away from both tails), so they pass for any draw
but a rare ~1e-6 fluke, while a fixed-size, correlated or rate-mis-scaled
sampler fails them. The exact-rate and secrecy properties are tested in
test_sampling.py.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dpsat_fast.data import (
    InsecureSamplingWarning,
    PoissonBatchSampler,
    PoissonDataLoader,
    is_poisson_loader,
    split_micro_batches,
)

# ---------------------------------------------------------------------------
# Poisson statistics
# ---------------------------------------------------------------------------

N, Q, T = 100, 0.1, 5000


@pytest.fixture(scope="module", params=["secure", "seeded"])
def inclusion_matrix(request) -> np.ndarray:
    """X[t, i] = 1 iff index i is in batch t, for T batches of the sampler (secure or seeded mode)."""
    if request.param == "secure":
        sampler = PoissonBatchSampler(N, Q, steps=T)
        assert sampler.secure
    else:
        with pytest.warns(InsecureSamplingWarning):
            sampler = PoissonBatchSampler(N, Q, steps=T, generator=torch.Generator().manual_seed(2024))
    x = np.zeros((T, N), dtype=np.int64)
    n_batches = 0
    for t, batch in enumerate(sampler):
        assert len(set(batch)) == len(batch), "duplicate index in a batch"
        assert all(0 <= i < N for i in batch)
        x[t, batch] = 1
        n_batches += 1
    assert n_batches == T == len(sampler)
    return x


def test_batch_size_mean_and_variance_binomial(inclusion_matrix):
    sizes = inclusion_matrix.sum(axis=1).astype(np.float64)
    mean, var = N * Q, N * Q * (1 - Q)
    z_mean = (sizes.mean() - mean) / math.sqrt(var / T)
    assert abs(z_mean) < 5, z_mean
    # Var of the sample variance ≈ (μ4 − σ⁴)/T; for Binomial(N, q): μ4 = σ²(1 + 3(N−2)q(1−q)).
    mu4 = var * (1 + 3 * (N - 2) * Q * (1 - Q))
    z_var = (sizes.var(ddof=1) - var) / math.sqrt((mu4 - var**2) / T)
    assert abs(z_var) < 5, (sizes.var(ddof=1), var, z_var)
    # The whole distribution is Binomial(N, q): chi-square over binned sizes.
    lo, hi = 2, 20  # bins: size < lo, each of lo..hi-1, size >= hi (tails pooled)
    ks = np.arange(lo, hi)
    observed = np.array([(sizes < lo).sum()] + [(sizes == k).sum() for k in ks] + [(sizes >= hi).sum()])
    probs = np.concatenate(
        [[stats.binom.cdf(lo - 1, N, Q)], stats.binom.pmf(ks, N, Q), [stats.binom.sf(hi - 1, N, Q)]]
    )
    assert probs.sum() == pytest.approx(1.0)
    chi2 = ((observed - T * probs) ** 2 / (T * probs)).sum()
    p = stats.chi2.sf(chi2, len(probs) - 1)
    assert p > 1e-6, (chi2, p)


def test_inclusion_counts_binomial_chi_square(inclusion_matrix):
    counts = inclusion_matrix.sum(axis=0)  # per index: Binomial(T, q), independent
    chi2 = (((counts - T * Q) ** 2) / (T * Q * (1 - Q))).sum()
    p = stats.chi2.sf(chi2, N)
    # Both tails: too uneven (biased indices) or too even (e.g. a shuffled epoch walk).
    assert 1e-6 < p < 1 - 1e-6, (chi2, p)
    z = (counts - T * Q) / math.sqrt(T * Q * (1 - Q))
    assert np.abs(z).max() < stats.norm.isf(1e-4 / (2 * N)), np.abs(z).max()  # Bonferroni


def test_inclusions_pairwise_independent(inclusion_matrix):
    x = inclusion_matrix.astype(np.float64)
    co = x.T @ x  # co[i, j] = #steps where i and j are both in
    iu = np.triu_indices(N, k=1)
    pairs = co[iu]
    p2 = Q * Q
    # Aggregate: mean co-inclusion frequency ≈ q² (a fixed-size sampler gives q(Nq−1)/(N−1)).
    freq = pairs.sum() / (T * len(pairs))
    # Pair counts are correlated through shared indices; bound the variance loosely (×N).
    se = math.sqrt(p2 * (1 - p2) / (T * len(pairs)) * N)
    assert abs(freq - p2) / se < 5, (freq, p2)
    # Every pair ~ Binomial(T, q²): Bonferroni over all pairs.
    z = (pairs - T * p2) / math.sqrt(T * p2 * (1 - p2))
    assert np.abs(z).max() < stats.norm.isf(1e-4 / (2 * len(pairs))), np.abs(z).max()


def test_inclusions_independent_across_steps(inclusion_matrix):
    x = inclusion_matrix.astype(np.float64)
    # Lag-1 self co-inclusion of the same index: (T−1)·N Bernoulli(q²) draws.
    lag = (x[1:] * x[:-1]).sum()
    n = (T - 1) * N
    z = (lag - n * Q * Q) / math.sqrt(n * Q * Q * (1 - Q * Q))
    assert abs(z) < 5, z
    # Batch sizes of consecutive steps are uncorrelated.
    sizes = x.sum(axis=1)
    r = np.corrcoef(sizes[1:], sizes[:-1])[0, 1]
    assert abs(r) * math.sqrt(T) < 5, r


@pytest.mark.parametrize("q", [0.3, 1.0])
def test_other_rates(q):
    n, steps = 50, 2000
    sizes = np.array([len(b) for b in PoissonBatchSampler(n, q, steps=steps)], dtype=np.float64)
    if q == 1.0:
        assert (sizes == n).all()
    else:
        z = (sizes.mean() - n * q) / math.sqrt(n * q * (1 - q) / steps)
        assert abs(z) < 5


def test_default_steps_and_expected_batch_size():
    s = PoissonBatchSampler(1000, 0.03)
    assert len(s) == round(1 / 0.03) == 33
    assert s.expected_batch_size == pytest.approx(30.0)
    assert len(PoissonBatchSampler(10, 1.0)) == 1
    assert len(PoissonBatchSampler(10, 0.4)) == 2  # round(2.5) == 2


def test_empty_batches_are_yielded_as_empty_lists():
    n, q, steps = 20, 0.01, 200
    batches = list(PoissonBatchSampler(n, q, steps=steps))
    assert len(batches) == steps and all(isinstance(b, list) for b in batches)
    n_empty = sum(b == [] for b in batches)
    p_empty = (1 - q) ** n  # ≈ 0.82
    z = (n_empty - steps * p_empty) / math.sqrt(steps * p_empty * (1 - p_empty))
    assert abs(z) < 5, (n_empty, z)


@pytest.mark.filterwarnings("ignore::dpsat_fast.data.InsecureSamplingWarning")
def test_reproducible_with_seeded_generator():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return list(PoissonBatchSampler(200, 0.05, steps=30, generator=g))

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)
    # Successive epochs of one sampler differ (the generator advances).
    s = PoissonBatchSampler(200, 0.05, steps=30, generator=torch.Generator().manual_seed(11))
    assert list(s) != list(s)

    ds = TensorDataset(torch.arange(200))
    a = [b[0].tolist() for b in PoissonDataLoader(ds, sample_rate=0.05, steps=30, generator=torch.Generator().manual_seed(5))]
    b = [b[0].tolist() for b in PoissonDataLoader(ds, sample_rate=0.05, steps=30, generator=torch.Generator().manual_seed(5))]
    assert a == b


# ---------------------------------------------------------------------------
# Loader: empty batches, q, construction
# ---------------------------------------------------------------------------


class DictDataset(Dataset):
    """Examples as dicts with a tensor, python int/float, and a string."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"x": torch.full((2, 3), float(i), dtype=torch.float16), "y": i, "w": 0.5 * i, "name": f"ex{i}"}


def _tensor_dataset(n=20):
    return TensorDataset(torch.randn(n, 3, 4), torch.arange(n), torch.rand(n) < 0.5)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_empty_batches_tensor_dataset(num_workers):
    ds = _tensor_dataset()
    loader = PoissonDataLoader(ds, sample_rate=0.01, steps=40, num_workers=num_workers)
    n_empty = 0
    for x, y, m in loader:
        assert x.shape[1:] == (3, 4) and x.dtype == torch.float32
        assert y.dim() == 1 and y.dtype == torch.int64
        assert m.dim() == 1 and m.dtype == torch.bool
        assert x.shape[0] == y.shape[0] == m.shape[0]
        if x.shape[0] == 0:
            n_empty += 1
        else:  # the collated rows are exactly the sampled indices
            assert torch.equal(x, ds.tensors[0][y])
    # P(empty) = 0.99^20 ≈ 0.82: empties are the common case here (≥ 20 of 40 fails with P < 1e-7).
    assert n_empty >= 20


def test_empty_batches_dict_dataset_with_python_numbers():
    loader = PoissonDataLoader(DictDataset(), sample_rate=0.01, steps=100)  # no full batch: 0.82^100
    full = next(iter(DataLoader(DictDataset(), batch_size=2)))
    seen_empty = seen_full = False
    for batch in loader:
        assert set(batch) == {"x", "y", "w", "name"}
        assert batch["x"].dtype == torch.float16 and batch["x"].shape[1:] == (2, 3)
        assert batch["y"].dtype == full["y"].dtype == torch.int64
        assert batch["w"].dtype == full["w"].dtype == torch.float64
        b = batch["x"].shape[0]
        assert batch["y"].shape == (b,) and batch["w"].shape == (b,) and len(batch["name"]) == b
        seen_empty |= b == 0
        seen_full |= b > 0
    assert seen_empty and seen_full


def test_empty_batch_with_custom_collate():
    def collate(items):
        xs, ys = zip(*items)
        return {"inputs": torch.stack(xs), "targets": torch.tensor(ys)}

    ds = [(torch.ones(5), 1) for _ in range(10)]
    loader = PoissonDataLoader(ds, sample_rate=0.001, steps=3, collate_fn=collate)
    for batch in loader:
        assert batch["inputs"].shape[1:] == (5,) and batch["targets"].dtype == torch.int64


def test_sample_rate_not_derived_from_len_loader():
    ds = _tensor_dataset(200)
    loader = PoissonDataLoader(ds, sample_rate=0.05, steps=3)
    assert len(loader) == 3
    assert loader.sample_rate == 0.05 and loader.batch_sampler.sample_rate == 0.05
    assert loader.expected_batch_size == pytest.approx(10.0) and loader.num_samples == 200
    assert is_poisson_loader(loader)

    loader = PoissonDataLoader(ds, expected_batch_size=16, steps=1000)
    assert loader.sample_rate == pytest.approx(16 / 200) and len(loader) == 1000
    assert isinstance(loader.expected_batch_size, float) and loader.expected_batch_size == pytest.approx(16.0)
    assert len(PoissonDataLoader(ds, expected_batch_size=16)) == round(200 / 16)


def test_from_data_loader():
    ds = _tensor_dataset(100)
    plain = DataLoader(ds, batch_size=16, shuffle=True, drop_last=True)
    assert not is_poisson_loader(plain)
    loader = PoissonDataLoader.from_data_loader(plain)
    assert is_poisson_loader(loader)
    assert loader.sample_rate == pytest.approx(0.16)  # batch_size / N, not 1 / len(plain)
    assert len(loader) == len(plain) == 6
    sizes = [b[0].shape[0] for b in loader]
    assert len(sizes) == 6

    bs = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), 8, False)
    with pytest.raises(ValueError, match="batch_size is None"):
        PoissonDataLoader.from_data_loader(DataLoader(ds, batch_sampler=bs))


def test_is_poisson_loader():
    ds = _tensor_dataset()
    assert is_poisson_loader(PoissonDataLoader(ds, sample_rate=0.5))
    assert is_poisson_loader(DataLoader(ds, batch_sampler=PoissonBatchSampler(len(ds), 0.5)))
    assert not is_poisson_loader(DataLoader(ds, batch_size=4, shuffle=True))
    assert not is_poisson_loader(object())


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, -0.5, 1.5, float("nan"), float("inf"), None, True])
def test_bad_sample_rate(q):
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(10, q)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonDataLoader(_tensor_dataset(), sample_rate=q)


@pytest.mark.parametrize("n", [0, -3, 2.5, "10"])
def test_bad_num_samples(n):
    with pytest.raises(ValueError, match="num_samples"):
        PoissonBatchSampler(n, 0.1)


@pytest.mark.parametrize("steps", [0, -1, 1.5])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        PoissonBatchSampler(10, 0.1, steps=steps)


def test_loader_bad_args():
    ds = _tensor_dataset()
    with pytest.raises(ValueError, match="exactly one"):
        PoissonDataLoader(ds)
    with pytest.raises(ValueError, match="exactly one"):
        PoissonDataLoader(ds, sample_rate=0.1, expected_batch_size=2)
    for b in (0, -1, 21, float("nan")):
        with pytest.raises(ValueError, match="expected_batch_size"):
            PoissonDataLoader(ds, expected_batch_size=b)
    with pytest.raises(ValueError, match="non-empty"):
        PoissonDataLoader(TensorDataset(torch.zeros(0, 2)), sample_rate=0.1)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    with pytest.raises(ValueError, match="__len__"):
        PoissonDataLoader(Stream(), sample_rate=0.1)


# ---------------------------------------------------------------------------
# Micro-batching
# ---------------------------------------------------------------------------


def test_split_tensor():
    x = torch.randn(10, 3)
    chunks = list(split_micro_batches(x, 3))
    assert [c.shape[0] for c in chunks] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(chunks), x)
    assert len(list(split_micro_batches(x, 10))) == 1
    assert len(list(split_micro_batches(x, 100))) == 1


def test_split_structures():
    x, y = torch.randn(7, 2), torch.arange(7)
    chunks = list(split_micro_batches((x, y), 2))
    assert all(isinstance(c, tuple) for c in chunks)
    assert torch.equal(torch.cat([c[0] for c in chunks]), x) and torch.equal(torch.cat([c[1] for c in chunks]), y)

    chunks = list(split_micro_batches([x, y], 4))
    assert all(isinstance(c, list) for c in chunks) and [c[1].tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6]]

    chunks = list(split_micro_batches({"x": x, "y": y}, 3))
    assert [c["y"].tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]

    Pair = collections.namedtuple("Pair", "a b")
    chunks = list(split_micro_batches(Pair(x, y), 5))
    assert all(isinstance(c, Pair) for c in chunks) and torch.equal(torch.cat([c.a for c in chunks]), x)


def test_split_empty_batch_yields_one_empty_chunk():
    x, y = torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.int64)
    chunks = list(split_micro_batches((x, y), 4))
    assert len(chunks) == 1
    assert chunks[0][0].shape == (0, 3, 4) and chunks[0][1].shape == (0,) and chunks[0][1].dtype == torch.int64


def test_split_loader_batches_round_trip():
    ds = _tensor_dataset(60)
    loader = PoissonDataLoader(ds, sample_rate=0.3, steps=20)
    for batch in loader:
        chunks = list(split_micro_batches(batch, 4))
        assert len(chunks) == max(1, math.ceil(batch[0].shape[0] / 4))
        for k in range(3):
            assert torch.equal(torch.cat([c[k] for c in chunks]), batch[k])


def test_split_bad_input():
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        list(split_micro_batches(torch.zeros(4), 0))
    with pytest.raises(ValueError, match="leading batch dimension"):
        list(split_micro_batches((torch.zeros(4), torch.zeros(5)), 2))
    with pytest.raises(ValueError):
        list(split_micro_batches((torch.zeros(4), "abc"), 2))
    with pytest.raises(ValueError):
        list(split_micro_batches(torch.tensor(3.0), 2))
