"""Networks shared by the agents: MLPs with Mish, the sinusoidal time embedding, twin Q.

Initialisation follows the QVPO reference code: every Linear gets weight ~ N(0, 1/(2*sqrt(fan_in)))
and bias 0 (the code intends a truncated normal but never truncates, so the effective init is
the plain normal; see docs/paper-notes.md#diffusion-model-and-networks). `init='torch'` keeps
PyTorch's default instead.
"""

from __future__ import annotations

import math

import gin
import torch
import torch.nn.functional as F
from torch import nn

from qvpo import native
from qvpo.errors import require


def mish(x: torch.Tensor) -> torch.Tensor:
    """Exact Mish, x * tanh(softplus(x)), the fastest way available for this tensor.

    * CPU float32: the native kernels of qvpo/native, one pass over memory (docs/paper-notes.md#cost: on
      CPU torch's Mish costs about as much as the matmul that feeds it); under autograd with
      their backward (first-order gradients);
    * elsewhere under autograd: F.mish (the library's fused backward);
    * otherwise the one-exp form: tanh(log(1 + e^x)) = n / (n + 2) with n = e^x (e^x + 2);
      the clamp only avoids inf for x > 20, where n / (n + 2) == 1 to float32 precision anyway.
      Small tensors are launch-bound: one library kernel beats five there.
    """
    cpu32 = x.device.type == "cpu" and x.dtype == torch.float32 and native.library() is not None
    if x.requires_grad and torch.is_grad_enabled():
        return native.MishFunction.apply(x) if cpu32 else F.mish(x)
    if cpu32 and x.is_contiguous():
        return native.mish(x)
    if x.numel() < 65536:
        return F.mish(x)
    return mish_torch(x)


def mish_torch(x: torch.Tensor) -> torch.Tensor:
    """Exact Mish in torch ops with one exp (what torch.compile fuses; no native call inside)."""
    e = torch.exp(x.clamp(max=20.0))
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))  # not (x n) / (n + 2): x n overflows for huge x


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


