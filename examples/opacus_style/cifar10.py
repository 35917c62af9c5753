#!/usr/bin/env python3
"""DP-SGD on CIFAR-10-shaped images, written the way Opacus' ``examples/cifar10.py`` (and its image
classifier tutorial) is written: a CNN with BatchNorm made private with ``ModuleValidator.fix``, flat or
per-layer clipping (``--clip_per_layer``), ``--grad_sample_mode``, and ``BatchMemoryManager`` for logical
batches larger than the physical ones.

The changed lines are marked ``# <- was:`` (the Opacus line each replaces). The images are synthetic
32×32×3 (a class-dependent colour and stripe pattern plus noise), so nothing is downloaded.

    python examples/opacus_style/cifar10.py --epochs 2 --clip_per_layer
"""

import argparse
import shutil
from datetime import datetime

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset

from dpsat_fast import PrivacyEngine  # <- was: from opacus import PrivacyEngine
from dpsat_fast.utils import BatchMemoryManager  # <- was: from opacus.utils.batch_memory_manager import BatchMemoryManager
from dpsat_fast.validators import ModuleValidator  # <- was: from opacus.validators import ModuleValidator


def synthetic_cifar10(n, seed):
    """``n`` images [3, 32, 32] of 10 classes: class k has its own mean colour and stripe frequency."""
    g = torch.Generator().manual_seed(seed)
    colours = 2 * torch.rand(10, 3, 1, 1, generator=torch.Generator().manual_seed(1234)) - 1
    y = torch.randint(0, 10, (n,), generator=g)
    cols = torch.arange(32, dtype=torch.float32)
    stripes = torch.sin(cols[None, :] * (1 + y[:, None]).float() * np.pi / 16)  # [n, 32]
    x = colours[y] + 0.5 * stripes[:, None, None, :] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    return TensorDataset(x, y)


