import os

import gin
import pytest
import torch

# tests are about behaviour, not throughput: one thread keeps them deterministic and lets two
# test processes share the 2-core CI machine
torch.set_num_threads(1)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# tiny networks and T <= 5 (test budget in the developers' brief)
TINY = [
    "DiffusionPolicy.T = 3",
    "Denoiser.hidden = (16, 16)",
    "Denoiser.time_dim = 8",
    "Denoiser.time_hidden = 16",
    "TwinQ.hidden = (16, 16)",
]


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    import qvpo.config  # noqa: F401 - registers every configurable
    yield
    gin.clear_config()


@pytest.fixture
def tiny():
    gin.parse_config(TINY)
