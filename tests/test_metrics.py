"""Expected calibration error against a hand computation and its limiting cases."""
import pytest
import torch

from dpsat_fast.metrics import expected_calibration_error


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.35 (wrong); 10 bins:
    # bin (0.8, 0.9]: acc 0.5, conf 0.9 -> 2/4 · 0.4; bin (0.5, 0.6]: acc 1, conf 0.6 -> 1/4 · 0.4;
    # bin (0.3, 0.4]: acc 0, conf 0.35 -> 1/4 · 0.35.  ECE = 0.2 + 0.1 + 0.0875 = 0.3875
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.05, 0.05], [0.6, 0.4, 0.0], [0.35, 0.33, 0.32]],
                         dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.3875, abs=1e-12)


def test_ece_limits():
    one_hot = torch.eye(4)
    assert expected_calibration_error(one_hot, torch.arange(4)) == 0.0  # confident and right
    assert expected_calibration_error(one_hot, (torch.arange(4) + 1) % 4) == pytest.approx(1.0)  # confident, wrong
    uniform = torch.full((8, 4), 0.25)  # confidence 0.25, accuracy 0.25 (two of eight right)
    labels = torch.tensor([0, 0, 1, 2, 3, 1, 2, 3])
    assert expected_calibration_error(uniform, labels) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 0.0


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 0.5 falls in (0.4, 0.5] with 10 bins; a wrong prediction there costs 0.5
    probs = torch.tensor([[0.5, 0.5]])
    assert expected_calibration_error(probs, torch.tensor([1]), n_bins=10) == pytest.approx(0.5)


def test_ece_checks_shapes():
    with pytest.raises(ValueError, match="probs must be"):
        expected_calibration_error(torch.zeros(3), torch.zeros(3, dtype=torch.long))
