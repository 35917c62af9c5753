"""Private Poisson sampling: CSPRNG by default, an inclusion rate of exactly q
(also at tiny q), no sampling state on the sampler, an explicitly insecure seeded mode that warns, index sets
(training splits) and loader conversion, and the count of examples handed out.

The decision-rule tests feed the sampler controlled random bytes (``os.urandom`` / ``torch.randint`` patched)
that spell chosen 53-bit integers ``U_i`` and check that exactly ``U_i < ceil(q·2^53)`` is included, with
random bytes requested only for the examples whose prefix ties the threshold.
"""

from __future__ import annotations

import copy
import fractions
import math
import os
import pickle
import random
import time
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from dpsat_fast.data import InsecureSamplingWarning, PoissonBatchSampler, PoissonDataLoader

TWO53 = 1 << 53
# The contract of the lazy rule: U's 53 bits, most significant first, revealed one random byte at a time
# as (shift, width); the last 5 bits are the top 5 bits of the 7th byte.
DIGITS = ((45, 8), (37, 8), (29, 8), (21, 8), (13, 8), (5, 8), (0, 5))


def _digit(u: int, level: int) -> int:
    shift, width = DIGITS[level]
    return (u >> shift) & ((1 << width) - 1)


def _exact_k(q: float) -> int:
    return math.ceil(fractions.Fraction(q) * TWO53)


class ReplayBytes:
    """A random-byte source that spells preset 53-bit integers ``us`` for the lazy comparison with ``k``.

    Call ``level`` must ask for exactly the examples whose first ``level`` digits equal ``k``'s (in index
    order); it returns their digit ``level`` (plus junk in the unused low bits of the last byte).
    """

    def __init__(self, us, k):
        self.us = [int(u) for u in us]
        self.k = k
        self.level = 0
        self.junk = random.Random(1)

    def candidates(self, level):
        return [i for i, u in enumerate(self.us) if all(_digit(u, j) == _digit(self.k, j) for j in range(level))]

    def expected_calls(self):
        return max(level + 1 for level in range(len(DIGITS)) if self.candidates(level))

    def __call__(self, m):
        assert self.level < len(DIGITS), "asked for more than 53 bits"
        cand = self.candidates(self.level)
        assert m == len(cand), f"level {self.level}: asked for {m} bytes, {len(cand)} examples tie the threshold"
        _, width = DIGITS[self.level]
        out = bytes((_digit(self.us[i], self.level) << (8 - width)) | self.junk.randrange(1 << (8 - width))
                    for i in cand)
        self.level += 1
        return out


def _boundary_values(k: int, rng: random.Random, n_random: int = 40) -> list[int]:
    """53-bit integers around k: sharing k's first L digits, then one below / equal / above, for every L."""
    us = {0, TWO53 - 1, k, max(k - 1, 0), min(k + 1, TWO53 - 1)}
    for level in range(len(DIGITS)):
        shift, width = DIGITS[level]
        prefix = (k >> (shift + width)) << (shift + width)
        for d in (_digit(k, level) - 1, _digit(k, level), _digit(k, level) + 1, 0, (1 << width) - 1):
            if 0 <= d < (1 << width):
                for _ in range(2):
                    us.add(prefix | (d << shift) | rng.randrange(1 << shift))
    us.update(rng.randrange(TWO53) for _ in range(n_random))
    us = [u for u in us if 0 <= u < TWO53]
    rng.shuffle(us)
    return us


RATES = [1e-9, 3e-12, 5e-324, 2.0**-53, 1e-4, 0.01, 0.16, 1 / 3, 0.5, 0.75, 1 - 2.0**-53]


# ---------------------------------------------------------------------------
# Exact rate: the decision rule itself
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("q", RATES + [1.0])
def test_inclusion_probability_is_q_within_2_pow_minus_53(q):
    s = PoissonBatchSampler(10, q, steps=1)
    p = s.inclusion_probability
    assert p == fractions.Fraction(_exact_k(q), TWO53)
    assert 0 <= p - fractions.Fraction(q) < fractions.Fraction(1, TWO53)
    if q in (1e-9, 3e-12):  # fp32's grid would give ceil(q·2^24)/2^24 = 2^-24, i.e. ≥ 60·q
        assert p < fractions.Fraction(q) * (1 + 1e-4)  # relative error ≤ 2^-53/q


