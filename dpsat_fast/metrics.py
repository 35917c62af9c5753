"""Evaluation metrics reported next to accuracy: expected calibration error (ECE).

Small clipping norms give DP models that are accurate but over-confident; large norms give similar accuracy
with better calibration. ECE measures it: predictions are binned by confidence (the top softmax probability)
into ``n_bins`` equal-width bins, and ``ECE = Σ_b (|b| / n) · |accuracy(b) − mean confidence(b)|``
(Guo et al., 2017; 15 bins by default, bin b = (b/n_bins, (b+1)/n_bins], the first one closed at 0).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["expected_calibration_error"]


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE of class probabilities ``probs`` [N, K] (rows sum to 1) against integer ``labels`` [N]."""
    if probs.dim() != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"probs must be [N, K] and labels [N], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    n = probs.shape[0]
    if n == 0:
        return 0.0
    confidence, prediction = probs.double().max(1)
    correct = (prediction == labels).double()
    # bin index: ceil(conf · n_bins) − 1, so (b/n, (b+1)/n] -> b, and 0 -> bin 0
    bins = (confidence * n_bins).ceil().long().sub(1).clamp(0, n_bins - 1)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    # (|b|/n)·|acc(b) − conf(b)| = |Σ_b correct − Σ_b confidence| / n
    return float((acc_sum - conf_sum).abs().sum() / n)
