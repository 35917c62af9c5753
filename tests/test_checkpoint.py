"""Checkpoint and resume: privacy spent survives a restart, nothing secret is saved, a resumed run never
replays noise, a refused checkpoint changes nothing, writes are atomic, Opacus' keywords work."""

import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dpsat_fast import PoissonDataLoader, PrivacyEngine


def _dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(60, 1, 6, 6, generator=g), torch.randint(0, 3, (60,), generator=g))


def _model(init_seed):
    torch.manual_seed(init_seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _fresh_run(init_seed, method, accountant="rdp"):
    model = _model(init_seed)
    loader = PoissonDataLoader(_dataset(), sample_rate=0.2, steps=5)
    pe = PrivacyEngine(accountant)
    kw = dict(sam_rho=0.1) if method == "dpsat" else dict(sam_rho=0.1, sam_method="dpsam") if method == "dpsam" else {}
    model, opt, loader = pe.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, **kw)
    return pe, model, opt, loader


def _epoch(model, opt, loader):
    for x, y in loader:
        def closure():
            if len(y):
                F.cross_entropy(model(x), y).backward()
        opt.step(closure)
        opt.zero_grad()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["dpsgd", "dpsat", "dpsam"])
def test_resume_keeps_the_privacy_spent_and_the_optimizer_state(tmp_path, method):
    pe, model, opt, loader = _fresh_run(0, method)
    _epoch(model, opt, loader)
    pe.save_checkpoint(tmp_path / "ckpt.pt", epoch=1)
    saved = {"params": _params(model), "state": opt.state_dict(), "eps": pe.get_epsilon(1e-5)}

    pe2, model2, opt2, loader2 = _fresh_run(123, method)  # a new process: other init
    assert pe2.load_checkpoint(tmp_path / "ckpt.pt") == {"epoch": 1}
    assert pe2.accountant.steps == 5 == opt2.steps and pe2.get_epsilon(1e-5) == saved["eps"]
    assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), saved["params"]))
    for s2, s in zip(opt2.state_dict()["state"].values(), saved["state"]["state"].values()):
        assert torch.equal(s2["momentum_buffer"], s["momentum_buffer"])
    if method == "dpsat":
        assert all(torch.equal(a, b) for a, b in zip(opt2.perturbation, opt.perturbation))
    for _ in range(2):
        _epoch(model2, opt2, loader2)
    assert pe2.accountant.steps == 15 and pe2.get_epsilon(1e-5) > saved["eps"]


def test_checkpoint_and_optimizer_state_hold_no_secret(tmp_path):
    pe, model, opt, loader = _fresh_run(0, "dpsat")
    _epoch(model, opt, loader)
    assert "noise_seed" not in str(opt.state_dict())
    pe.save_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    found = []

    def scan(obj, where):
        if isinstance(obj, dict):
            for k, v in obj.items():
                assert "seed" not in str(k) and "sampler" not in str(k), f"{where}.{k}"
                scan(v, f"{where}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                scan(v, f"{where}[{i}]")
        elif isinstance(obj, int) and obj == opt.noise_seed:
            found.append(where)

    scan(ckpt, "ckpt")
    assert not found, f"the noise key is in the checkpoint at {found}"


def test_a_resumed_run_draws_a_fresh_key_and_never_replays_noise(tmp_path):
    """Two runs resumed from one checkpoint release different noise for the same next step (the old format
    stored the key, so a resumed run replayed the interrupted run's later noise bit for bit)."""
    pe, model, opt, loader = _fresh_run(0, "dpsgd")
    _epoch(model, opt, loader)
    pe.save_checkpoint(tmp_path / "ckpt.pt")
    key = opt.noise_seed
    released = []
    for seed in (1, 2):
        pe2, model2, opt2, _ = _fresh_run(seed, "dpsgd")
        pe2.load_checkpoint(tmp_path / "ckpt.pt")
        assert opt2.noise_seed != key
        opt2.privatize_gradients()  # an empty step: pure noise
        released.append(torch.cat([p.grad.flatten() for p in model2.parameters()]))
    assert not torch.equal(released[0], released[1])


def _assert_unchanged(pe, model, opt, before):
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before["params"]))
    assert pe.accountant.steps == before["steps"] == opt.steps
    assert opt.noise_offset == before["offset"]


