"""dpsat_fast: fast differentially private training (DP-SGD, DP-SAT) for PyTorch."""

__version__ = "0.1.0"
