import os
import random

import numpy as np
import pytest
import torch

# Dtype table: (dtype, rtol, atol) for comparisons against the float64 reference.
DTYPE_TOLERANCES = {torch.float64: (1e-6, 1e-10), torch.float32: (1e-4, 1e-6)}
# The engine clips with certified norms: the computed norm plus an a-priori bound of the rounding of the norm
# and of the clipped sum (dpsat_fast.layers.bounds). Relative room (in squared norm) above the exact norm that
# the certificate may take in the tests' layers (small D, P, T): far below 1e-3 in float32.
CERTIFIED_NORM_SLACK = {torch.float64: 1e-9, torch.float32: 1e-3}


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# Triton kernels run on CPU tensors in the interpreter when there is no GPU. The flag must be set before
# anything imports triton (kernels are specialized at definition); set it once, for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
