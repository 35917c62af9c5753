#!/usr/bin/env python3
"""Name-language classification with a DP recurrent network, written the way Opacus'
``examples/char-lstm-classification.py`` is written: byte-encoded names padded with
``pad_sequence(batch_first=True)``, an Embedding + ``DPLSTM`` (or ``DPGRU`` / ``DPRNN``, ``--mode``) + Linear
classifier, ``make_private`` and the plain ``backward(); step(); zero_grad()`` loop.

The changed lines are marked ``# <- was:`` (the Opacus line each replaces). The "names" are synthetic (each
language draws its letters from its own part of the alphabet), so nothing is downloaded.

    python examples/opacus_style/char_lstm.py --epochs 2 --mode lstm
"""

import argparse
from statistics import mean

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from dpsat_fast import PrivacyEngine  # <- was: from opacus import PrivacyEngine
from dpsat_fast.layers import DPGRU, DPLSTM, DPRNN  # <- was: from opacus.layers import DPGRU, DPLSTM, DPRNN

VOCAB_SIZE = 256 + 3  # one byte, plus the start, end and pad tokens
START_IDX, END_IDX, PAD_IDX = 256, 257, 258
LANGUAGES = ["aeiou", "bcdfg", "hjklm", "npqrs", "tvwxz"]


def encode(name: str) -> torch.LongTensor:
    """``<s>`` + the UTF-8 bytes of ``name`` + ``</s>``."""
    return torch.LongTensor([START_IDX] + list(name.encode()) + [END_IDX])


