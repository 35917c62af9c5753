#!/usr/bin/env python3
"""DP-SAT training written the way the official DP-SAT code trains (JinseongP/DPSAT: ``main.py`` and
``src/trainer/dptrainer.py``): a model fixed by ``ModuleValidator``, ``make_private_with_epsilon``, and
``BatchMemoryManager`` cutting every logical batch into physical batches of at most
``max_physical_batch_size``, with one ``optimizer.zero_grad()`` / forward / backward / update per physical
batch.

What changes (every changed line is marked ``# <- was:``, the added ones ``# <- added``): the official loop
drives the Opacus optimizer through a "minimizer", ``minimizer.ascent_step()`` before the forward (it adds
ε to the weights in place) and ``minimizer.descent_step()`` after the backward (``pre_step()``, subtract ε,
``original_optimizer.step()``). Under ``BatchMemoryManager`` that adds ε again at every physical batch but
subtracts it only at the last one, so physical batch k of a logical batch is evaluated at w + k·ε and
(k−1)·ε stays in the weights. Here the optimizer of ``make_private_with_epsilon(..., sam_rho=rho)`` is
DP-SAT itself: ``optimizer.step()`` at every physical batch, each evaluated at exactly w + ε, nothing
left in the weights. With ``--rho 0`` the loop is DP-SGD through Opacus' ``pre_step()`` protocol, as the
official ``descent_step`` does it: ``if optimizer.pre_step(): optimizer.original_optimizer.step()``.
Data: scikit-learn's bundled 8×8 digits (no download).

    python examples/opacus_style/dpsat_trainer.py --rho 0.05 --epochs 2
"""

import argparse

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dpsat_fast import PrivacyEngine  # <- was: from opacus import PrivacyEngine
from dpsat_fast.utils import BatchMemoryManager  # <- was: from opacus.utils.batch_memory_manager import BatchMemoryManager
from dpsat_fast.validators import ModuleValidator  # <- was: from opacus.validators import ModuleValidator
from dpsat_fast.train import load_digits_split
# <- was: from src.optim.minimizer import DPSAT, DPSATMomentum

parser = argparse.ArgumentParser()
# Differential privacy args
parser.add_argument("--max_grad_norm", type=float, default=0.1, help="gradient clipping parameter C")
parser.add_argument("--epsilon", type=float, default=3.0, help="privacy budget epsilon")
parser.add_argument("--delta", type=float, default=1e-5, help="privacy budget delta")
parser.add_argument("--accountant", type=str, default="prv", help="privacy accountant (rdp, prv, gdp)")
# Optimization args
parser.add_argument("--lr", type=float, default=2.0, help="learning rate")
parser.add_argument("--epochs", type=int, default=2, help="number of training epochs")
parser.add_argument("--batch_size", type=int, default=256, help="batch_size (logical)")
parser.add_argument("--max_physical_batch_size", type=int, default=64, help="max_physical_batch_size")
parser.add_argument("--minimizer", type=str, default="DPSAT", help="['DPSAT' 'DPSATMomentum']")
parser.add_argument("--rho", type=float, default=0.05, help="perturbation radius; rho=0.0 for DP-SGD")
parser.add_argument("--n_class", type=int, default=10, help="number of classes")
parser.add_argument("--n_train", type=int, default=0, help="use only the first n training examples (0: all)")


