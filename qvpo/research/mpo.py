"""MPO's non-parametric E-step as the weight of the Q-weighted variational loss (open question 5
of the project's list, docs/paper-notes.md#open-questions: does the Q-weighted variational loss gain inside another policy-optimisation
framework such as MPO?).

The E-step (Abdolmaleki et al. 2018, "Maximum a Posteriori Policy Optimisation", ICLR 2018,
arXiv 1806.06920, Section 3.2, "Constrained E-step" and "Non parametric variational
distribution", eqs. (7)-(9); derivation in Appendix D.2) solves, for the sampling policy pi of the
current iteration,

    max_q  E_{mu(s)} E_{q(a|s)} [Q(s, a)]   s.t.   E_{mu(s)} KL(q(.|s) || pi(.|s)) < eps      (7)

whose solution is q(a|s) ∝ pi(a|s) exp(Q(s, a) / eta*)                                      (8)
with eta* the minimiser of the convex dual

    g(eta) = eta eps + eta E_{mu(s)} log E_{pi(a|s)} exp(Q(s, a) / eta).                     (9)

(From the Lagrangian L = E_mu E_q Q + eta (eps - E_mu KL(q || pi)) + gamma (1 - E_mu E_q 1):
stationarity in q gives (8), the normaliser fixes gamma, and substituting back gives (9).)

Sample-based form used here. QVPO's policy step already draws Nd candidates a_1..a_Nd ~ pi(.|s)
for each of the B states of a minibatch and scores them with the critic, q (N, B, Nd) (N seeds
trained together; every quantity below is per seed). Replacing pi by the empirical distribution
of its samples (uniform 1/Nd over the candidates) and mu by the minibatch:

    g(eta)   = eta eps + eta mean_s log( mean_j exp(Q(s, a_j) / eta) )
    w_j(s)   = softmax_j( Q(s, a_j) / eta* )          (sums to 1 over the Nd candidates of s)
    g'(eta)  = eps - mean_s KL(w(s) || uniform),   KL(w || u) = sum_j w_j log(Nd w_j)
    g''(eta) = mean_s Var_{w(s)}(Q) / eta^3 >= 0     (g convex on eta > 0)

so at the minimiser the sample KL between the E-step distribution and the sampling policy equals
eps (the constraint is active whenever eps < mean_s log(Nd / #argmax ties at s), e.g. eps < log Nd
with distinct Q values). If eps is at or above that ceiling, g is increasing on eta > 0, eta* -> 0
and the weights become one-hot at the argmax (ties split). If Q is constant over the candidates
of every state the weights are uniform for any eta.

The M-step then fits the policy to the weighted samples: here, the denoising loss of every
candidate a_j of state s weighted by w_j(s). How this differs from QVPO's qadv weight
(qvpo.weights.QAdv, w(s) = max(Q(s, a*) - V(s), 0) on the single best candidate a*):

* every candidate is weighted, not only the best one: a near-best candidate keeps a weight close
  to the best's instead of none, and the lower Q, the exponentially smaller its weight;
* the weights are normalised per state (sum_j w_j(s) = 1), so every state of the minibatch
  contributes the same total weight; with qadv a state's weight is its advantage, so states whose
  candidates differ more in Q dominate the loss (and the loss scale follows the Q scale);
* the sharpness is set by the KL bound eps, through eta solved per batch, not by a fixed scale:
  the weights are invariant to shifting Q per state and to rescaling Q per seed (eta rescales with
  it), so eps means the same at any return scale.

Solver (`solve_temperature`). One eta per seed, minimising the sample dual for a fixed batch:
with x = (Q - max_j Q) / D in [-1, 0] (D = the largest per-state spread max_j Q - min_j Q of that
seed) and the inverse temperature u = D / eta, the mean KL is an increasing function of u, and
because Var_w(x) <= 1/4 on [-1, 0], KL(u) <= u^2 / 8: u_lo = sqrt(8 eps) has KL <= eps. The root
of KL(u) = eps (= g'(eta) = 0) is bracketed in t = log u by [log u_lo, log U_MAX] and found with a
safeguarded Newton iteration (Newton in t, a bisection step whenever Newton leaves the bracket or
does not halve the previous step: "rtsafe", Press et al., Numerical Recipes, section 9.4), in
float64, for a fixed number of iterations (no host synchronisation: it can run on an accelerator
inside the update). This is exact to ~1e-12 in KL, where a few Adam steps on log eta are not; the
bracket makes it robust to any start; the result does not depend on the warm start. U_MAX = 1e7
is the sharpest E-step we return (eta = D / 1e7: one-hot to float32 resolution of Q).

`MPOTemperature` keeps eta per seed across updates, either solved exactly per batch
(mode='exact') or, as in MPO practice, learned: log eta is a parameter updated by a few Adam steps
on the dual per update and warm-started from its previous value (mode='learned'; as e.g.
DeepMind's Acme MPO loss, acme/tf/losses/mpo.py, whose `loss_temperature` is this same sample dual,
minimised by gradient steps on a softplus-parameterised temperature together with the policy
loss). The learned eta lags the exact one and, being an absolute scale, is not scale-free.
"""

