"""Private data-parallel training with torchrun: every process trains on its shard, one release per step.

    torchrun --nproc-per-node 2 examples/distributed_digits.py --epochs 5

The model is wrapped the PyTorch way (DistributedDataParallel) and the loader uses a DistributedSampler, as
in PyTorch's DDP recipes; make_private detects the process group and turns them into private data
parallelism: each rank Poisson-samples its shard at the global rate, clips its own examples, the clipped
sums are all-reduced once per step and the noise is added once (docs/distributed.md).
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dpsat_fast import PrivacyEngine
from dpsat_fast.models import DigitsCNN
from dpsat_fast.train import evaluate, load_digits_split


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--rho", type=float, default=0.05)
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    train_set, test_set = load_digits_split()
    model = DistributedDataParallel(DigitsCNN())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=DistributedSampler(train_set))
    privacy_engine = PrivacyEngine()
    model, optimizer, loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.target_epsilon,
        target_delta=1e-5, epochs=args.epochs, max_grad_norm=1.0, sam_rho=args.rho)
    for _ in range(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            if len(y):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
    result = {"accuracy": evaluate(model, test_set), "epsilon": privacy_engine.get_epsilon(1e-5),
              "world_size": world, "steps": privacy_engine.accountant.steps}
    if rank == 0:
        print(f"{world} processes: test accuracy {result['accuracy']:.4f}, ε = {result['epsilon']:.2f} (δ = 1e-5), "
              f"{result['steps']} steps")
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
