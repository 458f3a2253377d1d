import os
import platform

import gin
import pytest
import torch


def _sampler_path(where: bool = True) -> str:
    """Which path the sampler takes here by default and why (qvpo.native.describe: native fused,
    native per-layer, or torch ops); builds the native kernels first if they are on."""
    from qvpo import native

    return native.describe(where)


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def pytest_report_header(config):
    # printed at session start, so every `make bench` log says what the "default" rows measured
    config._qvpo_load_at_start = _load()
    return [f"qvpo sampler path: {_sampler_path()}", f"torch {torch.__version__}, {platform.platform()}"]


def pytest_benchmark_update_machine_info(config, machine_info):
    # kept in the JSON, so benchmarks/table.py can write them into the generated results' header
    machine_info["qvpo_sampler_path"] = _sampler_path(where=False)  # no local paths in committed results
    machine_info["torch_version"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    start = getattr(config, "_qvpo_load_at_start", None)
    if start is not None:  # a shared machine: how busy it was around the run
        machine_info["load_average"] = [round(start, 2), round(_load(), 2)]


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    import qvpo.config  # noqa: F401
    yield
    gin.clear_config()