def digits_cnn(n_classes):
    """A small CNN with BatchNorm (made DP-compatible by ModuleValidator.fix, as the official main.py does)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, n_classes),
    )


class DpTrainer:
    """The official ``DpTrainer``, reduced to what trains: ``fit`` runs ``BatchMemoryManager`` over the
    logical batches and ``_update_weight`` once per physical batch."""

    def __init__(self, rmodel, optimizer, privacy_engine, max_physical_batch_size, rho):
        self.rmodel = rmodel
        self.optimizer = optimizer
        self.privacy_engine = privacy_engine
        self.max_physical_batch_size = max_physical_batch_size
        self.rho = rho
        self.minimizer = None
        self.losses = []

    def fit(self, train_loader, max_epoch, val_loader, delta):
        for epoch in range(1, max_epoch + 1):
            epoch_losses = []
            with BatchMemoryManager(
                data_loader=train_loader,
                max_physical_batch_size=self.max_physical_batch_size,
                optimizer=self.optimizer,
            ) as memory_safe_data_loader:
                self.max_iter = len(memory_safe_data_loader)  # expected number of physical batches
                for i, train_data in enumerate(memory_safe_data_loader):
                    self.rmodel.train()
                    epoch_losses.append(self._update_weight(train_data))
            self.losses += epoch_losses
            self.accuracy = self.eval_accuracy(val_loader)
            self.epsilon = self.privacy_engine.get_epsilon(delta)
            lr = self.optimizer.param_groups[0]["lr"]
            print(f"Epoch {epoch} | Iter {i + 1}/~{self.max_iter} | CALoss {np.mean(epoch_losses):.4f} | "
                  f"Clean(Val) {self.accuracy:.4f} | lr {lr} | ε = {self.epsilon:.2f} (δ = {delta})")

    def _update_weight(self, train_data):
        """One physical batch."""
        self.optimizer.zero_grad()
        # <- was: self.minimizer.ascent_step()
        cost = self.calculate_cost(train_data)
        cost.backward()
        if self.rho > 0:
            self.optimizer.step()  # <- was: self.minimizer.descent_step()
        elif self.optimizer.pre_step():  # DP-SGD: Opacus' protocol, as the official descent_step runs it
            self.optimizer.original_optimizer.step()
        return cost.item()

    def calculate_cost(self, train_data):
        images, labels = train_data
        return nn.CrossEntropyLoss()(self.rmodel(images), labels)

    @torch.no_grad()
    def eval_accuracy(self, loader):
        self.rmodel.eval()
        correct = total = 0
        for images, labels in loader:
            correct += (self.rmodel(images).argmax(1) == labels).sum().item()
            total += len(labels)
        self.rmodel.train()
        return correct / total


def main(argv=None):
    args = parser.parse_args(argv)
    print("args:", args)
    MAX_GRAD_NORM, EPSILON, DELTA = args.max_grad_norm, args.epsilon, args.delta
    LR, EPOCHS, BATCH_SIZE = args.lr, args.epochs, args.batch_size
    MAX_PHYSICAL_BATCH_SIZE, RHO = args.max_physical_batch_size, args.rho

    train_set, test_set = load_digits_split()
    if args.n_train:
        train_set = torch.utils.data.Subset(train_set, range(args.n_train))
    train_loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True, drop_last=False)
    test_loader = DataLoader(test_set, batch_size=BATCH_SIZE, shuffle=False)

    model = digits_cnn(args.n_class)
    model = ModuleValidator.fix(model)
    ModuleValidator.validate(model, strict=False)
    print("model params: {:.4f}M".format(sum(p.numel() for p in model.parameters()) / 1000000))

    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    privacy_engine = PrivacyEngine(accountant=args.accountant)
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        epochs=EPOCHS,
        target_epsilon=EPSILON,
        target_delta=DELTA,
        max_grad_norm=MAX_GRAD_NORM,
        sam_rho=RHO,  # <- added: DP-SAT (replaces the official minimizer; same privacy cost as DP-SGD)
        sam_direction="last_update" if args.minimizer == "DPSATMomentum" else "noisy_gradient",  # <- added
    )
    optimizer.target_epsilon = EPSILON
    optimizer.target_delta = DELTA
    print(f"Using sigma={optimizer.noise_multiplier} and C={MAX_GRAD_NORM}")

    trainer = DpTrainer(model, optimizer, privacy_engine, MAX_PHYSICAL_BATCH_SIZE, rho=RHO)
    # <- was: trainer.minimizer = {"DPSAT": DPSAT, "DPSATMomentum": DPSATMomentum}[args.minimizer](optimizer, model, rho=RHO)
    trainer.fit(train_loader, max_epoch=EPOCHS, val_loader=test_loader, delta=DELTA)
    return {"accuracy": trainer.accuracy, "epsilon": trainer.epsilon, "losses": trainer.losses,
            "physical_batches": len(trainer.losses), "model": model, "optimizer": optimizer,
            "train_loader": train_loader, "privacy_engine": privacy_engine, "args": args}


if __name__ == "__main__":
    main()