@pytest.mark.parametrize("mode", ["secure", "seeded"])
@pytest.mark.parametrize("q", RATES)
def test_decision_rule_with_controlled_bytes(monkeypatch, q, mode):
    """Feed bytes spelling chosen U_i: the batch is exactly {i : U_i < ceil(q·2^53)}, drawn lazily."""
    k = _exact_k(q)
    us = _boundary_values(k, random.Random(hash(q) & 0xFFFF))
    replay = ReplayBytes(us, k)
    if mode == "secure":
        monkeypatch.setattr(os, "urandom", replay)
        sampler = PoissonBatchSampler(len(us), q, steps=1)
    else:
        with pytest.warns(InsecureSamplingWarning):
            sampler = PoissonBatchSampler(len(us), q, steps=1, insecure_seed=0)
        def fake_randint(low, high, size, *, dtype, generator):
            assert generator is sampler.generator and (low, high, dtype) == (0, 256, torch.uint8)
            return torch.frombuffer(bytearray(replay(size[0])), dtype=torch.uint8)

        monkeypatch.setattr(torch, "randint", fake_randint)
    (batch,) = list(sampler)
    assert batch == [i for i, u in enumerate(us) if u < k]
    assert replay.level == replay.expected_calls()  # every tie was resolved, nothing else drawn
    assert k in us and replay.expected_calls() == len(DIGITS)  # U == K was carried to the last bit


def test_decision_rule_random_near_threshold(monkeypatch):
    """Many random rates, U's drawn near K (sharing a random number of leading digits)."""
    rng = random.Random(5)
    for _ in range(60):
        q = 10 ** rng.uniform(-15, 0)
        k = _exact_k(q)
        us = []
        for _ in range(64):
            level = rng.randrange(len(DIGITS) + 1)
            keep = 53 - sum(w for _, w in DIGITS[:level])  # bits below the shared prefix
            us.append(((k >> keep) << keep) | rng.randrange(1 << keep) if level < len(DIGITS) else k)
        us = [u for u in us if u < TWO53]
        replay = ReplayBytes(us, k)
        monkeypatch.setattr(os, "urandom", replay)
        (batch,) = list(PoissonBatchSampler(len(us), q, steps=1))
        assert batch == [i for i, u in enumerate(us) if u < k], q
        assert replay.level == replay.expected_calls()


def test_all_zero_and_all_one_bytes(monkeypatch):
    for q in (3e-12, 0.3):
        monkeypatch.setattr(os, "urandom", lambda m: bytes(m))  # U = 0 < K: everyone in
        assert list(PoissonBatchSampler(50, q, steps=2)) == [list(range(50))] * 2
        monkeypatch.setattr(os, "urandom", lambda m: b"\xff" * m)  # U = 2^53 - 1 ≥ K: nobody
        assert list(PoissonBatchSampler(50, q, steps=2)) == [[], []]
    # q = 1: K = 2^53, everyone, no randomness needed.
    monkeypatch.setattr(os, "urandom", lambda m: b"\xff" * m)
    assert list(PoissonBatchSampler(7, 1.0, steps=1)) == [list(range(7))]


def test_tiny_rate_is_not_on_the_fp32_grid():
    """q = 1e-9 over 2·10^8 trials: Poisson(0.2) inclusions; the fp32 grid (rate 2^-24) would give ≈ 12."""
    n, steps, q = 20_000_000, 10, 1e-9
    total = sum(len(b) for b in PoissonBatchSampler(n, q, steps=steps))
    assert total <= 4, total  # P(Poisson(0.2) ≥ 5) ≈ 2e-6


# ---------------------------------------------------------------------------
# CSPRNG by default, no state
# ---------------------------------------------------------------------------


def _dataset(n=100):
    return TensorDataset(torch.arange(n), torch.randn(n, 3))


def test_secure_by_default():
    s = PoissonBatchSampler(100, 0.1)
    assert s.secure and s.generator is None
    assert PoissonDataLoader(_dataset(), sample_rate=0.1).secure
    assert PoissonDataLoader.from_data_loader(DataLoader(_dataset(), batch_size=10, shuffle=True)).secure
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the secure mode does not warn
        list(PoissonDataLoader(_dataset(), sample_rate=0.1, steps=3))