def _snapshot(pe, model, opt):
    return {"params": _params(model), "steps": pe.accountant.steps, "offset": opt.noise_offset}


def test_a_ledger_that_disagrees_with_the_optimizer_is_refused_and_nothing_changes(tmp_path):
    pe, model, opt, loader = _fresh_run(0, "dpsgd")
    _epoch(model, opt, loader)
    pe.save_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["accountant"] = PrivacyEngine("rdp").accountant.state_dict()  # an empty (foreign) ledger
    torch.save(ckpt, tmp_path / "foreign.pt")
    pe2, model2, opt2, loader2 = _fresh_run(1, "dpsgd")
    _epoch(model2, opt2, loader2)
    before = _snapshot(pe2, model2, opt2)
    with pytest.raises(ValueError, match="ledger"):
        pe2.load_checkpoint(tmp_path / "foreign.pt")
    _assert_unchanged(pe2, model2, opt2, before)


def test_a_checkpoint_of_another_model_is_refused_and_nothing_changes(tmp_path):
    pe, model, opt, loader = _fresh_run(0, "dpsgd")
    _epoch(model, opt, loader)
    pe.save_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model"]["4.weight"] = torch.zeros(5, 64)
    torch.save(ckpt, tmp_path / "other.pt")
    pe2, model2, opt2, _ = _fresh_run(1, "dpsgd")
    before = _snapshot(pe2, model2, opt2)
    with pytest.raises(ValueError, match="shapes"):
        pe2.load_checkpoint(tmp_path / "other.pt")
    _assert_unchanged(pe2, model2, opt2, before)


def test_missing_ledger_refuses_to_resume(tmp_path):
    pe, model, opt, loader = _fresh_run(0, "dpsat")
    _epoch(model, opt, loader)
    pe.save_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del ckpt["accountant"]
    torch.save(ckpt, tmp_path / "no_ledger.pt")
    pe2, *_ = _fresh_run(1, "dpsat")
    with pytest.raises(ValueError, match="ledger"):
        pe2.load_checkpoint(tmp_path / "no_ledger.pt")
    assert pe2.accountant.steps == 0


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    pe, model, opt, loader = _fresh_run(0, "dpsgd")
    pe.save_checkpoint(tmp_path / "ckpt.pt", epoch=0)
    good = (tmp_path / "ckpt.pt").read_bytes()
    _epoch(model, opt, loader)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save({"partial": True}, f)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        pe.save_checkpoint(tmp_path / "ckpt.pt", epoch=1)
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_opacus_style_checkpoint_keywords(tmp_path):
    pe, model, opt, loader = _fresh_run(0, "dpsat")
    _epoch(model, opt, loader)
    pe.save_checkpoint(path=tmp_path / "ckpt.pt", module=model, optimizer=opt, checkpoint_dict={"epoch": 3})
    pe2, model2, opt2, _ = _fresh_run(1, "dpsat")
    assert pe2.load_checkpoint(path=tmp_path / "ckpt.pt", module=model2, optimizer=opt2) == {"epoch": 3}
    assert pe2.accountant.steps == 5


@pytest.mark.parametrize("method", ["dpsgd", "dpsat"])
def test_a_private_model_pickles_as_a_plain_model(method):
    pe, model, opt, loader = _fresh_run(0, method)
    _epoch(model, opt, loader)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    plain = torch.load(buf, weights_only=False)
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    assert "forward" not in plain[0].__dict__ or not hasattr(plain[0].__dict__["forward"], "record")
    pickle.dumps(plain)
