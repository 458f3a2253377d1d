import contextlib
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
    "QVPO.T = 3",
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


def fused_or_skip(precision: str) -> None:
    """Skip unless the fused native calls run here in this precision ('fp32' or 'bf16')."""
    from qvpo import native
    if not native.fused_usable(precision == "bf16"):
        pytest.skip(f"the fused {precision} calls need a CPU with "
                    f"{'AMX-BF16' if precision == 'bf16' else 'AVX-512'} (and the native kernels)")


def spy_calls(monkeypatch, obj, name: str) -> list:
    """Wrap obj.name so that each call appends 1 to the returned list (and still runs it)."""
    calls, real = [], getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op threads set to n inside the block (the tests' default is one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
