#!/usr/bin/env python3
"""DP-SGD on handwritten digits, written the way Opacus' ``examples/mnist.py`` is written.

The only changed line is marked ``# <- was:`` (the Opacus line it replaces). The data are scikit-learn's
bundled 8×8 digits instead of MNIST (no download), so the network is a small 8×8 version of the example's
``SampleConvNet``.

    python examples/opacus_style/mnist.py --epochs 2 --sigma 1.0 -c 1.0
"""

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import DataLoader

from dpsat_fast import PrivacyEngine  # <- was: from opacus import PrivacyEngine
from dpsat_fast.train import load_digits_split

DIGITS_MEAN = 0.30  # pixel mean / std of the digits (public constants, like MNIST_MEAN / MNIST_STD)
DIGITS_STD = 0.38


class SampleConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, 2)
        self.fc1 = nn.Linear(32 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        # x of shape [B, 1, 8, 8]
        x = F.relu(self.conv1(x))  # -> [B, 16, 8, 8]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 16, 7, 7]
        x = F.relu(self.conv2(x))  # -> [B, 32, 3, 3]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 32, 2, 2]
        x = x.view(-1, 32 * 2 * 2)  # -> [B, 128]
        x = F.relu(self.fc1(x))  # -> [B, 32]
        return self.fc2(x)  # -> [B, 10]


def normalized(dataset):
    x, y = dataset.tensors
    return torch.utils.data.TensorDataset((x - DIGITS_MEAN) / DIGITS_STD, y)


def train(args, model, device, train_loader, optimizer, privacy_engine, epoch):
    model.train()
    criterion = nn.CrossEntropyLoss()
    losses = []
    for data, target in train_loader:
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    if not args.disable_dp:
        epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
        print(f"Train Epoch: {epoch} \tLoss: {np.mean(losses):.6f} (ε = {epsilon:.2f}, δ = {args.delta})")
    else:
        print(f"Train Epoch: {epoch} \tLoss: {np.mean(losses):.6f}")
    return losses


def test(model, device, test_loader):
    model.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.cross_entropy(output, target, reduction="sum").item()
            correct += (output.argmax(dim=1) == target).sum().item()
    n = len(test_loader.dataset)
    print(f"\nTest set: Average loss: {test_loss / n:.4f}, Accuracy: {correct}/{n} ({100.0 * correct / n:.2f}%)\n")
    return correct / n


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Opacus-style MNIST example (on the bundled digits)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-b", "--batch-size", type=int, default=64, metavar="B", help="Batch size")
    parser.add_argument("--test-batch-size", type=int, default=1024, metavar="TB", help="test batch size")
    parser.add_argument("-n", "--epochs", type=int, default=2, metavar="N", help="number of epochs to train")
    parser.add_argument("-r", "--n-runs", type=int, default=1, metavar="R", help="number of runs to average on")
    parser.add_argument("--lr", type=float, default=0.5, metavar="LR", help="learning rate")
    parser.add_argument("--sigma", type=float, default=1.0, metavar="S", help="Noise multiplier")
    parser.add_argument("-c", "--max-per-sample-grad_norm", type=float, default=1.0, metavar="C",
                        help="Clip per-sample gradients to this norm")
    parser.add_argument("--delta", type=float, default=1e-5, metavar="D", help="Target delta")
    parser.add_argument("--device", type=str, default="cpu", help="device")
    parser.add_argument("--disable-dp", action="store_true", default=False,
                        help="Disable privacy training and just train with vanilla SGD")
    parser.add_argument("--secure-rng", action="store_true", default=False,
                        help="Enable Secure RNG to have trustworthy privacy guarantees")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    train_set, test_set = load_digits_split()
    train_loader = DataLoader(normalized(train_set), batch_size=args.batch_size, num_workers=0)
    test_loader = DataLoader(normalized(test_set), batch_size=args.test_batch_size, shuffle=False)

    run_results, losses = [], []
    for _ in range(args.n_runs):
        model = SampleConvNet().to(device)
        optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=0)
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
        losses = []
        for epoch in range(1, args.epochs + 1):
            losses += train(args, model, device, train_loader, optimizer, privacy_engine, epoch)
        run_results.append(test(model, device, test_loader))

    if len(run_results) > 1:
        print(f"Accuracy averaged over {len(run_results)} runs: "
              f"{np.mean(run_results) * 100:.2f}% ± {np.std(run_results) * 100:.2f}%")
    epsilon = None if args.disable_dp else privacy_engine.accountant.get_epsilon(delta=args.delta)
    return {"accuracy": run_results[-1], "epsilon": epsilon, "losses": losses, "model": model,
            "optimizer": optimizer, "train_loader": train_loader, "privacy_engine": privacy_engine, "args": args}


if __name__ == "__main__":
    main()
