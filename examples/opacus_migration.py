"""An Opacus training script made private with DP-SAT: the three changed lines are marked `# <-`.

    python examples/opacus_migration.py
"""

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dpsat_fast import PrivacyEngine  # <- was: from opacus import PrivacyEngine
from dpsat_fast.models import DigitsCNN
from dpsat_fast.train import load_digits_split


def main(epochs: int = 3) -> float:
    torch.manual_seed(0)
    train_set, test_set = load_digits_split()
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_loader = DataLoader(train_set, batch_size=128, shuffle=True)
    criterion = nn.CrossEntropyLoss()

    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader,
        noise_multiplier=1.5, max_grad_norm=1.0,
        sam_rho=0.05,  # <- DP-SAT: perturbation radius (same privacy cost as DP-SGD)
    )
    for _ in range(epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        x, y = test_set.tensors
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    epsilon = privacy_engine.get_epsilon(delta=1e-5)
    print(f"test accuracy {accuracy:.4f}, ε = {epsilon:.2f} (δ = 1e-5)")
    return accuracy


if __name__ == "__main__":
    main()
