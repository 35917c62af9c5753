import os
import random

import numpy as np
import pytest
import torch

# Dtype table: (dtype, rtol, atol) for comparisons against the float64 reference (TESTING.md item 1).
DTYPE_TOLERANCES = {torch.float64: (1e-6, 1e-10), torch.float32: (1e-4, 1e-6)}


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