def test_secure_sampler_reads_os_urandom(monkeypatch):
    real, drawn = os.urandom, []

    def counting(m):
        drawn.append(m)
        return real(m)

    monkeypatch.setattr(os, "urandom", counting)
    batches = list(PoissonBatchSampler(10_000, 0.01, steps=3))
    assert len(batches) == 3 and all(b for b in batches)
    assert drawn.count(10_000) == 3  # one byte per example per step ...
    assert sum(drawn) < 3 * 10_000 * 1.05  # ... and a few more for the ties only


def test_secure_sampler_ignores_the_global_rngs():
    def draw():
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        state = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        batches = list(PoissonBatchSampler(500, 0.5, steps=3))
        assert torch.equal(torch.get_rng_state(), state[0])  # the global RNGs are not consumed
        assert np.array_equal(np.random.get_state()[1], state[1]) and random.getstate() == state[2]
        return batches

    assert draw() != draw()


def test_secure_sampler_holds_no_random_state():
    s = PoissonBatchSampler(500, 0.5, steps=2)
    before = pickle.dumps(s)
    first = list(s)
    assert pickle.dumps(s) == before  # iterating changes nothing on the object (no RNG state advances)
    for k, v in vars(s).items():
        assert not isinstance(v, (torch.Generator, np.random.Generator, np.random.RandomState, random.Random,
                                  bytes, bytearray)), k
    # Copies (as in a checkpoint or a worker) do not replay each other's batches.
    clones = [pickle.loads(pickle.dumps(s)), copy.deepcopy(s), copy.deepcopy(s)]
    draws = [first] + [list(c) for c in clones]
    assert all(draws[i] != draws[j] for i in range(len(draws)) for j in range(i))


def test_secure_sampler_is_fast():
    """Millions of examples per step: about one random byte per example, vectorized."""
    s = PoissonBatchSampler(2_000_000, 256 / 2_000_000, steps=1)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        next(iter(s))
        best = min(best, time.perf_counter() - t0)
    assert best < 0.5, best


# ---------------------------------------------------------------------------
# The insecure seeded mode
# ---------------------------------------------------------------------------