ACTIVATIONS = {"mish": Mish, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    require(name in ACTIVATIONS, f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class SeedLinear(nn.Module):
    """N independent Linear layers, one per seed: (N, rows, in) -> (N, rows, out).

    The seed is a batch dimension of every network (purejaxrl's idea): one process trains N
    seeds with batched matmuls, and N = 1 is the ordinary single-seed network.
    """

    def __init__(self, seeds: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(seeds, in_features, out_features))  # x @ W layout
        self.bias = nn.Parameter(torch.zeros(seeds, 1, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


@gin.configurable
def init_linear(module: nn.Module, generators: list[torch.Generator], scheme: str = "reference") -> None:
    """Initialise every SeedLinear in `module`, seed k from generators[k].

    Seeds are the outer loop, so seed k's parameters are the same whether it is trained alone
    or with others (a batched run and N separate runs start from the same networks).

    Args:
      scheme: 'reference' = N(0, 1/(2 sqrt(fan_in))) weights and zero bias (QVPO / DIPO reference
        code), 'torch' = PyTorch's nn.Linear default (uniform +-1/sqrt(fan_in) weights and
        bias), 'xavier' = Xavier-uniform weights, zero bias (QSM reference code).
    """
    require(scheme in ("reference", "torch", "xavier"),
            f"init_linear.scheme must be 'reference', 'torch' or 'xavier', got {scheme!r}")
    layers = [m for m in module.modules() if isinstance(m, SeedLinear)]
    with torch.no_grad():
        for k, g in enumerate(generators):
            for m in layers:
                w, b, fan_in, fan_out = m.weight[k], m.bias[k], m.in_features, m.out_features
                if scheme == "reference":
                    w.copy_(torch.randn(w.shape, generator=g) / (2.0 * math.sqrt(fan_in)))
                    b.zero_()
                elif scheme == "torch":
                    bound = 1.0 / math.sqrt(fan_in)
                    w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)
                    b.copy_(torch.rand(b.shape, generator=g) * 2 * bound - bound)
                else:
                    bound = math.sqrt(6.0 / (fan_in + fan_out))
                    w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)
                    b.zero_()


def mlp(seeds: int, in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [SeedLinear(seeds, d, h), make_activation(activation)]
        d = h
    layers.append(SeedLinear(seeds, d, out_dim))
    return nn.Sequential(*layers)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal features of integer diffusion steps t, shape (..., dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(10000.0) / (half - 1)))
    angles = t.to(torch.float32)[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


@gin.configurable
class Denoiser(nn.Module):
    """epsilon_theta(a_t, t, s): the noise predictor of the diffusion policy, one per seed.

    Input is [a_t, time embedding, s]; the time embedding is sinusoidal(time_dim) ->
    Linear(time_dim, time_hidden) -> Mish -> Linear(time_hidden, time_dim), as in the reference;
    the defaults are its sizes (docs/paper-notes.md#diffusion-model-and-networks).
    """

    def __init__(self, state_dim: int, action_dim: int, generators: list[torch.Generator],
                 hidden: tuple[int, ...] = (256, 256, 256),  # reference: 3 x 256
                 time_dim: int = 32,  # reference: sinusoidal(32)
                 time_hidden: int = 256,  # reference: Linear(32, 256) -> Mish -> Linear(256, 32)
                 activation: str = "mish"):
        super().__init__()
        require(time_dim >= 4 and time_dim % 2 == 0, f"Denoiser.time_dim must be even and >= 4, got {time_dim}")
        require(len(hidden) >= 1 and all(h >= 1 for h in hidden),
                f"Denoiser.hidden must be a non-empty tuple of positive widths, got {hidden}")
        N = len(generators)
        self.time_dim, self.activation = time_dim, activation
        self.time_mlp = nn.Sequential(SeedLinear(N, time_dim, time_hidden), make_activation(activation),
                                      SeedLinear(N, time_hidden, time_dim))
        self.body = mlp(N, action_dim + time_dim + state_dim, tuple(hidden), action_dim, activation)
        init_linear(self, generators)

    @property
    def linears(self) -> list[SeedLinear]:
        return [m for m in self.body if isinstance(m, SeedLinear)]

    def step_embeddings(self, T: int) -> torch.Tensor:
        """The time MLP at every step 0..T-1: (N, T, time_dim). It depends on t alone, so it is
        evaluated T times per call, never once per row."""
        N = self.time_mlp[0].weight.shape[0]
        t = torch.arange(T, device=self.time_mlp[0].weight.device)
        return self.time_mlp(sinusoidal_embedding(t, self.time_dim).expand(N, T, -1))

    def forward(self, a_t: torch.Tensor, t: torch.Tensor | int, s: torch.Tensor, T: int) -> torch.Tensor:
        """a_t (N, R, A), t (N, R) integer steps in [0, T) or one int step for every row,
        s (N, R, S) -> predicted noise (N, R, A) (DiffusionPolicy's denoiser contract)."""
        temb = self.step_embeddings(T)
        if isinstance(t, int):  # every row at step t (a sampler's call)
            temb = temb[:, t, None, :].expand(-1, a_t.shape[1], -1)
        else:
            temb = torch.gather(temb, 1, t[..., None].expand(-1, -1, self.time_dim))
        return self.body(torch.cat([a_t, temb, s], dim=-1))


@gin.configurable
class TwinQ(nn.Module):
    """Two independent Q networks on [s, a] (clipped double-Q), one pair per seed; the defaults
    are the reference's sizes (docs/paper-notes.md#diffusion-model-and-networks)."""

    def __init__(self, state_dim: int, action_dim: int, generators: list[torch.Generator],
                 hidden: tuple[int, ...] = (256, 256, 256),  # reference: 3 x 256 Mish
                 activation: str = "mish", init: str | None = None, scoring_precision: str = "fp32",
                 fused: bool = True):
        """init: an init_linear scheme for these networks (None = init_linear's gin default).
        scoring_precision: 'fp32', or 'bf16' to score sampled candidates (`q_min_candidates`)
        with bfloat16 matmuls (opt-in speed mode, the critic's counterpart of
        DiffusionPolicy.precision = 'bf16'; the critic's training and TD targets stay float32).
        fused: score candidates with each network in one native call where the CPU allows it
        (float32: AVX-512, bf16: AMX; as DiffusionPolicy.fused; same maths)."""
        super().__init__()
        require(scoring_precision in ("fp32", "bf16"),
                f"TwinQ.scoring_precision must be 'fp32' or 'bf16', got {scoring_precision!r}")
        self.scoring_precision, self.fused = scoring_precision, fused
        require(len(hidden) >= 1 and all(h >= 1 for h in hidden),
                f"TwinQ.hidden must be a non-empty tuple of positive widths, got {hidden}")
        N = len(generators)
        self.q1 = mlp(N, state_dim + action_dim, tuple(hidden), 1, activation)
        self.q2 = mlp(N, state_dim + action_dim, tuple(hidden), 1, activation)
        init_linear(self, generators, **({} if init is None else {"scheme": init}))

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s (N, R, S), a (N, R, A) -> Q1, Q2 each (N, R)."""
        sa = torch.cat([s, a], dim=-1)
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)

    def q_min(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        q1, q2 = self(s, a)
        return torch.minimum(q1, q2)

    @torch.no_grad()
    def q_min_candidates(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """min(Q1, Q2) of k candidate actions per state, without autograd: s (N, B, S),
        a (N, B, k, A) -> (N, B, k). Equal to q_min on the states repeated k times; on CPU with
        the native kernels the first layer's state part W_s s + b is computed once per state,
        and each network runs as first layer + Mish, matmul + bias + Mish, ..., with the last
        Mish fused into the output layer. With scoring_precision = 'bf16' the hidden matmuls
        run in bfloat16 (the native kernels add biases and compute Mish in float32, rounding
        once; elsewhere torch.autocast)."""
        N, B, k, A = a.shape
        nets = (self.q1, self.q2)
        layers = [[m for m in net if isinstance(m, SeedLinear)] for net in nets]
        bf16 = self.scoring_precision == "bf16"
        if not (isinstance(self.q1[1], Mish) and B * k > 0 and native.usable(a)):
            with torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=bf16):
                q = self.q_min(s.repeat_interleave(k, dim=1), a.reshape(N, B * k, A))
            return q.float().view(N, B, k)
        S = s.shape[-1]
        rows = a.reshape(N, B * k, A).contiguous()
        dtype = torch.bfloat16 if bf16 else torch.float32
        widths = [lin.out_features for lin in layers[0][:-1]]
        fused = self.fused and B * k >= native.FUSED_MLP_MIN_ROWS and native.fused_ok(widths, A, bf16)
        qs = []
        for lins in layers:
            first, *rest = lins
            W_s, W_a = first.weight.split([S, A], dim=1)                 # input is [s, a]
            if fused:  # the whole network in one native call (sampler.c: qvpo_mlp_fused)
                q = native.mlp_fused(rows, torch.bmm(s, W_s), first.bias, W_a,
                                     [(lin.weight, lin.bias) for lin in rest[:-1]],
                                     rest[-1].weight.transpose(1, 2), rest[-1].bias, bf16)
                qs.append(q.squeeze(-1))
                continue
            h = native.first_layer_mish(rows, W_a, torch.bmm(s, W_s), first.bias[:, 0],
                                        out=torch.empty(N, B * k, first.out_features, dtype=dtype))
            out_t = (rest[-1].weight.transpose(1, 2).contiguous(), rest[-1].bias) if len(rest) >= 2 else None
            hidden = [(lin.weight.to(dtype), lin.bias.to(dtype)) for lin in rest]
            q = native_mlp_tail(h, hidden, [lin.bias for lin in rest], out_t)
            qs.append(q.squeeze(-1))
        return torch.minimum(qs[0], qs[1]).view(N, B, k)


def native_mlp_tail(h: torch.Tensor, hidden: list[tuple[torch.Tensor, torch.Tensor]],
                    biases32: list[torch.Tensor], out_t: tuple[torch.Tensor, torch.Tensor] | None,
                    bufs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The layers after the first of a Mish MLP, on its first activation h (N, R, H), with the
    native kernels: each hidden layer a matmul, then bias + Mish in one pass. Returns the output
    (N, R, out) in float32.

    hidden: (weight, bias) of the later layers, output layer last, in h's dtype (float32 or
    bfloat16); biases32: their biases in float32 (the kernels add them in float32); out_t: None,
    or the output layer's float32 (weight transposed (N, out, H), bias) with out <= MAX_OUT:
    then the last Mish and the output layer run as one kernel and that activation never goes
    back to memory; bufs: optional preallocated outputs, one (N, R, width) per later layer in
    h's dtype, then a float32 (N, R, out) one (the sampler reuses them at every step).
    """
    N, R, _ = h.shape
    new = lambda j, width, dtype: torch.empty(N, R, width, dtype=dtype) if bufs is None else bufs[j]  # noqa: E731
    for j, (w, _) in enumerate(hidden[:-1]):
        pre = torch.bmm(h, w, out=new(j, w.shape[-1], h.dtype))
        if out_t is not None and out_t[0].shape[1] <= native.MAX_OUT and j == len(hidden) - 2:
            return native.bias_mish_out(pre, biases32[j], out_t[0], out_t[1], out=new(-1, out_t[0].shape[1], torch.float32))
        h = native.bias_mish(pre, biases32[j], out=pre)
    w, b = hidden[-1]
    return torch.baddbmm(b, h, w, out=new(len(hidden) - 1, w.shape[-1], h.dtype)).float()


def orthogonal_init(net: nn.Sequential, generators: list[torch.Generator], hidden_gain: float,
                    out_gain: float) -> None:
    """Orthogonal weights and zero biases for an `mlp`, seed k from generators[k]: gain
    `hidden_gain` for the hidden layers and `out_gain` for the last (the PPO implementations'
    init, e.g. sqrt(2) / 0.01 for the policy mean and sqrt(2) / 1 for the value network)."""
    layers = [m for m in net.modules() if isinstance(m, SeedLinear)]
    with torch.no_grad():
        for k, g in enumerate(generators):
            for i, m in enumerate(layers):
                w = torch.empty(m.out_features, m.in_features)  # nn.Linear's (out, in) layout
                nn.init.orthogonal_(w, gain=out_gain if i == len(layers) - 1 else hidden_gain, generator=g)
                m.weight[k].copy_(w.T)
                m.bias[k].zero_()
