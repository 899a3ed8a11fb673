"""Device parametrisation shared by the data-plane and connector tests: every test runs on
the CPU, and on CUDA (in the gpu tier) where a GPU is present."""

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
