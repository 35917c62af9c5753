"""The drop-in, on what Opacus users write: the scripts of examples/opacus_style/, each in the style of an
Opacus example or tutorial (or the official DP-SAT trainer) with only its marked lines changed.

For every script: its diff from the Opacus version is exactly the marked lines (the imports of
docs/migration.md, plus the documented changes), the Opacus version imports its privacy machinery from
opacus only, and the script trains here with tiny settings: ε is the accountant's ε for the σ, q and steps
used, each logical batch is released (and accounted) once, and where it is cheap the model learns.
"""

import ast
import importlib.util
import io
import math
import re
import sys
import tokenize
import types
from pathlib import Path

import pytest
import torch

from dpsat_fast.accounting import compute_epsilon
from dpsat_fast.validation import PrivacyConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "opacus_style"
NAMES = ["mnist", "cifar10", "char_lstm", "imdb", "bert_like", "ghost_clipping", "dpsat_trainer"]
WAS, ADDED = "# <- was: ", "# <- added"

# Changes that are not an import of docs/migration.md's table, each documented there: (changed code,
# Opacus / official code). "" is a line that is not in the script (removed).
OTHER_CHANGES = {
    "imdb": [("", "poisson_sampling=False,")],  # refused: "Remove poisson_sampling=False"
    "dpsat_trainer": [  # the official minimizer's two calls replaced by the DP-SAT optimizer (DP-SAT section)
        ("", "from src.optim.minimizer import DPSAT, DPSATMomentum"),
        ("", "self.minimizer.ascent_step()"),
        ("self.optimizer.step()", "self.minimizer.descent_step()"),
        ("", 'trainer.minimizer = {"DPSAT": DPSAT, "DPSATMomentum": DPSATMomentum}[args.minimizer](optimizer, '
             'model, rho=RHO)'),
    ],
}
ADDED_LINES = {"dpsat_trainer": ("sam_rho=", "sam_direction=")}  # the one DP-SAT argument (and its variant)
DATA_IMPORT = "from dpsat_fast.train import load_digits_split"  # data only, the same in the Opacus version


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The scripts' models are tiny: one intra-op thread is as fast, and is not slowed down several-fold by a
    busy machine (as two spinning threads are)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _source(name):
    return (SCRIPTS / f"{name}.py").read_text()


def _markers(source):
    """{line number: (code before the comment, kind 'was'/'added', text after the marker)} from the COMMENT
    tokens (so a marker quoted in a docstring is not one)."""
    lines = source.splitlines()
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start
        if tok.string.startswith(WAS):
            found[row] = (lines[row - 1][:col].rstrip(), "was", tok.string[len(WAS):].rstrip())
        elif tok.string.startswith(ADDED):
            found[row] = (lines[row - 1][:col].rstrip(), "added", tok.string[len(ADDED):])
    return found


def _revert(source, imports=True):
    """The Opacus version: every marked line replaced by its Opacus original (added lines dropped);
    ``imports=False`` reverts only the non-import changes (the script with Opacus' calls, our imports)."""
    markers = _markers(source)
    out = []
    for row, line in enumerate(source.splitlines(), 1):
        if row not in markers:
            out.append(line)
            continue
        code, kind, original = markers[row]
        if not imports and original.startswith(("from ", "import ")):
            out.append(line)
        elif kind == "was":
            out.append(line[:len(line) - len(line.lstrip())] + original)
    return "\n".join(out) + "\n"


def _import_table():
    """docs/migration.md's import table: {opacus module: (dpsat_fast module, names)}."""
    table = {}
    for old, new in re.findall(r"^\| `(from opacus[^`]*)` \| `(from dpsat_fast[^`]*)` \|",
                               (ROOT / "docs" / "migration.md").read_text(), flags=re.M):
        old_node, new_node = ast.parse(old).body[0], ast.parse(new).body[0]
        names = {a.name for a in old_node.names}
        assert names == {a.name for a in new_node.names}, (old, new)
        module, known = table.get(old_node.module, (new_node.module, set()))
        assert module == new_node.module
        table[old_node.module] = (module, known | names)
    return table