def convnet(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(8, 16, kernel_size=3, stride=1, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(start_dim=1, end_dim=-1),
        nn.Linear(32, num_classes, bias=True),
    )


def save_checkpoint(state, is_best, filename="checkpoint.tar"):
    torch.save(state, filename)
    if is_best:
        shutil.copyfile(filename, filename + ".best")


def accuracy(preds, labels):
    return (preds == labels).mean()


def train(args, model, train_loader, optimizer, privacy_engine, epoch, device):
    start_time = datetime.now()
    model.train()
    criterion = nn.CrossEntropyLoss()
    losses = []
    top1_acc = []

    with BatchMemoryManager(
        data_loader=train_loader,
        max_physical_batch_size=args.max_physical_batch_size,
        optimizer=optimizer,
    ) as memory_safe_data_loader:
        for i, (images, target) in enumerate(memory_safe_data_loader):
            optimizer.zero_grad()
            images = images.to(device)
            target = target.to(device)

            output = model(images)
            loss = criterion(output, target)
            preds = np.argmax(output.detach().cpu().numpy(), axis=1)
            labels = target.detach().cpu().numpy()
            top1_acc.append(accuracy(preds, labels))
            losses.append(loss.item())

            loss.backward()
            optimizer.step()

            if (i + 1) % args.print_freq == 0:
                epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
                print(f"\tTrain Epoch: {epoch} \tLoss: {np.mean(losses):.6f} Acc@1: {np.mean(top1_acc):.6f} "
                      f"(ε = {epsilon:.2f}, δ = {args.delta})")
    return losses, datetime.now() - start_time


def test(args, model, test_loader, device):
    model.eval()
    criterion = nn.CrossEntropyLoss()
    losses, top1_acc = [], []
    with torch.no_grad():
        for images, target in test_loader:
            images, target = images.to(device), target.to(device)
            output = model(images)
            losses.append(criterion(output, target).item())
            top1_acc.append(accuracy(np.argmax(output.cpu().numpy(), axis=1), target.cpu().numpy()))
    top1_avg = np.mean(top1_acc)
    print(f"\tTest set:Loss: {np.mean(losses):.6f} Acc@1: {top1_avg:.6f} ")
    return top1_avg


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Opacus-style CIFAR10 DP Training (synthetic images)")
    parser.add_argument("--grad_sample_mode", type=str, default="hooks")
    parser.add_argument("-j", "--workers", default=0, type=int, metavar="N", help="number of data loading workers")
    parser.add_argument("--epochs", default=2, type=int, metavar="N", help="number of total epochs to run")
    parser.add_argument("--n-train", default=512, type=int, help="number of synthetic training images")
    parser.add_argument("--batch-size-test", default=256, type=int, metavar="N")
    parser.add_argument("--batch-size", default=64, type=int, metavar="N", help="approximate (logical) batch size")
    parser.add_argument("--max-physical-batch-size", default=16, type=int, metavar="N",
                        help="largest batch that goes through the model at once")
    parser.add_argument("--lr", "--learning-rate", default=1.0, type=float, metavar="LR", dest="lr")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="SGD momentum")
    parser.add_argument("--wd", "--weight-decay", default=0, type=float, metavar="W", dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N", help="print frequency")
    parser.add_argument("--sigma", type=float, default=1.0, metavar="S", help="Noise multiplier")
    parser.add_argument("-c", "--max-per-sample-grad_norm", type=float, default=2.0, metavar="C",
                        help="Clip per-sample gradients to this norm")
    parser.add_argument("--secure-rng", action="store_true", default=False,
                        help="Enable Secure RNG to have trustworthy privacy guarantees")
    parser.add_argument("--delta", type=float, default=1e-5, metavar="D", help="Target delta")
    parser.add_argument("--optim", type=str, default="SGD", help="Optimizer to use (Adam, RMSprop, SGD)")
    parser.add_argument("--lr-schedule", type=str, choices=["constant", "cos"], default="cos")
    parser.add_argument("--device", type=str, default="cpu", help="Device on which to run the code.")
    parser.add_argument("--checkpoint-file", type=str, default="", help="path to save checkpoints ('': none)")
    parser.add_argument("--clip_per_layer", action="store_true", default=False,
                        help="Use static per-layer clipping with the same clipping threshold for each layer")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = args.device

    train_dataset = synthetic_cifar10(args.n_train, seed=0)
    test_dataset = synthetic_cifar10(256, seed=1)
    train_loader = DataLoader(train_dataset, batch_size=args.batch_size, num_workers=args.workers)
    test_loader = DataLoader(test_dataset, batch_size=args.batch_size_test, shuffle=False, num_workers=args.workers)

    model = convnet(num_classes=10)
    model = ModuleValidator.fix(model)
    ModuleValidator.validate(model, strict=False)
    model = model.to(device)

    if args.optim == "SGD":
        optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay)
    elif args.optim == "RMSprop":
        optimizer = optim.RMSprop(model.parameters(), lr=args.lr)
    elif args.optim == "Adam":
        optimizer = optim.Adam(model.parameters(), lr=args.lr)
    else:
        raise NotImplementedError("Optimizer not recognized. Please check spelling")

    if args.clip_per_layer:
        # the same threshold for each layer: the total norm is still bounded by args.max_per_sample_grad_norm
        n_layers = len([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        max_grad_norm = [args.max_per_sample_grad_norm / np.sqrt(n_layers)] * n_layers
    else:
        max_grad_norm = args.max_per_sample_grad_norm

    privacy_engine = PrivacyEngine(secure_mode=args.secure_rng)
    clipping = "per_layer" if args.clip_per_layer else "flat"
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=args.sigma,
        max_grad_norm=max_grad_norm,
        clipping=clipping,
        grad_sample_mode=args.grad_sample_mode,
    )

    losses, accuracy_per_epoch, best_acc1 = [], [], 0
    for epoch in range(1, args.epochs + 1):
        if args.lr_schedule == "cos":
            lr = args.lr * 0.5 * (1 + np.cos(np.pi * epoch / (args.epochs + 1)))
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
        epoch_losses, train_duration = train(args, model, train_loader, optimizer, privacy_engine, epoch, device)
        losses += epoch_losses
        top1_acc = test(args, model, test_loader, device)
        is_best = top1_acc > best_acc1
        best_acc1 = max(top1_acc, best_acc1)
        accuracy_per_epoch.append(float(top1_acc))
        if args.checkpoint_file:
            save_checkpoint(
                {
                    "epoch": epoch + 1,
                    "arch": "Convnet",
                    "state_dict": model.state_dict(),
                    "best_acc1": best_acc1,
                    "optimizer": optimizer.state_dict(),
                },
                is_best,
                filename=args.checkpoint_file + ".tar",
            )

    epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
    print(f"accuracy {max(accuracy_per_epoch):.4f}, accuracy per epoch {accuracy_per_epoch}, "
          f"ε = {epsilon:.2f} (δ = {args.delta})")
    return {"accuracy": accuracy_per_epoch[-1], "epsilon": epsilon, "losses": losses, "model": model,
            "optimizer": optimizer, "train_loader": train_loader, "privacy_engine": privacy_engine,
            "max_grad_norm": max_grad_norm, "args": args}


if __name__ == "__main__":
    main()
