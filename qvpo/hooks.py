"""The hook interface through which research add-ons attach to QVPO (`QVPO.hooks`).

QVPO's update is the paper's six steps and nothing else; an add-on that reads what an update
computed, or steers a setting between updates, is a `QVPOHook`. The agent calls, in order:

  attach(agent)                        once, when the agent is built: check the run can host the
                                       hook (e.g. one seed per process), set initial values, size
                                       per-seed state (len(agent.seeds)) and move it to agent.device;
  on_candidates(agent, scored)         every update, after steps 2-3: the Nd candidates of the
                                       policy step scored by the critic, and their Q-weights;
  policy_penalty(agent, states, actions)
                                       every update, in step 5: the policy's rows of chosen
                                       candidates; returns a (N,) term added to the policy loss
                                       before its gradient is taken (or None: nothing added);
  after_update(agent, buffers, step, metrics)
                                       every update, after step 6 and after the update's metrics
                                       are built: may add metrics (each (N,), one value per seed)
                                       and may change agent settings for the next update;
  on_episode(agent, seed_index, metrics)
                                       at each finished training episode of one seed, with the
                                       trainer's episode metrics (train/episode_return,
                                       q/overestimation, q/mc_return, ...).

Hooks run in the order given; an `entropy_weight` schedule that is also a hook (the adaptive
omega_ent) runs first. A hook's `state_dict` / `load_state_dict` are saved in the agent's
checkpoint with the hook's class name, so a resumed run continues exactly (and a checkpoint of
other hooks is refused in one line). Hooks must not draw from the agent's random
streams (they would change the training run): one that needs randomness uses its own stream.

Implementations: qvpo.research.adaptive_k (SpreadKb, BiasKt), qvpo.research.adaptive_entropy
(AdaptiveEntropyWeight), qvpo.research.gradient_variance (GradientVariance), qvpo.research.mpo
(MStepTrustRegion, the one that adds a policy penalty).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scored:
    """The policy step's candidates: states (N, B, S), candidates (N, B, Nd, A), their
    min(Q1, Q2) q (N, B, Nd), the chosen candidate of each state (N, B, A) and its weight
    w (N, B); with QVPO.train_selection = 'all' every candidate is chosen: chosen (N, B, Nd, A),
    w (N, B, Nd). Read-only: a hook that changes them would change training."""

    states: torch.Tensor
    candidates: torch.Tensor
    q: torch.Tensor
    chosen: torch.Tensor
    w: torch.Tensor


class QVPOHook:
    """Base class of QVPO's research hooks: every method is optional (a no-op here)."""

    def attach(self, agent) -> None:
        """Called once by QVPO.__init__, after the networks are built."""

    def on_candidates(self, agent, scored: Scored) -> None:
        """Called every update with the policy step's scored candidates."""

    def policy_penalty(self, agent, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor | None:
        """Called in every policy step with the rows of the chosen candidates, states (N, R, S)
        and actions (N, R, A) (the entropy term's uniform rows left out); a (N,) tensor is added
        to the policy loss (one term per seed) before the backward pass."""
        return None

    def after_update(self, agent, buffers, step: int, metrics: dict) -> None:
        """Called at the end of every update; may add entries to `metrics`."""

    def on_episode(self, agent, seed_index: int, metrics: dict[str, float]) -> None:
        """Called at each finished training episode of seed `seed_index`."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