def _load(name, source=None):
    """The script as a module (registered in sys.modules: Opacus' ModuleValidator.fix pickles the model's
    class); ``source``: a variant of its text."""
    path = SCRIPTS / f"{name}.py"
    if source is None:
        spec = importlib.util.spec_from_file_location(f"opacus_style_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module.__name__] = module
        spec.loader.exec_module(module)
        return module
    module = types.ModuleType(f"opacus_style_{name}_variant")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def _needs_dp_rnns(name):
    if name == "char_lstm":
        layers = pytest.importorskip("dpsat_fast.layers")
        if not all(hasattr(layers, n) for n in ("DPLSTM", "DPGRU", "DPRNN")):
            pytest.skip("dpsat_fast.layers.DPLSTM/DPGRU/DPRNN are not available yet")


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _check_accounting(result, accountant="pld", sigma=None):
    """ε is the accountant's ε for (σ, q, steps); one release, one accounting step and one noise draw per
    logical batch; more physical batches than logical ones where BatchMemoryManager splits them."""
    pe, opt, loader, args = result["privacy_engine"], result["optimizer"], result["train_loader"], result["args"]
    epochs = args.epochs
    # Poisson sampling at q = batch_size / N, as many logical batches per epoch as the user's DataLoader had
    assert loader.sample_rate == pytest.approx(args.batch_size / loader.num_samples, rel=1e-12)
    assert len(loader) == math.ceil(loader.num_samples / args.batch_size)
    logical = epochs * len(loader)
    assert pe.accountant.steps == opt.steps == logical
    assert opt.noise_offset == logical * sum(p.numel() for p in _trainable(result["model"]))
    sigma = opt.noise_multiplier if sigma is None else sigma
    assert opt.noise_multiplier == sigma
    delta = args.delta
    expected = compute_epsilon(sigma, loader.sample_rate, logical, delta, accountant)
    eps = result["epsilon"]
    assert math.isfinite(eps) and eps > 0
    assert eps == pytest.approx(expected, rel=1e-9)
    return logical


# -- the diff from the Opacus version ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_marked_lines_are_the_whole_diff_from_the_opacus_version(name):
    source = _source(name)
    markers = _markers(source)
    table = _import_table()
    imports, others, added = [], [], []
    for row, (code, kind, original) in sorted(markers.items()):
        if kind == "added":
            added.append(code.strip())
        elif original.startswith(("from opacus", "import opacus")):
            imports.append((code.strip(), original))
        else:
            others.append((code.strip(), original))
    assert imports, "every script replaces at least `from opacus import PrivacyEngine`"
    for code, original in imports:  # exactly docs/migration.md's mapping: same names, mapped module
        new, old = ast.parse(code).body[0], ast.parse(original).body[0]
        assert isinstance(new, ast.ImportFrom) and isinstance(old, ast.ImportFrom), (code, original)
        assert old.module in table, f"{original!r} is not in docs/migration.md's import table"
        module, names = table[old.module]
        assert new.module == module, (code, original)
        assert [a.name for a in new.names] == [a.name for a in old.names], (code, original)
        assert {a.name for a in old.names} <= names, (code, original)
    assert others == OTHER_CHANGES.get(name, [])
    allowed = ADDED_LINES.get(name, ())
    assert all(line.startswith(allowed) for line in added) and (not added or allowed), added

    # every line of code that uses this library (other than the data) is a marked one
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row = tok.start[0]
        if tok.type == tokenize.NAME and (tok.string == "dpsat_fast" or tok.string.startswith("sam_")) \
                and lines[row - 1].strip() != DATA_IMPORT:
            assert row in markers, f"{name}.py:{row} uses dpsat_fast but is not marked: {lines[row - 1].strip()!r}"

    # the Opacus version: valid Python, its privacy machinery from opacus only
    reverted = _revert(source)
    tree = ast.parse(reverted)
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert any(m == "opacus" or m.startswith("opacus.") for m in modules)
    dp_modules = [m for m in modules if m.startswith("dpsat_fast")]
    assert dp_modules in ([], ["dpsat_fast.train"]), dp_modules
    names = [t.string for t in tokenize.generate_tokens(io.StringIO(reverted).readline) if t.type == tokenize.NAME]
    assert names.count("dpsat_fast") == len(dp_modules) and not [n for n in names if n.startswith("sam_")]


# Running each Opacus version under Opacus shows that it is the Opacus script it claims to be. Only parsed
# above: dpsat_trainer (the official minimizer is not part of Opacus) and bert_like (under Opacus 1.6 its
# forward fails: Opacus' DPMultiheadAttention refuses the float key_padding_mask that nn.TransformerEncoderLayer
# passes it, "masked_fill_ only supports boolean masks"; the version here runs).
OPACUS_RUNS = {
    "mnist": ["--epochs", "1", "--batch-size", "128"],
    "cifar10": ["--epochs", "1", "--n-train", "128", "--clip_per_layer", "-p", "1000"],
    "ghost_clipping": ["--epochs", "1"],
    "imdb": ["--epochs", "1", "--n-train", "256"],
    "char_lstm": ["--epochs", "1", "--n-samples", "200"],
}


@pytest.mark.parametrize("name", sorted(OPACUS_RUNS))
def test_the_opacus_version_runs_under_opacus(name, capsys):
    pytest.importorskip("opacus")
    module = _load(name, _revert(_source(name)))
    assert "opacus" in module.PrivacyEngine.__module__
    result = module.main(OPACUS_RUNS[name])
    assert math.isfinite(result["epsilon"]) and result["epsilon"] > 0
    assert re.search("[εɛ] ?[:=] ?[0-9]", capsys.readouterr().out)


# -- each script trains here ----------------------------------------------------------------------------


def test_mnist(capsys):
    result = _load("mnist").main(["--epochs", "2", "--sigma", "1.0", "-c", "1.0", "--batch-size", "64"])
    _check_accounting(result, sigma=1.0)
    assert result["optimizer"].max_grad_norm == 1.0
    # fresh (secret) noise every run: 2 epochs gave 0.38-0.79 test accuracy over 10 runs; chance is 0.1
    assert result["accuracy"] > 0.25
    out = capsys.readouterr().out
    assert "Test set: Average loss" in out and f"(ε = {result['epsilon']:.2f}, δ = 1e-05)" in out


@pytest.mark.parametrize("flags", [["--clip_per_layer", "--grad_sample_mode", "functorch"],
                                   ["--grad_sample_mode", "hooks"]], ids=["per_layer", "flat"])
def test_cifar10(flags, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    result = _load("cifar10").main(["--epochs", "1", "--n-train", "256", "--batch-size", "64",
                                    "--max-physical-batch-size", "16", "-p", "1000", "-c", "2.0",
                                    "--checkpoint-file", str(checkpoint)] + flags)
    logical = _check_accounting(result, sigma=1.0)
    assert len(result["losses"]) > logical  # physical batches of ≤ 16 examples, one release per logical batch
    model, opt = result["model"], result["optimizer"]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())  # fixed
    assert opt.engine.clipping.sensitivity == pytest.approx(2.0, rel=1e-6)
    if "--clip_per_layer" in flags:  # one norm per parameter tensor, 2/sqrt(n) each
        norms = result["max_grad_norm"]
        assert isinstance(norms, list) and len(norms) == len(_trainable(model))
        assert norms[0] == pytest.approx(2.0 / math.sqrt(len(norms)))
    # the example's torch.save checkpoint: model and optimizer state dicts (the script's own numpy scalars need
    # weights_only=False); the optimizer's state knows its steps
    saved = torch.load(str(checkpoint) + ".tar", weights_only=False)
    assert saved["optimizer"]["dp"]["steps"] == logical
    assert set(saved["state_dict"]) == set(model.state_dict())
    assert "Test set:" in capsys.readouterr().out


@pytest.mark.parametrize("mode,epochs,n", [("lstm", 3, 600), ("gru", 1, 300), ("rnn", 1, 300)])
def test_char_lstm(mode, epochs, n, capsys):
    _needs_dp_rnns("char_lstm")
    module = _load("char_lstm")
    result = module.main(["--mode", mode, "--epochs", str(epochs), "--n-samples", str(n), "--sigma", "1.0"])
    _check_accounting(result, sigma=1.0)
    assert type(result["model"].rnn).__module__.startswith("dpsat_fast")
    if mode == "lstm":  # 3 epochs on 600 names: 0.57-0.88 test accuracy over 10 runs; chance is 0.2
        assert result["accuracy"] > 0.35
    assert "Test Accuracy" in capsys.readouterr().out


def test_imdb_poisson_sampling_false_is_refused_with_the_fix_and_the_changed_script_trains(capsys):
    original_call = _revert(_source("imdb"), imports=False)  # our imports, Opacus' make_private call
    assert "poisson_sampling=False," in original_call and "from dpsat_fast import PrivacyEngine" in original_call
    with pytest.raises(PrivacyConfigError, match="Remove poisson_sampling=False"):
        _load("imdb", original_call).main(["--epochs", "1", "--n-train", "128"])
    result = _load("imdb").main(["--epochs", "1", "--n-train", "512"])
    _check_accounting(result, sigma=0.56)
    loader = result["train_loader"]
    assert loader.sample_rate == pytest.approx(64 / 512)  # converted to Poisson sampling at q = B / N
    assert all(math.isfinite(v) for v in result["losses"])
    assert "Test set: Average loss" in capsys.readouterr().out


def test_bert_like(capsys):
    # evaluations every 5 physical batches: in the middle of logical batches, as in the tutorial
    result = _load("bert_like").main(["--n-train", "128", "--batch-size", "32", "--max-physical-batch-size", "8",
                                      "--accountant", "rdp", "--epsilon", "7.5", "--logging-interval", "5"])
    logical = _check_accounting(result, accountant="rdp")
    assert result["epsilon"] <= 7.5 * (1 + 1e-6) and result["epsilon"] == pytest.approx(7.5, rel=0.05)
    assert len(result["losses"]) > logical
    model = result["model"]
    assert not any(type(m) is torch.nn.MultiheadAttention and any(p.requires_grad for p in m.parameters())
                   for m in model.modules())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert "Eval accuracy" in capsys.readouterr().out


def test_bert_like_freezing_survives_module_validator_fix(capsys):
    result = _load("bert_like").main(["--n-train", "32", "--batch-size", "32", "--max-physical-batch-size", "16",
                                      "--accountant", "rdp", "--logging-interval", "1000"])
    trainable = [n for n, p in result["model"].named_parameters() if p.requires_grad]
    last = len(result["model"].encoder.layers) - 1
    assert trainable and all(n.startswith((f"encoder.layers.{last}.", "pooler.", "classifier.")) for n in trainable), \
        [n for n in trainable if not n.startswith((f"encoder.layers.{last}.", "pooler.", "classifier."))]


# Empty Poisson batches: Opacus-style loops run forward, loss and backward on every batch, also an empty one
# (docs/migration.md: "an empty batch is a normal step"). With q = 1/40 over 40 steps an empty batch occurs in
# all but ~1e-8 of the runs.
def test_imdb_survives_empty_poisson_batches(capsys):
    result = _load("imdb").main(["--epochs", "1", "--n-train", "40", "--batch-size", "1"])
    _check_accounting(result, sigma=0.56)


def test_dpsat_trainer_survives_empty_poisson_batches(capsys):
    result = _load("dpsat_trainer").main(["--accountant", "rdp", "--epochs", "1", "--n_train", "40",
                                          "--batch_size", "1", "--max_physical_batch_size", "1"])
    _check_accounting(result, accountant="rdp")


def test_ghost_clipping(capsys):
    result = _load("ghost_clipping").main(["--epochs", "2", "--sigma", "1.0"])
    _check_accounting(result, sigma=1.0)
    assert result["criterion"] is result["criterion_in"]  # four return values, the criterion as given
    # 2 epochs gave 0.85-0.93 test accuracy over 10 runs; chance is 0.1
    assert result["accuracy"] > 0.5
    assert "ɛ:" in capsys.readouterr().out


def test_dpsat_trainer_trains(capsys):
    result = _load("dpsat_trainer").main(["--accountant", "rdp", "--epochs", "2", "--rho", "0.05"])
    logical = _check_accounting(result, accountant="rdp")
    assert result["epsilon"] <= 3.0 * (1 + 1e-6) and result["epsilon"] == pytest.approx(3.0, rel=0.05)
    assert result["physical_batches"] == len(result["losses"]) > logical
    assert type(result["optimizer"]).__name__ == "DPSAT" and result["optimizer"].rho == 0.05
    # 2 epochs gave 0.54-0.77 test accuracy over 10 runs; chance is 0.1
    assert result["accuracy"] > 0.25
    assert "Clean(Val)" in capsys.readouterr().out


def test_dpsat_trainer_dpsat_momentum(capsys):
    result = _load("dpsat_trainer").main(["--accountant", "rdp", "--epochs", "1", "--minimizer", "DPSATMomentum"])
    _check_accounting(result, accountant="rdp")
    assert result["optimizer"].direction == "last_update" and result["optimizer"].perturbation is not None
    assert result["optimizer"].target_epsilon == 3.0  # the official main.py's attributes on the optimizer


@pytest.mark.parametrize("rho", [0.05, 0.0], ids=["dpsat_step", "dpsgd_pre_step"])
def test_dpsat_trainer_every_physical_batch_at_the_same_perturbation_and_nothing_left_in_the_weights(rho, capsys):
    """lr = 0: the weights must not move. DP-SAT: all physical batches of logical batch t are evaluated at
    exactly w + ε_t (the official minimizer evaluates batch k at w + k·ε and leaves (k−1)·ε behind).
    ρ = 0: the DP-SGD path through pre_step() / original_optimizer.step(), never perturbed."""
    module = _load("dpsat_trainer")
    records, initial = [], {}

    class RecordingPrivacyEngine(module.PrivacyEngine):
        def make_private(self, **kwargs):
            out = super().make_private(**kwargs)
            model, opt = out[0], out[1]
            initial.update({n: p.detach().clone() for n, p in model.named_parameters()})

            def record(mod, inputs):
                if torch.is_grad_enabled():
                    eps = opt.engine.perturbation
                    records.append((opt.steps, len(inputs[0]),
                                    None if eps is None else [eps[p].clone() for p in _trainable(model)],
                                    [opt.engine.effective(p).detach().clone() for p in _trainable(model)]))
            model.register_forward_pre_hook(record)
            return out

    module.PrivacyEngine = RecordingPrivacyEngine
    result = module.main(["--accountant", "rdp", "--epochs", "1", "--lr", "0", "--rho", str(rho),
                          "--batch_size", "480", "--max_physical_batch_size", "120"])
    model = result["model"]
    steps = _check_accounting(result, accountant="rdp")
    assert steps >= 3
    for n, p in model.named_parameters():  # nothing moved, nothing left behind
        assert torch.equal(p.detach(), initial[n]), n
    weights = [initial[n] for n, p in model.named_parameters() if p.requires_grad]
    by_step = {}
    for step, size, eps, effective in records:
        by_step.setdefault(step, []).append((size, eps, effective))
    assert sorted(by_step) == list(range(steps))
    assert sum(len(v) >= 3 for v in by_step.values()) >= 3  # several logical batches of 3+ physical batches
    for step, physical in by_step.items():
        assert sum(size for size, _, _ in physical) > 0
        first_eps = physical[0][1]
        if rho == 0 or step == 0:
            assert first_eps is None  # DP-SGD, and DP-SAT's first step (no released gradient yet)
        else:
            assert first_eps is not None
            norm = torch.sqrt(sum((e.double() ** 2).sum() for e in first_eps))
            assert norm.item() == pytest.approx(rho, rel=1e-4)
        for size, eps, effective in physical:  # every physical batch at the same w + ε_t
            if first_eps is None:
                assert eps is None
                expected = weights
            else:
                assert all(torch.equal(a, b) for a, b in zip(eps, first_eps))
                expected = [w + e for w, e in zip(weights, first_eps)]
            for got, want in zip(effective, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
