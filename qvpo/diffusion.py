"""DDPM for actions: noise schedules and the diffusion policy's sampler and (weighted) loss.

Follows the QVPO / DIPO reference code (wadx2019/qvpo@40a1974 agent/diffusion.py, cited line by
line in docs/paper-notes.md#diffusion-model-and-networks): epsilon-prediction, cosine beta
schedule (s = 0.008, betas clipped to 0.999), predicted x0 clamped to [-1, 1] while sampling, no
noise at the last step (t = 0), final action clamped to [-1, 1].

`ddpm_sample_reference` is the sampler's specification: DDPM ancestral sampling written as a
plain loop. Every faster way `DiffusionPolicy.sample` has of computing it (torch ops in cache
blocks, the native per-layer and fused kernels, torch.compile) is tested against it
(tests/test_sampler_spec.py), and it is the path taken for denoisers that have no fast path
(QSM's ScoreNet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The forward process at step t: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, with t (N, R)
        per row of x0 and eps (N, R, A)."""
        return self.sqrt_alpha_bar[t, None] * x0 + self.sqrt_one_minus_alpha_bar[t, None] * eps


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


@dataclass(frozen=True)
class EpsStep:
    """The reverse step as Algorithm 2 of DDPM prints it, with sigma_t^2 = beta_t (the first of
    the two variances of Ho et al. 2020, Sec. 3.2) and no x0 prediction: QSM's reference sampler
    (jaxrl5 ddpm_sampler, see qvpo/agents/qsm.py):
      x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps_theta(x_t, t)) / sqrt(alpha_t) + temperature sqrt(beta_t) z.

    temperature: scale of the step noise (1 = DDPM).
    clip_x: clamp x_{t-1} to [-1, 1] after every step.
    repeat_last_step: M, the t = 0 step (no noise) taken M more times at the end.

    Two details keep QSM's numbers as they were before it sampled through DiffusionPolicy: its
    noise is drawn as that reference's loop draws it, one randn(R, A) per step (x_T first; the
    default step draws all of it in one randn(T, R, A) call, which gives other numbers), and
    ab_t is the schedule's float32 alpha_bar (harmless with the VP schedule's large betas).
    """
    temperature: float = 1.0
    clip_x: bool = True
    repeat_last_step: int = 0

    def __post_init__(self):
        require(self.temperature >= 0, f"EpsStep.temperature must be >= 0, got {self.temperature}")
        require_int(self.repeat_last_step, "EpsStep.repeat_last_step (M)", 0)


