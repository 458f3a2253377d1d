"""The machine's floor for one QVPO update, from measured primitives.

floor = (every matmul FLOP of the update) / (measured matmul throughput at the sampler's shape)
      + (every activation element of the update) * (measured seconds per element of one exp pass)

One exp pass per activation element is the least an exact Mish needs (it is transcendental);
the matmul throughput is measured at the sampler's own shape (block_rows x 256 @ 256 x 256), so
the floor is what this machine can do for this workload, not a datasheet figure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Shapes:
    obs: int = 11        # Hopper-v5
    act: int = 3
    hidden: int = 256    # 3 x 256 denoiser and critics
    layers: int = 3
    time_dim: int = 32
    batch: int = 256
    Nd: int = 64
    Kt: int = 4
    Ne: int = 10
    T: int = 20


def mlp_costs(rows: int, in_dim: int, hidden: int, layers: int, out: int) -> tuple[float, float]:
    """(matmul FLOPs, activation elements) of one forward pass of an MLP over `rows` rows."""
    dims = [in_dim] + [hidden] * layers + [out]
    flops = sum(2 * rows * a * b for a, b in zip(dims[:-1], dims[1:]))
    return flops, rows * hidden * layers


def sampler_costs(s: Shapes, rows: int) -> tuple[float, float]:
    """The fast sampler: per step W_a a (A columns) + hidden layers + output, per row."""
    per_step_flops, acts = mlp_costs(rows, s.act, s.hidden, s.layers, s.act)
    return s.T * per_step_flops, s.T * acts


def update_costs(s: Shapes) -> dict[str, tuple[float, float]]:
    """(FLOPs, activation elements) of each part of one QVPO update."""
    sa = s.obs + s.act
    rows_nd, rows_kt = s.batch * s.Nd, s.batch * s.Kt
    crit = lambda rows: tuple(2 * x for x in mlp_costs(rows, sa, s.hidden, s.layers, 1))  # noqa: E731
    policy_rows = s.batch * (1 + s.Ne)
    pol_fwd = mlp_costs(policy_rows, s.act + s.time_dim + s.obs, s.hidden, s.layers, s.act)
    crit_train = crit(s.batch)
    return {
        "sampling Nd candidates": sampler_costs(s, rows_nd),
        "sampling Kt target candidates": sampler_costs(s, rows_kt),
        "scoring candidates (twin Q)": tuple(a + b for a, b in zip(crit(rows_nd), crit(rows_kt))),
        # forward + backward ~ 3x forward FLOPs; activations: forward and backward pass
        "critic training": (3 * crit_train[0], 2 * crit_train[1]),
        "policy training": (3 * pol_fwd[0], 2 * pol_fwd[1]),
    }


def floor_seconds(costs: dict[str, tuple[float, float]], matmul_flops_per_s: float,
                  act_s_per_element: float) -> float:
    return sum(f / matmul_flops_per_s + a * act_s_per_element for f, a in costs.values())


def mixed_floor(costs: dict[str, tuple[float, float]], fp32_flops_per_s: float, bf16_flops_per_s: float,
                act_s_per_element: float, bf16_parts: tuple[str, ...] = ()) -> float:
    """The floor with the parts whose names start with one of `bf16_parts` (e.g. "sampling",
    "scoring") at the bf16 matmul rate and the rest at the fp32 rate."""
    fast = {k: v for k, v in costs.items() if bf16_parts and k.startswith(bf16_parts)}
    rest = {k: v for k, v in costs.items() if k not in fast}
    return (floor_seconds(fast, bf16_flops_per_s, act_s_per_element)
            + floor_seconds(rest, fp32_flops_per_s, act_s_per_element))
