"""Gradient-variance diagnostic of the Q-weightings (open question 3 of the project's list,
docs/paper-notes.md#open-questions: advantage versus raw Q as the weight;
reproduce/open_weight_variance). Attached as a hook (qvpo.hooks):
`QVPO.hooks = [@GradientVariance()]`, `GradientVariance.every = 10000`.

At the agent's current parameters, K independent minibatch + candidate draws, shared by every
weighting (paired), each give one policy gradient per weighting of the loss QVPO optimises (the
weighted denoising loss over the best candidates and the Ne uniform entropy rows). Per seed and
weighting we log

  gradvar/<name>/scale_free_var  tr Cov[g] / |E g|^2 over the K draws (unbiased covariance): the
                                 gradient's noise relative to its signal, unchanged when the
                                 weights are multiplied by a constant, so raw Q (large) and the
                                 advantage (small) are compared on the same footing;
  gradvar/<name>/loss_var        the variance of the loss over the K draws (in the weight's units);
  gradvar/<name>/ess             the effective sample size of the weights of the B states,
                                 (sum w)^2 / (B sum w^2), 1 = uniform, mean over the K draws.

Training is left exactly as it was: no optimiser step, no .grad written, replay and noise drawn
from a stream of their own (qvpo.rng.DIAGNOSTIC_STREAM), and stateful weightings (QExp's running
mean/std) copied before use. Seeds never mix: every quantity is per seed, (N,).
"""

from __future__ import annotations

import copy

import gin
import torch

from qvpo.agents.qvpo import row_weights
from qvpo.buffers import SeedBuffers
from qvpo.errors import require, require_int
from qvpo.hooks import QVPOHook
from qvpo.rng import DIAGNOSTIC_STREAM, SeedRNG
from qvpo.weights import QAdv, QCut, QExp, QExpAdv, QReLU, QWeight, Uniform

# gin names of the weightings (GradientVariance.weightings) -> the transform; each is built
# with its gin-bound arguments (QCut.c, QExp.beta, ...)
WEIGHTINGS = {"qadv": QAdv, "qcut": QCut, "qrelu": QReLU, "qexp": QExp, "qexpadv": QExpAdv,
              "uniform": Uniform}
PREFIX = "gradvar"
_MAX_RATIO = 1e30  # a mean gradient of norm 0 (all weights 0) would give inf, which stops training


def build_weightings(names, num_seeds: int, device) -> dict[str, QWeight]:
    """Weightings by name (WEIGHTINGS), reset for `num_seeds` seeds, on `device`."""
    unknown = [n for n in names if n not in WEIGHTINGS]
    require(not unknown, f"unknown weighting(s) {unknown} in GradientVariance.weightings; "
                         f"known: {sorted(WEIGHTINGS)}")
    out = {}
    for name in names:
        w = WEIGHTINGS[name]()
        w.reset(num_seeds)
        out[name] = w.to(device)
    return out


def scale_free_variance(grads: torch.Tensor) -> torch.Tensor:
    """grads (N, K, P): K gradient samples per seed -> (N,) tr(sample covariance, ddof=1) / |mean|^2.

    Computed in float64; a zero mean gradient gives a large finite value (capped at 1e30).
    """
    require(grads.dim() == 3 and grads.shape[1] >= 2, f"scale_free_variance needs (N, K >= 2, P), got {tuple(grads.shape)}")
    g = grads.double()
    mean = g.mean(dim=1)
    trace = (g - mean[:, None]).pow(2).sum(dim=(1, 2)) / (g.shape[1] - 1)
    ratio = trace / mean.pow(2).sum(dim=-1).clamp(min=1e-300)
    return ratio.clamp(max=_MAX_RATIO).to(grads.dtype)


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """w (N, B) non-negative weights -> (N,) (sum w)^2 / (B sum w^2): 1 for equal weights, 1/B when
    one state carries all the weight, 0 when every weight is 0."""
    s1, s2 = w.sum(dim=-1), w.pow(2).sum(dim=-1)
    return torch.where(s2 > 0, s1.pow(2) / (w.shape[-1] * s2.clamp(min=1e-300)), torch.zeros_like(s1))