class SyntheticNamesDataset(Dataset):
    """``n`` names of 3–8 letters; language k draws 80 % of its letters from ``LANGUAGES[k]``."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.labels = list(range(len(LANGUAGES)))
        self.samples = []
        for _ in range(n):
            label = int(torch.randint(0, len(LANGUAGES), (1,), generator=g))
            length = int(torch.randint(3, 9, (1,), generator=g))
            chars = []
            for _ in range(length):
                pool = LANGUAGES[label] if torch.rand(1, generator=g).item() < 0.8 else letters
                chars.append(pool[int(torch.randint(0, len(pool), (1,), generator=g))])
            self.samples.append((encode("".join(chars).capitalize()), torch.tensor(label).long()))

    def __getitem__(self, i):
        return self.samples[i]

    def __len__(self):
        return len(self.samples)


class CharNNClassifier(nn.Module):
    def __init__(self, rnn_type, embedding_size, hidden_size, output_size, num_layers=1, bidirectional=False,
                 vocab_size=VOCAB_SIZE):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.rnn = rnn_type(embedding_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
                            batch_first=True)
        self.out_layer = nn.Linear(hidden_size * (2 if bidirectional else 1), output_size)

    def forward(self, x, hidden=None):
        x = self.embedding(x)  # -> [B, T, D]
        x, _ = self.rnn(x, hidden)  # -> [B, T, H]
        x = x[:, -1, :]  # -> [B, H]
        return self.out_layer(x)  # -> [B, C]


def padded_collate(batch, padding_idx=PAD_IDX):
    x = pad_sequence([elem[0] for elem in batch], batch_first=True, padding_value=padding_idx)
    y = torch.stack([elem[1] for elem in batch]).long()
    return x, y


def train(model, criterion, optimizer, train_loader, epoch, privacy_engine, target_delta, device):
    model.train()
    accs, losses = [], []
    for x, y in train_loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = criterion(logits, y)
        loss.backward()

        optimizer.step()
        optimizer.zero_grad()

        accs.append(float(logits.argmax(-1).eq(y).sum()) / max(len(y), 1))
        losses.append(loss.item())

    printstr = f"\t Epoch {epoch}. Accuracy: {mean(accs):.6f} | Loss: {mean(losses):.6f}"
    if privacy_engine is not None:
        epsilon = privacy_engine.accountant.get_epsilon(delta=target_delta)
        printstr += f" | (ε = {epsilon:.2f}, δ = {target_delta})"
    print(printstr)
    return losses


def test(model, test_loader, privacy_engine, target_delta, device):
    model.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for x, y in test_loader:
            x, y = x.to(device), y.to(device)
            correct += int(model(x).argmax(-1).eq(y).sum())
            total += len(y)
    mean_acc = correct / total
    printstr = "\n----------------------------\n" f"Test Accuracy: {mean_acc:.6f}"
    if privacy_engine is not None:
        epsilon = privacy_engine.accountant.get_epsilon(delta=target_delta)
        printstr += f" (ε = {epsilon:.2f}, δ = {target_delta})"
    print(printstr + "\n----------------------------\n")
    return mean_acc


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Opacus-style name language classification DP Training",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n-samples", default=600, type=int, help="number of synthetic names")
    parser.add_argument("--device", type=str, default="cpu", help="device")
    parser.add_argument("-b", "--batch-size", default=64, type=int, metavar="N", help="mini-batch size")
    parser.add_argument("--mode", default="lstm", choices=["lstm", "gru", "rnn"], help="recursive network type")
    parser.add_argument("--embedding-size", default=16, type=int, help="Character embedding dimension")
    parser.add_argument("--hidden-size", default=32, type=int, help="hidden state dimensions")
    parser.add_argument("--n-layers", default=1, type=int, help="How many layers to use")
    parser.add_argument("--bidirectional", action="store_true", default=False,
                        help="If turned on, makes the RNN bidirectional")
    parser.add_argument("--learning-rate", default=2.0, type=float, metavar="LR", help="initial learning rate")
    parser.add_argument("--epochs", type=int, default=2, help="Number of training epochs")
    parser.add_argument("--train-split", type=float, default=0.8, help="Fraction of data used for training")
    parser.add_argument("--sigma", type=float, default=1.0, metavar="S", help="Noise multiplier")
    parser.add_argument("-c", "--max-per-sample-grad-norm", type=float, default=1.5, metavar="C",
                        help="Clip per-sample gradients to this norm")
    parser.add_argument("--disable-dp", action="store_true", default=False,
                        help="Disable privacy training and just train with vanilla SGD")
    parser.add_argument("--secure-rng", action="store_true", default=False,
                        help="Enable Secure RNG to have trustworthy privacy guarantees")
    parser.add_argument("--delta", type=float, default=8e-5, metavar="D", help="Target delta")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    ds = SyntheticNamesDataset(args.n_samples, seed=0)
    train_len = int(args.train_split * len(ds))
    test_len = len(ds) - train_len
    print(f"{train_len} samples for training, {test_len} for testing")
    train_ds, test_ds = torch.utils.data.random_split(ds, [train_len, test_len],
                                                      generator=torch.Generator().manual_seed(0))

    rnn_type = {"rnn": DPRNN, "gru": DPGRU, "lstm": DPLSTM}[args.mode]
    model = CharNNClassifier(rnn_type, args.embedding_size, args.hidden_size, len(ds.labels), args.n_layers,
                             args.bidirectional).to(device)

    train_loader = DataLoader(train_ds, batch_size=args.batch_size, num_workers=0, collate_fn=padded_collate)
    test_loader = DataLoader(test_ds, batch_size=2 * args.batch_size, shuffle=False, num_workers=0,
                             collate_fn=padded_collate)

    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)

    privacy_engine = None
    if not args.disable_dp:
        privacy_engine = PrivacyEngine(secure_mode=args.secure_rng)
        model, optimizer, train_loader = privacy_engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=train_loader,
            noise_multiplier=args.sigma,
            max_grad_norm=args.max_per_sample_grad_norm,
        )

    print(f"Train stats ({args.mode}): \n")
    losses = []
    for epoch in range(args.epochs):
        losses += train(model, criterion, optimizer, train_loader, epoch, privacy_engine, args.delta, device)
    mean_acc = test(model, test_loader, privacy_engine, args.delta, device)
    epsilon = None if privacy_engine is None else privacy_engine.accountant.get_epsilon(delta=args.delta)
    return {"accuracy": mean_acc, "epsilon": epsilon, "losses": losses, "model": model, "optimizer": optimizer,
            "train_loader": train_loader, "privacy_engine": privacy_engine, "args": args}


if __name__ == "__main__":
    main()