from __future__ import annotations

import math

import gin
import torch
from torch import nn

from qvpo.errors import require
from qvpo.hooks import QVPOHook
from qvpo.rng import RESEARCH_STREAM, SeedRNG
from qvpo.weights import QWeight

_U_MAX = 1e7  # largest inverse temperature D / eta returned (sharpest E-step)


def _check(q: torch.Tensor, epsilon: float | None = None) -> None:
    require(isinstance(q, torch.Tensor) and q.dim() == 3,
            f"q must be a tensor (N seeds, B states, Nd candidates), got shape "
            f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    require(q.shape[0] >= 1 and q.shape[1] >= 1, f"q needs at least one seed and one state, got shape {tuple(q.shape)}")
    require(q.shape[2] >= 2, f"q needs Nd >= 2 candidates per state (the E-step compares them), got Nd = {q.shape[2]}")
    if epsilon is not None:
        require(isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and math.isfinite(epsilon)
                and epsilon > 0, f"epsilon (the E-step KL bound) must be a finite number > 0, got {epsilon!r}")


def _per_seed(value, q: torch.Tensor, name: str) -> torch.Tensor:
    """A float or an (N,) tensor -> an (N,) float64 tensor on q's device."""
    t = torch.as_tensor(value, dtype=torch.float64, device=q.device)
    require(t.dim() == 0 or tuple(t.shape) == (q.shape[0],),
            f"{name} must be a scalar or one value per seed ({q.shape[0]},), got shape {tuple(t.shape)}")
    return t.expand(q.shape[0]).clone() if t.dim() == 0 else t


def mpo_dual(q: torch.Tensor, log_eta, epsilon: float) -> torch.Tensor:
    """The sample-based dual g(eta) = eta eps + eta mean_s log mean_j exp(Q(s, a_j) / eta) per seed.

    q (N, B, Nd); log_eta a scalar or (N,) (float or tensor; differentiable through it);
    returns (N,) in float64. Stable for any eta > 0: the per-state max is taken out of the
    log-sum-exp, g = eta eps + mean_s max_j Q + eta mean_s log mean_j exp((Q - max_j Q) / eta).
    dg/deta = eps - mean_s KL(softmax(Q / eta) || uniform).
    """
    _check(q, epsilon)
    log_eta = (log_eta if isinstance(log_eta, torch.Tensor)
               else torch.tensor(log_eta, dtype=torch.float64)).to(device=q.device, dtype=torch.float64)
    require(log_eta.dim() == 0 or tuple(log_eta.shape) == (q.shape[0],),
            f"log_eta must be a scalar or one value per seed ({q.shape[0]},), got shape {tuple(log_eta.shape)}")
    eta = log_eta.exp().expand(q.shape[0])
    q = q.detach().to(torch.float64)
    q_max = q.max(dim=-1, keepdim=True).values
    z = (q - q_max) / eta[:, None, None]
    log_mean_exp = torch.logsumexp(z, dim=-1) - math.log(q.shape[-1])  # (N, B), in [-log Nd, 0]
    return eta * epsilon + q_max[..., 0].mean(dim=-1) + eta * log_mean_exp.mean(dim=-1)


def estep_weights(q: torch.Tensor, eta) -> torch.Tensor:
    """The E-step weights w_j(s) = softmax_j(Q(s, a_j) / eta) per seed, (N, B, Nd), summing to 1
    over the candidates of each state; eta a scalar or (N,), > 0. Computed in float64 with the
    max subtracted (constant Q -> uniform for any eta), returned in q's dtype, without autograd
    (the weights are targets of the M-step, not a path for gradients into the critic)."""
    _check(q)
    if isinstance(eta, (int, float)):
        require(eta > 0, f"eta must be > 0, got {eta!r}")  # a tensor eta is not checked (no host sync)
    eta = _per_seed(eta, q, "eta")
    with torch.no_grad():
        q64 = q.detach().to(torch.float64)
        z = (q64 - q64.max(dim=-1, keepdim=True).values) / eta.clamp(min=torch.finfo(torch.float64).tiny)[:, None, None]
        return torch.softmax(z, dim=-1).to(q.dtype)


def weights_kl(w: torch.Tensor) -> torch.Tensor:
    """Mean over states of KL(w(s) || uniform) = sum_j w_j log(Nd w_j), per seed: (N, B, Nd) -> (N,).
    The sample KL between the E-step distribution and the sampling policy (equals eps at eta*)."""
    _check(w)
    w = w.detach().to(torch.float64)
    return torch.xlogy(w, w * w.shape[-1]).sum(dim=-1).mean(dim=-1)


def _kl_slope(x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, B, Nd) in [-1, 0], u (N,) > 0 -> mean_s KL(softmax(u x) || uniform) and its
    derivative in t = log u, u^2 mean_s Var_w(x), both (N,)."""
    z = x * u[:, None, None]
    log_w = z - torch.logsumexp(z, dim=-1, keepdim=True)  # finite: z is
    w = log_w.exp()
    kl = (w * (log_w + math.log(x.shape[-1]))).sum(dim=-1).mean(dim=-1)
    mean_x = (w * x).sum(dim=-1, keepdim=True)
    var = (w * (x - mean_x) ** 2).sum(dim=-1).mean(dim=-1)
    return kl, u * u * var


def solve_temperature(q: torch.Tensor, epsilon: float = 0.1, eta_init=1.0, iters: int = 30) -> torch.Tensor:
    """eta* (N,) per seed minimising the sample-based MPO dual `mpo_dual` for this batch.

    q (N, B, Nd) Q values of Nd candidates per state. Returns float64 eta > 0 on q's device.
    The mean KL(w || uniform) of `estep_weights(q, eta*)` equals epsilon to ~1e-12 when the
    constraint can be active; otherwise (epsilon >= the KL of the argmax, e.g. >= log Nd) the
    sharpest temperature D / 1e7 (D: the largest per-state Q spread of the seed). Seeds are solved
    independently (a seed's result depends on its own q only).

    eta_init (scalar or (N,)): the starting point of the Newton iteration (a warm start; the result
    does not depend on it beyond the tolerance), and the value returned for a seed whose Q is
    constant over the candidates of every state (any eta gives uniform weights there; g has no
    minimiser). iters: safeguarded-Newton iterations (fixed count, no host sync). Measured: from
    random starts eta_init in [1e-6, 1e6], Q scales 1e-4..1e4 and eps in [1e-3, 1] log Nd, |KL - eps|
    <= 1e-8 after 10 iterations and <= 2e-15 after 15 (300 random batches); the default 30 leaves
    a margin, and even pure bisection for 30 steps pins log eta to 2^-30 of the bracket (~1.5e-8).
    Method: see the module docstring.
    """
    _check(q, epsilon)
    require(isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1,
            f"iters must be an int >= 1, got {iters!r}")
    if isinstance(eta_init, (int, float)):
        require(eta_init > 0, f"eta_init must be > 0, got {eta_init!r}")
    eta_init = _per_seed(eta_init, q, "eta_init")
    with torch.no_grad():
        q64 = q.detach().to(torch.float64)
        q_max = q64.max(dim=-1, keepdim=True).values
        spread = (q_max[..., 0] - q64.min(dim=-1).values).amax(dim=-1)  # D (N,)
        degenerate = ~(spread > 0)
        D = torch.where(degenerate, torch.ones_like(spread), spread)
        x = (q64 - q_max) / D[:, None, None]  # in [-1, 0]

        t_hi = torch.full_like(D, math.log(_U_MAX))
        t_lo = torch.full_like(D, min(0.5 * math.log(8.0 * epsilon), math.log(_U_MAX)))  # KL(u_lo) <= eps
        kl_hi, _ = _kl_slope(x, t_hi.exp())
        feasible = kl_hi >= epsilon  # else the constraint can't bind: sharpest E-step

        t = torch.where(eta_init > 0, (D / eta_init.clamp(min=1e-300)).log(), 0.5 * (t_lo + t_hi))
        t = torch.minimum(torch.maximum(t, t_lo), t_hi)
        step_old = t_hi - t_lo
        t_best, f_best = t.clone(), torch.full_like(D, math.inf)
        for _ in range(iters):
            kl, slope = _kl_slope(x, t.exp())
            f = kl - epsilon  # increasing in t; = -g'(eta)
            better = f.abs() < f_best
            t_best, f_best = torch.where(better, t, t_best), torch.where(better, f.abs(), f_best)
            t_lo, t_hi = torch.where(f < 0, t, t_lo), torch.where(f >= 0, t, t_hi)
            step = f / slope.clamp(min=1e-300)
            t_newton = t - step
            newton_ok = (slope > 0) & (t_newton > t_lo) & (t_newton < t_hi) & (2 * step.abs() <= step_old.abs())
            t_next = torch.where(newton_ok, t_newton, 0.5 * (t_lo + t_hi))
            step_old = torch.where(newton_ok, step, 0.5 * (t_hi - t_lo))
            t = t_next
        kl, _ = _kl_slope(x, t.exp())
        better = (kl - epsilon).abs() < f_best
        t_best = torch.where(better, t, t_best)

        u = torch.where(feasible, t_best.exp(), torch.full_like(D, _U_MAX))
        return torch.where(degenerate, eta_init, D / u)


@gin.configurable
class MPOTemperature(nn.Module):
    """The E-step temperature eta per seed, kept across updates; calling it with a batch's
    q (N, B, Nd) updates eta and returns the E-step weights (N, B, Nd) with the updated eta.

    mode='exact': eta solved per batch by `solve_temperature` (warm-started from the previous eta;
    the result does not depend on it). mode='learned': MPO practice, log eta a parameter updated by
    `learned_steps` Adam steps (rate `lr`) on the sample dual per batch, from its previous value
    (the gradient is d g / d log eta = eta (eps - KL)); log eta is kept >= `min_log_eta`.

    epsilon = 0.1: MPO's E-step KL bound eps for its continuous-control experiments (arXiv
    1806.06920, Appendix C, Table 2 "Parameters for non-parametric variational distribution":
    eps = 0.1 for the control suite and humanoid). It bounds the sample KL here (to the uniform
    distribution over Nd candidates); with Nd = 64, log Nd = 4.16, so 0.1 is a mild reweighting.
    eta_init, lr, learned_steps, min_log_eta are ours (no source gives values for this use).
    State (state_dict): log_eta and the Adam moments, per seed.
    """

    def __init__(self, epsilon: float = 0.1, mode: str = "exact", num_seeds: int = 1, eta_init: float = 1.0,
                 lr: float = 0.01, learned_steps: int = 1, iters: int = 30, min_log_eta: float = -18.0):
        super().__init__()
        require(isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and math.isfinite(epsilon)
                and epsilon > 0,
                f"MPOTemperature.epsilon (the E-step KL bound) must be a finite number > 0, got {epsilon!r}")
        require(mode in ("exact", "learned"), f"MPOTemperature.mode must be 'exact' or 'learned', got {mode!r}")
        require(isinstance(eta_init, (int, float)) and eta_init > 0,
                f"MPOTemperature.eta_init must be > 0, got {eta_init!r}")
        require(lr > 0, f"MPOTemperature.lr must be > 0, got {lr!r}")
        require(isinstance(learned_steps, int) and learned_steps >= 1,
                f"MPOTemperature.learned_steps must be an int >= 1, got {learned_steps!r}")
        require(isinstance(iters, int) and iters >= 1, f"MPOTemperature.iters must be an int >= 1, got {iters!r}")
        self.epsilon, self.mode, self.eta_init = float(epsilon), mode, float(eta_init)
        self.lr, self.learned_steps, self.iters, self.min_log_eta = lr, learned_steps, iters, min_log_eta
        self.reset(num_seeds)

    def reset(self, num_seeds: int) -> None:
        """One temperature per seed, eta = eta_init, fresh Adam moments."""
        require(isinstance(num_seeds, int) and num_seeds >= 1, f"num_seeds must be an int >= 1, got {num_seeds!r}")
        device = self.log_eta.device if hasattr(self, "log_eta") else None
        self.register_buffer("log_eta", torch.full((num_seeds,), math.log(self.eta_init), dtype=torch.float64,
                                                   device=device))
        self.register_buffer("adam_m", torch.zeros(num_seeds, dtype=torch.float64, device=device))
        self.register_buffer("adam_v", torch.zeros(num_seeds, dtype=torch.float64, device=device))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.float64, device=device))

    @property
    def eta(self) -> torch.Tensor:
        return self.log_eta.exp()

    def _check_seeds(self, q: torch.Tensor) -> None:
        _check(q)
        require(q.shape[0] == self.log_eta.shape[0],
                f"MPOTemperature holds {self.log_eta.shape[0]} seed(s) but q has {q.shape[0]} (call reset(num_seeds))")

    def update(self, q: torch.Tensor) -> torch.Tensor:
        """Update eta from this batch's q (N, B, Nd); returns eta (N,) float64."""
        self._check_seeds(q)
        with torch.no_grad():
            if self.mode == "exact":
                eta = solve_temperature(q, self.epsilon, eta_init=self.eta, iters=self.iters)
                self.log_eta.copy_(eta.log())
                return self.eta
            beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
            for _ in range(self.learned_steps):
                eta = self.eta
                grad = eta * (self.epsilon - weights_kl(estep_weights(q.to(torch.float64), eta)))  # d g / d log eta
                self.adam_step.add_(1.0)
                self.adam_m.lerp_(grad, 1 - beta1)
                self.adam_v.lerp_(grad * grad, 1 - beta2)
                m_hat = self.adam_m / (1 - beta1 ** self.adam_step)
                v_hat = self.adam_v / (1 - beta2 ** self.adam_step)
                self.log_eta.sub_(self.lr * m_hat / (v_hat.sqrt() + adam_eps)).clamp_(min=self.min_log_eta)
            return self.eta

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """Update eta from q (N, B, Nd) and return the E-step weights (N, B, Nd) in q's dtype."""
        return estep_weights(q, self.update(q))


@gin.configurable
class MPOEStep(QWeight):
    """MPO's E-step as QVPO's Q-weight (open question 5; reproduce/open_mpo): every one of the Nd
    candidates of a state is a row of the Q-weighted variational loss, weighted
    Nd * softmax_j(Q(s, a_j) / eta) (mean 1 per state, so the loss keeps QVPO's scale of one unit
    of weight per row), with eta per seed from the dual for the KL bound epsilon (module
    docstring). Use with QVPO.train_selection = 'all':

        QVPO.q_weight = @MPOEStep()
        QVPO.train_selection = 'all'

    The entropy term's Ne uniform rows of a state carry omega_ent times the state's total weight
    (Nd here), as in QVPO where they carry omega_ent * w(s) (qvpo.agents.qvpo.row_weights).
    Logged per update: `mpo/eta` and `mpo/kl` (the sample KL of the weights to uniform, = epsilon
    when the constraint is active). Arguments: those of MPOTemperature (epsilon: MPO's 0.1; the
    rest ours).
    """

    per_candidate = True  # weights (N, B, Nd), not one per state

    def __init__(self, epsilon: float = 0.1, mode: str = "exact", eta_init: float = 1.0, lr: float = 0.01,
                 learned_steps: int = 1, iters: int = 30):
        super().__init__()
        # every argument given: the temperature is a part of this weight, not configured on its own
        self.temperature = MPOTemperature(epsilon=epsilon, mode=mode, num_seeds=1, eta_init=eta_init, lr=lr,
                                          learned_steps=learned_steps, iters=iters, min_log_eta=-18.0)
        self._last_kl: torch.Tensor | None = None

    def reset(self, num_seeds: int) -> None:
        self.temperature.reset(num_seeds)

    @property
    def eta(self) -> torch.Tensor:
        return self.temperature.eta

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        w = self.temperature(q)
        self._last_kl = weights_kl(w.to(torch.float64))
        return q.shape[-1] * w

    def metrics(self) -> dict[str, torch.Tensor]:
        out = {"mpo/eta": self.eta.float()}
        if self._last_kl is not None:
            out["mpo/kl"] = self._last_kl.float()
        return out


# ------------------------------------------------------------------------------------- M-step
def denoiser_distance(policy, old_policy, states: torch.Tensor, actions: torch.Tensor, rng: SeedRNG) -> torch.Tensor:
    """D(theta) per seed (N,): mean over rows, diffusion steps t ~ U{0..T-1} and action dimensions
    of (eps_theta(a_t, s, t) - eps_old(a_t, s, t))^2, a_t = sqrt(ab_t) a + sqrt(1 - ab_t) eps, with
    one (t, eps) per row shared by both networks; gradient into `policy` only.

    Why this is the trust region's distance: for two DDPMs with the same fixed variances, the KL
    between their reverse processes is a sum over t of c_t E||mu_old - mu_theta||^2, and with the
    eps parameterisation mu_old - mu_theta is a per-t constant times eps_theta - eps_old (Ho et al.
    2020, arXiv 2006.11239, Sec. 3.2, Eqs. 8-12, where the same algebra turns the ELBO into the
    denoising loss). D drops the per-t constants, as the denoising loss it is added to drops
    them ("L_simple", Eq. 14), and takes its expectation over the forward process of the policy
    step's chosen candidates (drawn from the current policy before the step and, under 'best',
    picked by Q; under 'all', every candidate) instead of over the old policy's reverse
    trajectories.
    """
    N, R, A = actions.shape
    t = rng.randint(policy.T, R)
    eps = rng.randn(R, A)
    a_t = policy.schedule.noised(actions, t, eps)
    with torch.no_grad():
        old = old_policy.denoiser(a_t, t, states, old_policy.T)
    return (policy.denoiser(a_t, t, states, policy.T) - old).pow(2).mean(dim=-1).mean(dim=-1)


@gin.configurable
class MStepTrustRegion(QVPOHook):
    """MPO's M-step trust region on the diffusion loss (open question 5, the optional part;
    reproduce/open_mpo): the policy step minimises L(theta) + alpha D(theta), D the distance of
    `denoiser_distance` between the policy and its EMA target (the old policy), and the multiplier
    alpha >= 0 per seed follows the constraint D <= epsilon by gradient steps on the dual
    alpha (epsilon - D). This is MPO's M-step Lagrangian (arXiv 1806.06920, Sec. 3.3, the KL
    between the old and new policy bounded by epsilon and the bound enforced by a Lagrange
    multiplier), in the form DeepMind's Acme MPO implements it: penalty stop_grad(alpha) KL, dual
    loss alpha (epsilon - stop_grad(KL)), alpha = softplus(log alpha) + 1e-8 with log alpha kept
    >= -18, the KL taken to the target policy network (google-deepmind/acme@3111b84,
    acme/tf/losses/mpo.py, `compute_parametric_kl_penalty_and_dual_loss`). For a Gaussian policy
    that KL is closed-form; a diffusion policy has none, so D stands in for it (its docstring).

        QVPO.hooks = [@MStepTrustRegion()]      # with the E-step weight or without

    epsilon = 0.01, alpha_init = 1.0 (softplus^-1 of it is the initial log alpha), lr = 0.01 (Adam
    on log alpha): ours, no source gives values for a diffusion policy; `mstep/distance` and
    `mstep/alpha` are logged per update to audit them. The distance's (t, eps) come from a stream of
    the hook's own (qvpo.rng.RESEARCH_STREAM), so attaching it changes the training run only
    through the penalty. State: log alpha, its Adam moments and the stream, per seed.
    """

    def __init__(self, epsilon: float = 0.01, alpha_init: float = 1.0, lr: float = 0.01):
        for name, value in (("epsilon", epsilon), ("alpha_init", alpha_init), ("lr", lr)):
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0, f"MStepTrustRegion.{name} must be a finite number > 0, got {value!r}")
        self.epsilon, self.alpha_init, self.lr = float(epsilon), float(alpha_init), float(lr)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, agent) -> None:
        n = len(agent.seeds)
        a = self.alpha_init
        init = a + math.log(-math.expm1(-a))  # softplus(init) = a (the stable form of log(e^a - 1))
        self.log_alpha = torch.full((n,), init, device=agent.device, requires_grad=True)
        self.opt = torch.optim.Adam([self.log_alpha], lr=self.lr)
        self.rng = SeedRNG(agent.seeds, agent.device, RESEARCH_STREAM)

    def alpha(self) -> torch.Tensor:
        return torch.nn.functional.softplus(self.log_alpha) + 1e-8

    def policy_penalty(self, agent, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        distance = denoiser_distance(agent.policy, agent.policy_target, states, actions, self.rng)  # (N,)
        alpha = self.alpha()
        penalty = alpha.detach() * distance
        # the dual step: alpha grows while D exceeds epsilon, shrinks (towards 0) while it is below
        self.opt.zero_grad(set_to_none=True)
        (alpha * (self.epsilon - distance.detach())).sum().backward()
        self.opt.step()
        with torch.no_grad():
            self.log_alpha.clamp_(min=-18.0)
        self._last = (distance.detach(), alpha.detach())
        return penalty

    def after_update(self, agent, buffers, step: int, metrics: dict) -> None:
        if self._last is not None:
            metrics["mstep/distance"], metrics["mstep/alpha"] = self._last

    def state_dict(self) -> dict:
        return {"log_alpha": self.log_alpha.detach().clone(), "opt": self.opt.state_dict(), "rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.opt.load_state_dict(state["opt"])
        self.rng.load_state_dict(state["rng"])