@torch.no_grad()
def ddpm_sample_reference(denoiser: nn.Module, schedule: NoiseSchedule, states: torch.Tensor, n: int,
                          noise: torch.Tensor, clip_x0: bool = True,
                          eps_step: EpsStep | None = None) -> torch.Tensor:
    """The sampler's specification: DDPM ancestral sampling (Ho et al. 2020, arXiv 2006.11239,
    Algorithm 2) as a plain loop, one call of the whole denoiser per step.

    states (N, B, S) -> actions (N, B, n, A), row b*n + j = candidate j of state b; noise
    (N, T, B*n, A) = x_T, then the z of steps T-1 .. 1 (the last step adds none). The paper counts
    steps T..1; here t = T-1..0 indexes the schedule (beta_t = schedule.betas[t]). The constants
    are host floats computed in float64 from the schedule's betas: with float32 alpha_bar,
    1 - alpha_bar_t would keep few digits where beta_t is small (DIPO's T = 100: beta_0 = 3e-4).

    The default step is the QVPO / DIPO reference's: predict x0 from eps_theta (eq. 15 solved
    for x0), clamp it to [-1, 1] if clip_x0, step to the mean of the posterior q(x_{t-1} | x_t, x0)
    and add its standard deviation times z (eqs. 6-7). Without the clamp that is Algorithm 2's
    line 4 with sigma_t^2 = beta~_t, the posterior variance. `eps_step` takes line 4 as printed
    instead (QSM; see EpsStep). The final action is clamped to [-1, 1].
    """
    N, B, _ = states.shape
    T = schedule.T
    s = states.repeat_interleave(n, dim=1)
    betas64 = schedule.betas.double()
    betas, alpha_bar = betas64.tolist(), torch.cumprod(1.0 - betas64, 0).tolist()  # alpha_bar_t = prod (1 - beta)
    alpha_bar32 = schedule.alpha_bar.tolist()

    def step(x: torch.Tensor, t: int, z: torch.Tensor | None) -> torch.Tensor:
        eps = denoiser(x, t, s, T)  # eps_theta(x_t, t), every row at step t
        beta, ab = betas[t], alpha_bar[t]
        if eps_step is not None:
            ab = alpha_bar32[t]  # QSM's sampler takes the float32 alpha_bar: kept, so are its numbers
            # line 4: x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps) + sigma_t z
            x = (x - beta / math.sqrt(1.0 - ab) * eps) / math.sqrt(1.0 - beta)
            if z is not None:
                x = x + math.sqrt(beta) * eps_step.temperature * z
            return x.clamp(-1.0, 1.0) if eps_step.clip_x else x
        ab_prev = alpha_bar[t - 1] if t > 0 else 1.0
        # eq. (4) x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, solved for x0 (eq. 15)
        x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        # eq. (7): q(x_{t-1} | x_t, x0) has mean c0 x0 + ct x_t and variance beta~_t
        c0 = math.sqrt(ab_prev) * beta / (1.0 - ab)
        ct = math.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab)
        mean = c0 * x0 + ct * x
        return mean if z is None else mean + math.sqrt(beta * (1.0 - ab_prev) / (1.0 - ab)) * z

    x = noise[:, 0]  # line 1: x_T ~ N(0, I)
    for t in reversed(range(T)):  # line 2
        x = step(x, t, noise[:, T - t] if t > 0 else None)  # line 3: z ~ N(0, I), none at the last step
    for _ in range(eps_step.repeat_last_step if eps_step is not None else 0):
        x = step(x, 0, None)
    return x.clamp(-1.0, 1.0).view(N, B, n, -1)