def test_seeded_mode_warns_once_and_reproduces():
    ds = _dataset(200)

    def draw(**kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = PoissonDataLoader(ds, sample_rate=0.05, steps=30, **kw)
            out = [[b[0].tolist() for b in loader] for _ in range(2)]  # two epochs
        insecure = [w for w in caught if issubclass(w.category, InsecureSamplingWarning)]
        assert len(insecure) == 1, [str(w.message) for w in caught]
        msg = str(insecure[0].message).lower()
        assert "reproducible" in msg and "not private" in msg
        assert insecure[0].filename == __file__  # points at the user's line
        assert not loader.secure and loader.batch_sampler.generator is not None
        return out

    a = draw(generator=torch.Generator().manual_seed(5))
    assert a == draw(generator=torch.Generator().manual_seed(5)) == draw(insecure_seed=5)
    assert a != draw(insecure_seed=6)
    assert a[0] != a[1]  # successive epochs differ: the generator advances
    with pytest.warns(InsecureSamplingWarning, match="NOT private"):
        s = PoissonBatchSampler(100, 0.1, generator=torch.Generator().manual_seed(0))
    assert not s.secure
    with pytest.warns(InsecureSamplingWarning):
        loader = PoissonDataLoader.from_data_loader(DataLoader(ds, batch_size=10), generator=torch.Generator())
    assert not loader.secure


def test_seeded_mode_state_restores_the_batches():
    """What a checkpoint of the seeded mode relies on: the generator's state determines the batches."""
    with pytest.warns(InsecureSamplingWarning):
        s = PoissonBatchSampler(300, 0.1, steps=4, insecure_seed=3)
    state = s.generator.get_state()
    first = list(s)
    s.generator.set_state(state)
    assert list(s) == first


def test_seeded_mode_bad_arguments():
    with pytest.raises(ValueError, match="at most one"):
        PoissonBatchSampler(10, 0.1, generator=torch.Generator(), insecure_seed=1)
    for seed in (1.5, "1", True):
        with pytest.raises(ValueError, match="insecure_seed"):
            PoissonBatchSampler(10, 0.1, insecure_seed=seed)
    with pytest.raises(ValueError, match="generator"):
        PoissonBatchSampler(10, 0.1, generator=np.random.default_rng(0))


# ---------------------------------------------------------------------------
# Index sets
# ---------------------------------------------------------------------------


def test_sampler_over_an_index_set():
    rng = np.random.default_rng(0)
    idx = rng.choice(1000, size=300, replace=False)
    q, steps = 0.1, 3000
    s = PoissonBatchSampler(None, q, steps=steps, indices=idx)
    assert s.num_samples == 300 and s.expected_batch_size == pytest.approx(30.0)
    assert PoissonBatchSampler(300, q, indices=torch.as_tensor(idx)).num_samples == 300
    pos = {int(v): i for i, v in enumerate(idx)}
    counts = np.zeros(300, dtype=np.int64)
    sizes = []
    for batch in s:
        assert all(type(i) is int for i in batch)
        p = [pos[i] for i in batch]  # KeyError if a held-out index is drawn
        assert p == sorted(p)
        counts[p] += 1
        sizes.append(len(batch))
    z = (np.mean(sizes) - 30) / math.sqrt(300 * q * (1 - q) / steps)
    assert abs(z) < 5, z
    chi2 = (((counts - steps * q) ** 2) / (steps * q * (1 - q))).sum()
    assert 1e-6 < stats.chi2.sf(chi2, 300) < 1 - 1e-6  # every index of the set at rate q


class SplitOnly(Dataset):
    """Examples outside the training split must never be read (not even for empty-batch collation)."""

    def __init__(self, n, split):
        self.n, self.split = n, set(int(i) for i in split)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert i in self.split, f"held-out example {i} read"
        return torch.full((2,), float(i)), i


def test_loader_over_an_index_set_with_empty_batches():
    split = [7, 3, 11, 19]
    loader = PoissonDataLoader(SplitOnly(20, split), sample_rate=0.05, steps=60, indices=split)
    assert loader.num_samples == 4 and loader.expected_batch_size == pytest.approx(0.2)
    assert list(loader.indices) == split
    seen_empty = 0
    for x, y in loader:
        assert x.shape[1:] == (2,) and y.dtype == torch.int64
        assert set(y.tolist()) <= set(split)
        seen_empty += x.shape[0] == 0
    assert seen_empty > 0  # P(empty) = 0.95^4 ≈ 0.81
    loader = PoissonDataLoader(SplitOnly(20, split), expected_batch_size=2, indices=split)
    assert loader.sample_rate == pytest.approx(0.5) and len(loader) == 2


@pytest.mark.parametrize(
    "bad, match",
    [([1, 2, 2], "duplicates"), ([-1, 2], "non-negative"), ([1, 25], r"\[0, len\(dataset\)=20\)"),
     ([[1, 2]], "1-D"), ([], "empty"), ([True, False], "integer"), ([0.5, 1.0], "integer")],
)
def test_bad_index_sets(bad, match):
    with pytest.raises(ValueError, match=match):
        PoissonDataLoader(_dataset(20), sample_rate=0.1, indices=bad)


def test_index_set_size_checks():
    with pytest.raises(ValueError, match="expected_batch_size"):
        PoissonDataLoader(_dataset(20), expected_batch_size=4, indices=[1, 2, 3])  # B > len(indices)
    with pytest.raises(ValueError, match="len\\(indices\\)"):
        PoissonBatchSampler(5, 0.1, indices=[1, 2, 3])


# ---------------------------------------------------------------------------
# from_data_loader respects the loader's sampler
# ---------------------------------------------------------------------------


class IndicesSampler(Sampler[int]):
    """A SubsetRandomSampler look-alike (has .indices)."""

    def __init__(self, indices):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


@pytest.mark.parametrize("kind", ["subset", "subset_tensor", "lookalike"])
def test_from_data_loader_uses_the_training_split(kind):
    n, train = 100, list(range(0, 100, 4))  # 25 training examples, 75 held out
    ds = SplitOnly(n, train)
    sampler = {"subset": SubsetRandomSampler(train), "subset_tensor": SubsetRandomSampler(torch.tensor(train)),
               "lookalike": IndicesSampler(train)}[kind]
    plain = DataLoader(ds, batch_size=5, sampler=sampler)
    loader = PoissonDataLoader.from_data_loader(plain)
    assert loader.num_samples == 25 and loader.sample_rate == pytest.approx(5 / 25)
    assert loader.expected_batch_size == pytest.approx(5.0) and len(loader) == len(plain) == 5
    assert loader.batch_sampler.num_samples == 25 and sorted(loader.indices.tolist()) == train
    seen = set()
    for _ in range(40):
        for _, y in loader:
            seen.update(y.tolist())
    assert seen == set(train)  # over 200 steps at q = 0.2 every training example shows up, nothing else


@pytest.mark.parametrize("shuffle", [True, False])
def test_from_data_loader_whole_dataset(shuffle):
    ds = _dataset(100)
    loader = PoissonDataLoader.from_data_loader(DataLoader(ds, batch_size=10, shuffle=shuffle))
    assert loader.indices is None and loader.num_samples == 100 and loader.sample_rate == pytest.approx(0.1)
    loader = PoissonDataLoader.from_data_loader(DataLoader(ds, batch_size=10, sampler=RandomSampler(ds, num_samples=100)))
    assert loader.num_samples == 100


def test_from_data_loader_refuses_distributed_sampler_and_points_to_the_distributed_loader():
    ds = _dataset(100)
    plain = DataLoader(ds, batch_size=10, sampler=DistributedSampler(ds, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match="(?s)DistributedSampler.*DistributedPoissonDataLoader"):
        PoissonDataLoader.from_data_loader(plain)


@pytest.mark.parametrize("make", [
    lambda ds: WeightedRandomSampler(torch.ones(len(ds)), num_samples=len(ds)),
    lambda ds: RandomSampler(ds, replacement=True),
    lambda ds: RandomSampler(ds, num_samples=50),
    lambda ds: SequentialSampler(range(40)),
    lambda ds: IndicesSampler([1, 1, 2]),  # duplicates
    lambda ds: type("Custom", (Sampler,), {"__iter__": lambda self: iter(range(10)), "__len__": lambda self: 10})(),
])
def test_from_data_loader_refuses_non_uniform_samplers(make):
    ds = _dataset(100)
    with pytest.raises(ValueError) as err:
        PoissonDataLoader.from_data_loader(DataLoader(ds, batch_size=10, sampler=make(ds)))
    msg = str(err.value)
    assert ("uniform index set" in msg and "PoissonDataLoader(" in msg) or "duplicates" in msg, msg


# ---------------------------------------------------------------------------
# Examples handed out
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_examples_yielded_counts_at_hand_out(num_workers):
    ds = _dataset(60)
    loader = PoissonDataLoader(ds, sample_rate=0.5, steps=8, num_workers=num_workers)
    assert loader.examples_yielded == 0 and loader.last_batch_size is None
    total = 0
    for epoch in range(2):
        it = iter(loader)
        for step in range(8):
            ids, _ = next(it)
            if num_workers and step == 0:
                time.sleep(0.2)  # let the workers prefetch: sampled, not yet handed out
            total += len(ids)
            assert loader.last_batch_size == len(ids)
            assert loader.examples_yielded == total
        with pytest.raises(StopIteration):
            next(it)
        assert loader.examples_yielded == total
    it = iter(loader)  # an abandoned epoch counts only what was handed out
    ids, _ = next(it)
    del it
    assert loader.examples_yielded == total + len(ids) and loader.last_batch_size == len(ids)


@pytest.mark.filterwarnings("ignore::dpsat_fast.data.InsecureSamplingWarning")
def test_examples_yielded_with_empty_batches_and_opaque_collate():
    """The count comes from the sampled indices, not from the collated output (here an opaque string)."""
    loader = PoissonDataLoader(_dataset(10), sample_rate=0.05, steps=40, collate_fn=lambda items: "opaque",
                               insecure_seed=1)
    expected = [len(b) for b in PoissonBatchSampler(10, 0.05, steps=40, insecure_seed=1)]
    sizes = []
    for batch in loader:
        assert batch == "opaque"
        sizes.append(loader.last_batch_size)
    assert sizes == expected and 0 in sizes and max(sizes) > 0
    assert loader.examples_yielded == sum(expected)
