"""DDPM for actions: noise schedules and the diffusion policy's sampler and (weighted) loss.

Follows the QVPO / DIPO reference code (wadx2019/qvpo@40a1974 agent/diffusion.py, cited line by
line in docs/paper-notes.md#diffusion-model-and-networks): epsilon-prediction, cosine beta
schedule (s = 0.008, betas clipped to 0.999), predicted x0 clamped to [-1, 1] while sampling, no
noise at the last step (t = 0), final action clamped to [-1, 1].
"""

from __future__ import annotations

import math

import gin
import torch
from torch import nn

from qvpo import native
from qvpo.errors import require, require_int
from qvpo.nets import Denoiser, make_activation, mish, mish_torch, native_mlp_tail
from qvpo.rng import SeedRNG


def cosine_beta_schedule(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) cosine schedule: alpha_bar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2)."""
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
    alpha_bar = torch.cos(((x / T) + s) / (1 + s) * math.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0, max_beta).to(torch.float32)


def linear_beta_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)


def vp_beta_schedule(T: int) -> torch.Tensor:
    """Variance-preserving schedule of Diffusion-QL / QSM (b_min 0.1, b_max 10)."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    b_max, b_min = 10.0, 0.1
    alpha = torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T ** 2)
    return (1 - alpha).to(torch.float32)


SCHEDULES = {"cosine": cosine_beta_schedule, "linear": linear_beta_schedule, "vp": vp_beta_schedule}


class NoiseSchedule(nn.Module):
    """Every constant of the forward and reverse processes, computed once (buffers move with .to)."""

    def __init__(self, T: int, kind: str):
        super().__init__()
        require_int(T, "diffusion steps T", 1)
        require(kind in SCHEDULES, f"unknown beta schedule {kind!r}; expected one of {sorted(SCHEDULES)}")
        betas = SCHEDULES[kind](T).to(torch.float64)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        post_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        consts = {
            "betas": betas,
            "alpha_bar": alpha_bar,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            # x0 = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps
            "sqrt_recip_alpha_bar": (1 / alpha_bar).sqrt(),
            "sqrt_recipm1_alpha_bar": (1 / alpha_bar - 1).sqrt(),
            # posterior q(x_{t-1} | x_t, x0) mean = c0 x0 + ct x_t
            "posterior_c0": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_ct": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
            # the reference clips the log-variance at 1e-20 (the t = 0 variance is 0)
            "posterior_std": (0.5 * post_var.clamp(min=1e-20).log()).exp(),
        }
        self.T = T
        for name, value in consts.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)
        # what one sampling step needs, one row per step (moves with .to(device))
        self.register_buffer("step_coefs", torch.stack([
            consts["sqrt_recip_alpha_bar"], consts["sqrt_recipm1_alpha_bar"], consts["posterior_c0"],
            consts["posterior_ct"], consts["posterior_std"]], dim=1).to(torch.float32), persistent=False)
        self.step_coef_floats = self.step_coefs.tolist()  # host copy, made once: no device sync later


