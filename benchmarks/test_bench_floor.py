"""The machine's own limits at the sampler's shapes: matmul throughput (fp32, bf16) and the cost
of one transcendental pass (exp) per activation element. `benchmarks/table.py` turns these into
the floor of a QVPO update (benchmarks/floor.py) and each figure's fraction of it.
"""

import pytest
import torch

ROWS, H = 2048, 256  # one cache block of the sampler (DiffusionPolicy.block_rows) x hidden width


def _mm(dtype):
    x = torch.randn(ROWS, H).to(dtype)
    w = torch.randn(H, H).to(dtype)
    out = torch.empty(ROWS, H, dtype=dtype)
    return lambda: torch.mm(x, w, out=out)


def test_floor_matmul_fp32(benchmark):
    benchmark.extra_info.update(what=f"matmul {ROWS}x{H} @ {H}x{H} fp32", flops=2 * ROWS * H * H)
    benchmark.pedantic(_mm(torch.float32), rounds=200, warmup_rounds=10)


def test_floor_matmul_bf16(benchmark):
    benchmark.extra_info.update(what=f"matmul {ROWS}x{H} @ {H}x{H} bf16", flops=2 * ROWS * H * H)
    benchmark.pedantic(_mm(torch.bfloat16), rounds=200, warmup_rounds=10)


def test_floor_exp_pass(benchmark):
    x = torch.randn(ROWS, H)
    out = torch.empty_like(x)
    benchmark.extra_info.update(what=f"exp over {ROWS}x{H} fp32 (one transcendental pass)", elements=ROWS * H)
    benchmark.pedantic(lambda: torch.exp(x, out=out), rounds=200, warmup_rounds=10)


def test_activation_mish_torch(benchmark):
    x = torch.randn(ROWS, H)
    benchmark.extra_info.update(what=f"torch.nn.functional.mish {ROWS}x{H}", elements=ROWS * H)
    benchmark.pedantic(lambda: torch.nn.functional.mish(x), rounds=200, warmup_rounds=10)


def test_activation_mish_torch_one_exp_form(benchmark):
    """The torch-ops fallback of qvpo.nets.mish where the native kernels are unavailable."""
    from qvpo.nets import mish_torch

    x = torch.randn(ROWS, H)
    benchmark.extra_info.update(what=f"exact Mish, one-exp form in torch ops {ROWS}x{H}", elements=ROWS * H)
    benchmark.pedantic(lambda: mish_torch(x), rounds=200, warmup_rounds=10)


def test_activation_mish_native(benchmark):
    """qvpo/native's Mish (what the sampler and candidate scoring use on CPU)."""
    from qvpo import native

    if native.library() is None:
        pytest.skip(f"qvpo.native: {native.describe()} (QVPO_NATIVE=1 to measure the kernels)")
    x = torch.randn(ROWS, H)
    out = torch.empty_like(x)
    benchmark.extra_info.update(what=f"exact Mish, qvpo.native {ROWS}x{H}", elements=ROWS * H)
    benchmark.pedantic(lambda: native.mish(x, out=out), rounds=200, warmup_rounds=10)
