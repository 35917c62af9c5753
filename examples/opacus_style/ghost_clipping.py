#!/usr/bin/env python3
"""DP-SGD with Fast Gradient Clipping / Ghost Clipping, written the way Opacus' ghost-clipping tutorial
(the "Ghost Clipping" section of ``tutorials/building_text_classifier.ipynb`` and the PyTorch blog post
"Enabling Fast Gradient Clipping and Ghost Clipping in Opacus") is written: ``make_private`` takes the
criterion and ``grad_sample_mode="ghost"`` and returns four values, and the loop is PyTorch's
``loss = criterion(model(x), y); loss.backward(); optimizer.step()``.

The changed line is marked ``# <- was:`` (the Opacus line it replaces). Data: scikit-learn's bundled 8×8
digits (no download).

    python examples/opacus_style/ghost_clipping.py --epochs 3
"""

import argparse

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dpsat_fast import PrivacyEngine  # <- was: from opacus import PrivacyEngine
from dpsat_fast.train import load_digits_split


def mlp(num_classes=10):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.LayerNorm(128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def evaluate(model, test_loader, criterion):
    model.eval()
    losses, correct, total = [], 0, 0
    with torch.no_grad():
        for x, y in test_loader:
            output = model(x)
            losses.append(nn.functional.cross_entropy(output, y).item())
            correct += (output.argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return np.mean(losses), correct / total


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Opacus-style Ghost Clipping example (bundled digits)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    parser.add_argument("-c", "--max-per-sample-grad_norm", type=float, default=1.0, help="clipping norm")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--secure-rng", action="store_true", default=False)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    train_set, test_set = load_digits_split()
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss(reduction="mean")

    privacy_engine = PrivacyEngine(secure_mode=args.secure_rng)
    model_gc, optimizer_gc, criterion_gc, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=args.sigma,
        max_grad_norm=args.max_per_sample_grad_norm,
        criterion=criterion,
        grad_sample_mode="ghost",
    )

    losses = []
    for epoch in range(1, args.epochs + 1):
        model_gc.train()
        for input_data, target_data in train_loader:
            output_gc = model_gc(input_data)  # forward pass
            optimizer_gc.zero_grad()
            loss = criterion_gc(output_gc, target_data)
            loss.backward()
            optimizer_gc.step()  # add noise and update the model
            losses.append(loss.item())
        eval_loss, eval_accuracy = evaluate(model_gc, test_loader, criterion)
        eps = privacy_engine.get_epsilon(args.delta)
        print(f"Epoch: {epoch} | Train loss: {np.mean(losses):.3f} | Eval loss: {eval_loss:.3f} | "
              f"Eval accuracy: {eval_accuracy:.3f} | ɛ: {eps:.2f}")
    return {"accuracy": eval_accuracy, "epsilon": eps, "losses": losses, "model": model_gc,
            "optimizer": optimizer_gc, "criterion": criterion_gc, "criterion_in": criterion,
            "train_loader": train_loader, "privacy_engine": privacy_engine, "args": args}


if __name__ == "__main__":
    main()