# T is the algorithm's (QVPO.T = 20, DIPO.T = 100): each agent passes its own, and binding
# DiffusionPolicy.T is an error rather than a value one of them would silently ignore. The
# denoiser and the step rule are objects an agent builds (QSM), not settings: left out of gin, so
# they never enter the operative config (nor, through it, the run identity; qvpo/identity.py)
@gin.configurable(denylist=["T", "denoiser", "eps_step"])
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
        qvpo/native (torch.library ops built by torch's extension builder on first use; on by
        default only where measured faster, qvpo.native.default_on; torch ops elsewhere or where
        the build fails). Same maths; False = torch ops only. With precision='bf16' the kernels compute in
        float32 and round their outputs to bfloat16 once. Not used with compile.
      fused: with native, run the whole sampler in one native call where the CPU allows it
        (float32: AVX-512; bf16: AMX-BF16, Intel Sapphire Rapids and later): blocks of chains
        through all T steps with their activations in cache, each hidden layer's bias and Mish
        applied to its matmul's results while in registers (qvpo/native/sampler.c). Same maths;
        needs hidden widths all equal and a multiple of 32 (else the per-layer kernels run).
      denoiser: the noise model eps_theta (not a gin parameter); None = a `Denoiser` (gin-configured,
        initialised from `generators`). Any nn.Module called as
          denoiser(a_t, t, s, T) -> eps (N, R, A)
        with a_t (N, R, A) noised actions, s (N, R, S) states, T the number of steps, and t the
        step: a Python int when every row is at the same step (the sampler), else an (N, R)
        integer tensor (the loss); steps count 0..T-1, 0 the last sampling step. N is the seed
        dimension: each seed's rows go through that seed's network. The speed paths above
        exist for `Denoiser` only; any other denoiser samples by `ddpm_sample_reference`.
      eps_step: None = the step above (x0 predicted and clamped, posterior mean and std);
        an `EpsStep` = Algorithm 2's step as printed, with its own clipping and noise draws
        (QSM's sampler; then clip_x0 must be False). Not a gin parameter.
    """

    def __init__(self, state_dim: int, action_dim: int, generators: list[torch.Generator] | None,
                 T: int = 20, schedule: str = "cosine", clip_x0: bool = True,
                 precision: str = "fp32", block_rows: int | None = None, compile: bool = False,
                 native: bool = True, fused: bool = True, denoiser: nn.Module | None = None,
                 eps_step: EpsStep | None = None):
        super().__init__()
        require(precision in ("fp32", "bf16"), f"DiffusionPolicy.precision must be 'fp32' or 'bf16', got {precision!r}")
        if block_rows is not None:
            require_int(block_rows, "DiffusionPolicy.block_rows", 1)
        require(denoiser is not None or generators is not None,
                "DiffusionPolicy needs generators to initialise its Denoiser (or a denoiser)")
        require(eps_step is None or not clip_x0,
                "DiffusionPolicy: eps_step has no x0 to clamp; pass clip_x0=False (EpsStep.clip_x clips x)")
        self.action_dim, self.state_dim = action_dim, state_dim
        self.schedule = NoiseSchedule(T, schedule)
        self.denoiser = Denoiser(state_dim, action_dim, generators) if denoiser is None else denoiser
        self.eps_step = eps_step
        self.clip_x0, self.precision, self.block_rows = clip_x0, precision, block_rows
        self.compile, self.native, self.fused = compile, native, fused

    @property
    def T(self) -> int:
        return self.schedule.T

    @torch.no_grad()
    def sample(self, states: torch.Tensor, n: int, rng: SeedRNG | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw n actions per state: states (N, B, S) -> (N, B, n, A); row b*n + j = candidate j of b.

        The maths of `ddpm_sample_reference` (tests/test_sampler_spec.py compares every path
        with it); for a `Denoiser` with the default step it is arranged for speed:
        * the first layer W [a_t, temb_t, s] + b is split: W_s s once per state, W_t temb_t + b
          once per step, only W_a a_t (A columns) per row;
        * chains are independent, so blocks of `block_rows` rows run through all T steps while
          their activations stay in cache;
        * schedule constants are computed once (NoiseSchedule.step_coefs); Mish is the one-exp form;
        * `precision='bf16'` runs the hidden layers' matmuls and activations in bfloat16 (the
          DDPM update itself stays float32); `compile=True` fuses each step's elementwise work.
        Noise comes from `rng` (one stream per seed), else torch's global generator, drawn for all
        rows and steps at once, so the samples of a seed do not depend on `block_rows` or on
        whether the native kernels run (with `eps_step`: one draw per step, see EpsStep);
        `noise`, if given, is (N, T, B*n, A): the initial x_T, then the noise of steps T-1 .. 1.
        """
        N, B, S = states.shape
        A, T = self.action_dim, self.T
        den = self.denoiser
        if self.eps_step is not None or not isinstance(den, Denoiser):  # no fast path for these
            if noise is None and rng is not None:
                # the seeds' own streams; with eps_step one draw per step, as QSM's reference loop
                # makes them (the same numbers as drawing while sampling: nothing draws in between)
                noise = (torch.stack([rng.randn(B * n, A) for _ in range(T)], dim=1) if self.eps_step is not None
                         else rng.randn(T, B * n, A))
            elif noise is None:
                noise = torch.randn(N, T, B * n, A, device=states.device)
            return ddpm_sample_reference(den, self.schedule, states, n, noise, self.clip_x0, self.eps_step)
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
        a_t = self.schedule.noised(actions, t, eps)
        per_row = (self.denoiser(a_t, t, states, self.T) - eps).pow(2).mean(dim=-1)
        if weights is not None:
            per_row = per_row * weights
        return per_row.mean(dim=-1)