def weighting_gradient_variance(agent, buffers: SeedBuffers, weightings: dict[str, QWeight], K: int,
                                step: int = 0) -> dict[str, torch.Tensor]:
    """The diagnostic at `agent`'s current parameters (a QVPO): {f'gradvar/{name}/{metric}': (N,)}.

    K draws of (minibatch of agent.batch_size states, Nd candidates scored by the critic, the
    entropy rows' uniform actions, the diffusion times and noise), the same draws for every
    weighting. omega_ent is the agent's entropy_weight at `step`; the draws are seeded by the
    seed and `step`, so two diagnostics at different steps are independent.
    """
    require_int(K, "GradientVariance.samples (K)", 2)
    policy, N, B, A = agent.policy, len(agent.seeds), agent.batch_size, agent.action_dim
    Ne = agent.Ne
    stream = DIAGNOSTIC_STREAM + 10_007 * int(step)
    rng = SeedRNG(agent.seeds, agent.device, stream)
    gens = [torch.Generator(device=b.device).manual_seed(stream + 5_003 + s)
            for b, s in zip(buffers.buffers, agent.seeds)]
    params = [p for p in policy.parameters() if p.requires_grad]
    for p in params:
        require(p.shape[0] == N, "policy parameters must carry the seed dimension first")
    omega = agent.entropy_weight(step, agent.total_steps)

    grads = {name: [] for name in weightings}
    losses = {name: [] for name in weightings}
    ess = {name: [] for name in weightings}
    for _ in range(K):
        with torch.no_grad():
            states = buffers.sample(B, gens).obs.to(agent.device)
            best, q, _ = agent.select_candidates(states, rng)  # the training loss's rows, as update() builds them
            loss_states, loss_actions = agent.policy_rows(states, best, rng)
            R = loss_actions.shape[1]
            t, eps = rng.randint(policy.T, R), rng.randn(R, A)
        for name, transform in weightings.items():
            with torch.no_grad():
                w = copy.deepcopy(transform)(q)  # a copy per draw: running statistics untouched
                weights = row_weights(w, omega, Ne)
            loss = policy.loss(loss_states, loss_actions, weights, t=t, eps=eps)  # (N,)
            g = torch.autograd.grad(loss.sum(), params)  # seeds' parameters are disjoint slices
            grads[name].append(torch.cat([gi.reshape(N, -1) for gi in g], dim=1))
            losses[name].append(loss.detach())
            ess[name].append(effective_sample_size(w))

    out = {}
    for name in weightings:
        out[f"{PREFIX}/{name}/scale_free_var"] = scale_free_variance(torch.stack(grads[name], dim=1))
        out[f"{PREFIX}/{name}/loss_var"] = torch.stack(losses[name], dim=1).var(dim=1)
        out[f"{PREFIX}/{name}/ess"] = torch.stack(ess[name], dim=1).mean(dim=1)
    return out


@gin.configurable
class GradientVariance(QVPOHook):
    """The diagnostic as a QVPO hook: every `every` env steps (at updates with step % every == 0)
    it runs at the parameters the update left and adds its `gradvar/<weighting>/*` metrics to
    the update's. Training is unchanged (module docstring).

    Args:
      every: env steps between diagnostics.
      samples: K, independent minibatch + candidate draws per diagnostic.
      weightings: names of the weightings it compares (WEIGHTINGS); stateful ones (qexp's running
        mean/std of Q) follow the training Q values of every update, so they normalise as they
        would in training.
    """

    def __init__(self, every: int = 10_000, samples: int = 8,
                 weightings: tuple[str, ...] = ("qadv", "qcut", "qrelu", "qexp", "qexpadv")):
        require_int(every, "GradientVariance.every (env steps)", 1)
        require_int(samples, "GradientVariance.samples (K)", 2)
        self.every, self.samples, self.names = every, samples, tuple(weightings)
        self.weightings: dict[str, QWeight] = {}
        self._stateful: list[QWeight] = []

    def attach(self, agent) -> None:
        require(agent.train_selection != "all", "GradientVariance compares weightings of each state's chosen "
                "candidate; it cannot run with QVPO.train_selection = 'all' (every candidate weighted)")
        self.weightings = build_weightings(self.names, len(agent.seeds), agent.device)
        # the ones with running statistics, which follow training's Q values every update
        self._stateful = [t for t in self.weightings.values() if next(t.buffers(), None) is not None]

    @torch.no_grad()
    def on_candidates(self, agent, scored) -> None:
        for transform in self._stateful:
            transform(scored.q)

    def after_update(self, agent, buffers, step: int, metrics: dict) -> None:
        if step % self.every == 0:
            with agent.timer.phase("diagnostic"):  # at the parameters this update left
                metrics.update(weighting_gradient_variance(agent, buffers, self.weightings, self.samples, step))

    def state_dict(self) -> dict:
        return {k: w.state_dict() for k, w in self.weightings.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, w in self.weightings.items():
            w.load_state_dict(state[k])