def denoise_step(x, sp, step_bias, W_a, hidden, c, z, act, clip_x0: bool, dtype):
    """One reverse DDPM step for a block of chains: x_t (N, R, A) -> x_{t-1}.

    sp (N, sb, 1, H): the first layer's state part for the block's sb states (R = sb * n rows);
    step_bias (N, 1, 1, H): its time part plus bias at this step; c = (sqrt(1/ab), sqrt(1/ab - 1),
    posterior c0, posterior ct, posterior std) at this step; z the step's noise (zeros at t = 0).
    """
    N, R, _ = x.shape
    sb, H = sp.shape[1], sp.shape[-1]
    h = torch.bmm(x, W_a).view(N, sb, R // sb, H)
    h += sp
    h += step_bias
    h = act(h.view(N, R, H).to(dtype))
    for j, (w, b) in enumerate(hidden):
        h = torch.baddbmm(b, h, w)
        if j < len(hidden) - 1:
            h = act(h)
    return posterior_step(x, h.float(), c, z, clip_x0)


def posterior_step(x, eps, c, z, clip_x0: bool):
    """x_{t-1} from x_t and the predicted noise: x0 = sqrt(1/ab) x - sqrt(1/ab - 1) eps (clamped
    to [-1, 1] if clip_x0), then the posterior mean c0 x0 + ct x plus std * z."""
    x0 = c[0] * x - c[1] * eps
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    return c[2] * x0 + c[3] * x + c[4] * z


def denoise_step_native(x, sp, step_bias, W_a, hidden, biases32, out_t, c, z, clip_x0: bool, bufs):
    """`denoise_step` with Mish and the first layer in the native kernels (qvpo/native), the
    hidden matmuls into preallocated buffers: the same maths, on CPU.

    sp (N, sb, H): the first layer's state part for the block's states; step_bias (N, H);
    hidden, biases32, out_t: the later layers, as `native_mlp_tail` takes them; bufs: one
    (N, R, width) buffer per layer in the sampler's dtype, then a float32 (N, R, A) one for the
    predicted noise, reused at every step.
    """
    h = native.first_layer_mish(x, W_a, sp, step_bias, out=bufs[0])
    return posterior_step(x, native_mlp_tail(h, hidden, biases32, out_t, bufs[1:]), c, z, clip_x0)


# T is the algorithm's (QVPO.T = 20, DIPO.T = 100): each agent passes its own, and binding
# DiffusionPolicy.T is an error rather than a value one of them would silently ignore
@gin.configurable(denylist=["T"])
class DiffusionPolicy(nn.Module):
    """A conditional DDPM over actions in [-1, 1]^A, one per seed (leading seed dimension N).

    Args:
      T: diffusion steps (set by the agent: QVPO.T, DIPO.T; not a gin parameter here).
      schedule: beta schedule name (the reference's: cosine;
        docs/paper-notes.md#diffusion-model-and-networks).
      clip_x0: clamp the predicted x0 to [-1, 1] at each sampling step (the reference does; same
        section).
      precision: 'fp32', or 'bf16' to run the sampler's hidden layers in bfloat16 (opt-in speed
        mode for CPUs with native bf16 matmul and for GPUs; training stays float32).
      block_rows: candidate rows per block in the per-layer sampler (a speed knob; same maths;
        the fused one sizes its own blocks). None = one block on CUDA (there the sampler is
        launch-bound: fewer, larger kernels win); on CPU 16384 with the native kernels (larger
        matmuls win) and 2048 with torch ops (a block's activations stay in L2 between passes).
      compile: torch.compile the denoising step (static shapes, one graph per block shape), which
        fuses Mish and the adds around the matmuls; costs a compilation at the first call of each
        shape. Off by default and in tests.
      native: on CPU, run the first layer and Mish in the native kernels of
        qvpo/native (built with the machine's C compiler on first use; torch ops where none
        works). Same maths; False = torch ops only. With precision='bf16' the kernels compute in
        float32 and round their outputs to bfloat16 once. Not used with compile.
      fused: with native, run the whole sampler in one native call where the CPU allows it
        (float32: AVX-512; bf16: AMX-BF16, Intel Sapphire Rapids and later): blocks of chains
        through all T steps with their activations in cache, each hidden layer's bias and Mish
        applied to its matmul's results while in registers (qvpo/native/sampler.c). Same maths;
        needs hidden widths all equal and a multiple of 32 (else the per-layer kernels run).
    """

    def __init__(self, state_dim: int, action_dim: int, generators: list[torch.Generator],
                 T: int = 20, schedule: str = "cosine", clip_x0: bool = True,
                 precision: str = "fp32", block_rows: int | None = None, compile: bool = False,
                 native: bool = True, fused: bool = True):
        super().__init__()
        require(precision in ("fp32", "bf16"), f"DiffusionPolicy.precision must be 'fp32' or 'bf16', got {precision!r}")
        if block_rows is not None:
            require_int(block_rows, "DiffusionPolicy.block_rows", 1)
        self.action_dim, self.state_dim = action_dim, state_dim
        self.schedule = NoiseSchedule(T, schedule)
        self.denoiser = Denoiser(state_dim, action_dim, generators)
        self.clip_x0, self.precision, self.block_rows = clip_x0, precision, block_rows
        self.compile, self.native, self.fused = compile, native, fused

    @property
    def T(self) -> int:
        return self.schedule.T

    @torch.no_grad()
    def sample(self, states: torch.Tensor, n: int, rng: SeedRNG | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw n actions per state: states (N, B, S) -> (N, B, n, A); row b*n + j = candidate j of b.

        The same maths as a plain DDPM loop over `self.denoiser` (tests/test_diffusion.py holds
        one and compares), arranged for speed:
        * the first layer W [a_t, temb_t, s] + b is split: W_s s once per state, W_t temb_t + b
          once per step, only W_a a_t (A columns) per row;
        * chains are independent, so blocks of `block_rows` rows run through all T steps while
          their activations stay in cache;
        * schedule constants are computed once (NoiseSchedule.step_coefs); Mish is the one-exp form;
        * `precision='bf16'` runs the hidden layers' matmuls and activations in bfloat16 (the
          DDPM update itself stays float32); `compile=True` fuses each step's elementwise work.
        Noise comes from `rng` (one stream per seed), else torch's global generator, drawn for all
        rows and steps at once, so the samples of a seed do not depend on `block_rows` or on
        whether the native kernels run; `noise`, if given, is (N, T, B*n, A): the initial x_T,
        then the noise of steps T-1 .. 1.
        """
        N, B, S = states.shape
        A, T = self.action_dim, self.T
        den = self.denoiser
        first, *rest = den.linears
        W_a, W_t, W_s = first.weight.split([A, den.time_dim, S], dim=1)   # (N, ., H) each
        step_bias = torch.baddbmm(first.bias, den.step_embeddings(T), W_t)  # (N, T, H)
        state_proj = torch.bmm(states, W_s)                                  # (N, B, H)
        dtype = torch.bfloat16 if self.precision == "bf16" else states.dtype
        if noise is None:  # all of it at once: the same draws whatever the blocking (or kernels)
            noise = (rng.randn(T, B * n, A) if rng is not None
                     else torch.randn(N, T, B * n, A, device=states.device))
        # the native kernels: the whole sampler in one call (fused), else per layer
        kernels = self.native and not self.compile and den.activation == "mish" and native.usable(states)
        widths = [lin.out_features for lin in den.linears]  # hidden widths, then A
        if kernels and self.fused and B * n > 0 and native.fused_ok(widths[:-1], A, dtype == torch.bfloat16):
            # every step of every chain in one native call (sampler.c): blocks of chains through
            # all T steps with their activations in cache; hidden layers on AVX-512 FMA or AMX
            out = native.sample_fused(
                noise, state_proj, step_bias, W_a, [(lin.weight, lin.bias) for lin in rest[:-1]],
                rest[-1].weight.transpose(1, 2), rest[-1].bias, self.schedule.step_coefs, self.clip_x0,
                dtype == torch.bfloat16)
            return out.clamp_(-1.0, 1.0).view(N, B, n, A)
        hidden = [(lin.weight.to(dtype), lin.bias.to(dtype)) for lin in rest]
        # per-step constants: a tensor row for the compiled step (no recompile per value), Python
        # floats for the eager one (no indexing kernels on the hot path)
        coefs = self.schedule.step_coefs if self.compile else self.schedule.step_coef_floats
        step = self._compiled_step() if self.compile else denoise_step
        # torch ops only when compiled (a native call would break the graph) or asked to
        act = ((mish if self.native and not self.compile else mish_torch) if den.activation == "mish"
               else make_activation(den.activation))
        biases32 = [lin.bias for lin in rest]
        out_t = (rest[-1].weight.transpose(1, 2).contiguous(), rest[-1].bias) if kernels and len(rest) >= 2 else None
        out = torch.empty(N, B * n, A, device=states.device)
        # default block: all rows on CUDA (launch-bound); on CPU up to 16384 rows with the native
        # kernels (they fuse the element-wise work, so large matmuls win), 2048 with torch ops
        # (their several passes over each activation want it in cache); measured in `make bench`
        block_rows = self.block_rows or (B * n if states.device.type != "cpu" else 16384 if kernels else 2048)
        per_block = max(1, block_rows // n)  # states per block
        bufs = None
        for b0 in range(0, B, per_block):
            b1 = min(B, b0 + per_block)
            r0, r1 = b0 * n, b1 * n
            if kernels and (bufs is None or bufs[0].shape[1] != r1 - r0):  # allocated once per block shape
                bufs = [torch.empty(N, r1 - r0, w, dtype=dtype) for w in widths] + [torch.empty(N, r1 - r0, A)]
            x = noise[:, 0, r0:r1].contiguous()
            for i in reversed(range(T)):
                if i == 0:  # no noise at the last step
                    z = torch.zeros_like(x)
                else:
                    z = noise[:, T - i, r0:r1]
                if kernels:
                    x = denoise_step_native(x, state_proj[:, b0:b1], step_bias[:, i], W_a,
                                            hidden, biases32, out_t, coefs[i], z, self.clip_x0, bufs)
                else:
                    x = step(x, state_proj[:, b0:b1, None, :], step_bias[:, i, None, None, :], W_a, hidden,
                             coefs[i], z, act, self.clip_x0, dtype)
            out[:, r0:r1] = x
        return out.clamp_(-1.0, 1.0).view(N, B, n, A)

    def _compiled_step(self):
        # static shapes per call site: one graph per block shape (the last block may differ)
        if getattr(self, "_step_fn", None) is None:
            self._step_fn = torch.compile(denoise_step, dynamic=False)
        return self._step_fn

    def loss(self, states: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor | None = None,
             rng: SeedRNG | None = None, t: torch.Tensor | None = None,
             eps: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted denoising loss per seed: (N,) with
        L = mean_i w_i * mean_d (eps - eps_theta(sqrt(ab_t) a_i + sqrt(1 - ab_t) eps, s_i, t))^2.

        states (N, R, S), actions (N, R, A), weights (N, R) or None (the plain DDPM loss).
        t (N, R) ~ Uniform{0..T-1} and eps ~ N(0, I) come from `rng` unless given.
        """
        N, R, A = actions.shape
        if t is None:
            t = rng.randint(self.T, R) if rng is not None else torch.randint(0, self.T, (N, R), device=actions.device)
        if eps is None:
            eps = rng.randn(R, A) if rng is not None else torch.randn_like(actions)
        sch = self.schedule
        a_t = sch.sqrt_alpha_bar[t, None] * actions + sch.sqrt_one_minus_alpha_bar[t, None] * eps
        per_row = (self.denoiser(a_t, t, states, self.T) - eps).pow(2).mean(dim=-1)
        if weights is not None:
            per_row = per_row * weights
        return per_row.mean(dim=-1)
