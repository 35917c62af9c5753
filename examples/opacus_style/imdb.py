#!/usr/bin/env python3
"""Sentiment classification of padded token ids, written the way Opacus' ``examples/imdb.py`` is written:
Embedding + AdaptiveAvgPool1d + Linear layers, Adam, ``make_private`` and the plain training loop.

The changed lines are marked ``# <- was:`` (the Opacus line each replaces). Opacus' example passes
``poisson_sampling=False`` to ``make_private``; that is refused here (the reported ε assumes Poisson
sampling) with an error that says to drop the argument, so the one line of the call is dropped and the loader
is converted to Poisson sampling (q = batch_size / N). The reviews are synthetic token sequences (positive
reviews use more "positive" tokens), so nothing is downloaded.

    python examples/opacus_style/imdb.py --epochs 2
"""

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from dpsat_fast import PrivacyEngine  # <- was: from opacus import PrivacyEngine

VOCAB_SIZE = 500  # token 0 is padding; 1..49 "positive" words, 50..99 "negative" words, the rest neutral


class SyntheticReviews(Dataset):
    """``n`` reviews of 8–40 token ids, label 1 (positive) or 0, as ``{"input_ids", "label"}`` dicts."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            label = int(torch.randint(0, 2, (1,), generator=g))
            length = int(torch.randint(8, 41, (1,), generator=g))
            ids = torch.randint(100, VOCAB_SIZE, (length,), generator=g)
            sentiment = torch.rand(length, generator=g) < 0.5
            words = torch.randint(1, 50, (length,), generator=g) + (0 if label else 49)
            self.items.append({"input_ids": torch.where(sentiment, words, ids), "label": torch.tensor(label)})

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)


class SampleNet(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        x = self.emb(x)  # -> [B, T, 16]
        x = x.transpose(1, 2)  # -> [B, 16, T]
        x = self.pool(x).squeeze(-1)  # -> [B, 16]
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def binary_accuracy(preds, y):
    correct = (y.long() == torch.argmax(preds, dim=1)).float()
    return correct.sum() / max(len(correct), 1)


def padded_collate(batch, padding_idx=0):
    x = pad_sequence([elem["input_ids"] for elem in batch], batch_first=True, padding_value=padding_idx)
    y = torch.stack([elem["label"] for elem in batch]).long()
    return x, y


def train(args, model, train_loader, optimizer, privacy_engine, epoch):
    criterion = nn.CrossEntropyLoss()
    losses, accuracies = [], []
    device = torch.device(args.device)
    model = model.train().to(device)

    for data, label in train_loader:
        data, label = data.to(device), label.to(device)
        optimizer.zero_grad()
        predictions = model(data)
        loss = criterion(predictions, label)
        acc = binary_accuracy(predictions, label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracies.append(acc.item())

    if not args.disable_dp:
        epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
        print(f"Train Epoch: {epoch} \tTrain Loss: {np.mean(losses):.6f} Train Accuracy: {np.mean(accuracies):.6f} "
              f"(ε = {epsilon:.2f}, δ = {args.delta})")
    else:
        print(f"Train Epoch: {epoch} \t Loss: {np.mean(losses):.6f} \t Accuracy: {np.mean(accuracies):.6f}")
    return losses


def evaluate(args, model, test_loader):
    criterion = nn.CrossEntropyLoss()
    losses, accuracies = [], []
    device = torch.device(args.device)
    model = model.eval().to(device)
    with torch.no_grad():
        for data, label in test_loader:
            data, label = data.to(device), label.to(device)
            predictions = model(data)
            losses.append(criterion(predictions, label).item())
            accuracies.append(binary_accuracy(predictions, label).item())
    mean_accuracy = np.mean(accuracies)
    print(f"\nTest set: Average loss: {np.mean(losses):.4f}, Accuracy: {mean_accuracy * 100:.2f}%\n")
    return mean_accuracy


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Opacus-style IMDB Example (synthetic reviews)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-b", "--batch-size", type=int, default=64, metavar="B", help="batch size")
    parser.add_argument("-n", "--epochs", type=int, default=2, metavar="N", help="number of epochs to train")
    parser.add_argument("--n-train", type=int, default=1024, help="number of synthetic training reviews")
    parser.add_argument("--lr", type=float, default=0.02, metavar="LR", help="learning rate")
    parser.add_argument("--sigma", type=float, default=0.56, metavar="S", help="Noise multiplier")
    parser.add_argument("-c", "--max-per-sample-grad_norm", type=float, default=1.0, metavar="C",
                        help="Clip per-sample gradients to this norm")
    parser.add_argument("--delta", type=float, default=1e-5, metavar="D", help="Target delta")
    parser.add_argument("--device", type=str, default="cpu", help="device")
    parser.add_argument("--disable-dp", action="store_true", default=False,
                        help="Disable privacy training and just train with vanilla optimizer")
    parser.add_argument("--secure-rng", action="store_true", default=False,
                        help="Enable Secure RNG to have trustworthy privacy guarantees")
    parser.add_argument("-j", "--workers", default=0, type=int, metavar="N", help="number of data loading workers")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    train_dataset = SyntheticReviews(args.n_train, seed=0)
    test_dataset = SyntheticReviews(256, seed=1)

    train_loader = DataLoader(train_dataset, num_workers=args.workers, batch_size=args.batch_size,
                              collate_fn=padded_collate, shuffle=True)
    test_loader = DataLoader(test_dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                             collate_fn=padded_collate)

    model = SampleNet(vocab_size=VOCAB_SIZE).to(device)
    optimizer = optim.Adam(model.parameters(), lr=args.lr)
    privacy_engine = None
    if not args.disable_dp:
        privacy_engine = PrivacyEngine(secure_mode=args.secure_rng)
        model, optimizer, train_loader = privacy_engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=train_loader,
            noise_multiplier=args.sigma,
            max_grad_norm=args.max_per_sample_grad_norm,
            # <- was: poisson_sampling=False,
        )

    losses, mean_accuracy = [], 0.0
    for epoch in range(1, args.epochs + 1):
        losses += train(args, model, train_loader, optimizer, privacy_engine, epoch)
        mean_accuracy = evaluate(args, model, test_loader)
    epsilon = None if privacy_engine is None else privacy_engine.accountant.get_epsilon(delta=args.delta)
    return {"accuracy": mean_accuracy, "epsilon": epsilon, "losses": losses, "model": model,
            "optimizer": optimizer, "train_loader": train_loader, "privacy_engine": privacy_engine, "args": args}


if __name__ == "__main__":
    main()
