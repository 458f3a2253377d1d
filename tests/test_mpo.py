"""MPO E-step weights (qvpo.research.mpo): the sample dual, its minimiser, the KL at the optimum,
the limits, per-seed independence, the persistent temperature."""

import math

import gin
import pytest
import torch
from scipy.optimize import brentq

from qvpo.errors import ConfigError
from qvpo.research.mpo import MPOTemperature, estep_weights, mpo_dual, solve_temperature, weights_kl


def hand_dual(eta: float, eps: float) -> float:
    """One state, Nd = 2 candidates with Q = 0 and 1: g(eta) = eta eps + eta log((1 + e^(1/eta)) / 2)."""
    return eta * eps + eta * math.log((1 + math.exp(1 / eta)) / 2)


def hand_dual_slope(eta: float, eps: float) -> float:
    """g'(eta) by hand: eps + log((1 + e^(1/eta)) / 2) - (1/eta) sigmoid(1/eta)."""
    return eps + math.log((1 + math.exp(1 / eta)) / 2) - (1 / eta) / (1 + math.exp(-1 / eta))


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.5])
def test_dual_and_its_minimiser_on_a_hand_computed_case(eps):
    q = torch.tensor([[[0.0, 1.0]]])
    for eta in (0.05, 0.3, 1.0, 7.0):
        assert mpo_dual(q, math.log(eta), eps).item() == pytest.approx(hand_dual(eta, eps), rel=1e-12)
    # independent solution: root of the hand-written derivative (g convex, so the root is the minimum)
    eta_ref = brentq(lambda e: hand_dual_slope(e, eps), 1e-2, 1e3, xtol=1e-15, rtol=1e-14)
    eta = solve_temperature(q, eps).item()
    assert eta == pytest.approx(eta_ref, rel=1e-9)
    assert hand_dual(eta, eps) <= min(hand_dual(eta * 1.001, eps), hand_dual(eta / 1.001, eps))
    # the weights are the softmax of Q / eta*
    w = estep_weights(q, eta)[0, 0]
    assert w[1].item() == pytest.approx(1 / (1 + math.exp(-1 / eta_ref)), rel=1e-6)


@pytest.mark.parametrize("eps", [1e-3, 0.1, 1.0, 2.0])
def test_kl_to_the_sampling_distribution_equals_epsilon_at_the_solution(eps):
    torch.manual_seed(0)
    scales = torch.tensor([1e-3, 1.0, 300.0], dtype=torch.float64)  # one Q scale per seed
    q = torch.randn(3, 16, 8, dtype=torch.float64) ** 3 * scales[:, None, None] + torch.randn(3, 16, 1) * 50
    eta = solve_temperature(q, eps, eta_init=123.0)  # a poor start on purpose
    w = estep_weights(q, eta)
    assert torch.allclose(w.sum(dim=-1), torch.ones(3, 16, dtype=torch.float64), atol=1e-12)
    # KL(w || uniform) averaged over states is the bound (active: eps < log 8 and Q not constant)
    assert torch.allclose(weights_kl(w), torch.full((3,), eps, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    # and eta* is a stationary point of the dual: dg/deta = eps - KL = 0 (autograd through mpo_dual)
    log_eta = eta.log().requires_grad_(True)
    mpo_dual(q, log_eta, eps).sum().backward()
    assert log_eta.grad.abs().max().item() < 1e-8 * max(1.0, eta.max().item())


def test_weights_do_not_depend_on_the_q_scale_or_a_per_state_shift():
    torch.manual_seed(1)
    q = torch.randn(2, 10, 6, dtype=torch.float64)
    eta = solve_temperature(q, 0.3)
    q2 = 40.0 * q + torch.randn(2, 10, 1, dtype=torch.float64) * 1e3
    eta2 = solve_temperature(q2, 0.3)
    assert torch.allclose(eta2, 40.0 * eta, rtol=1e-9)
    assert torch.allclose(estep_weights(q2, eta2), estep_weights(q, eta), atol=1e-9)


def test_limits_large_and_small_epsilon():
    torch.manual_seed(2)
    Nd = 8
    q = torch.randn(1, 5, Nd, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(q.argmax(dim=-1), Nd).to(torch.float64)
    # eps >= log Nd: the bound can't bind (KL to uniform is at most log Nd): eta -> 0, weights one-hot
    # (at eps = log Nd exactly, every eta sharp enough meets it to rounding; above, the sharpest eta)
    spread = (q.max(dim=-1).values - q.min(dim=-1).values).max().item()
    for eps in (math.log(Nd), 5.0):
        eta = solve_temperature(q, eps)
        assert eta.item() < 1e-3 * spread
        assert torch.allclose(estep_weights(q, eta), onehot, atol=1e-12)
    assert solve_temperature(q, 5.0).item() == pytest.approx(spread / 1e7, rel=1e-12)
    # just below log Nd the bound binds at a very sharp E-step
    eta = solve_temperature(q, 0.999 * math.log(Nd))
    w = estep_weights(q, eta)
    assert weights_kl(w).item() == pytest.approx(0.999 * math.log(Nd), rel=1e-9)
    assert (w * onehot).sum(dim=-1).min().item() > 0.99
    # tiny eps: nearly uniform weights and a large temperature
    eta = solve_temperature(q, 1e-6)
    assert eta.item() > 100 * (q.max() - q.min()).item()
    assert torch.allclose(estep_weights(q, eta), torch.full_like(q, 1 / Nd), atol=2e-3)


def test_constant_q_gives_uniform_weights_without_blowing_up():
    q = torch.full((2, 4, 5), 3.7)
    q[1] = torch.randn(4, 5)  # the second seed is ordinary
    q[1, 0] = -2.0            # with one constant state
    eta = solve_temperature(q, 0.1, eta_init=0.5)
    assert torch.isfinite(eta).all() and (eta > 0).all()
    assert eta[0].item() == 0.5  # no minimiser for a constant seed: the warm start is kept
    w = estep_weights(q, eta)
    assert torch.isfinite(w).all()
    assert torch.equal(w[0], torch.full((4, 5), 0.2))
    assert torch.allclose(w[1, 0], torch.full((5,), 0.2))
    for eta_any in (1e-306, 1e-8, 1e8):
        assert torch.equal(estep_weights(q[:1], eta_any), torch.full((1, 4, 5), 0.2))
        assert torch.equal(estep_weights(q[:1] * 1e4, eta_any), torch.full((1, 4, 5), 0.2))  # Q / eta = inf
    assert torch.isfinite(mpo_dual(q, math.log(1e-12), 0.1)).all()
    assert torch.isfinite(mpo_dual(q, math.log(1e12), 0.1)).all()


def test_seeds_never_mix():
    torch.manual_seed(3)
    q = torch.randn(4, 12, 6) * torch.tensor([0.1, 1.0, 10.0, 100.0])[:, None, None]
    eps = 0.2
    eta = solve_temperature(q, eps)
    w = estep_weights(q, eta)
    for n in range(4):
        eta_n = solve_temperature(q[n:n + 1], eps)
        assert torch.allclose(eta[n:n + 1], eta_n, rtol=1e-12)
        assert torch.allclose(w[n:n + 1], estep_weights(q[n:n + 1], eta_n), atol=1e-7)
    # changing one seed's Q changes nothing for the others
    q2 = q.clone()
    q2[2] = q2[2] * 1e3 + 5
    eta2 = solve_temperature(q2, eps)
    assert torch.equal(eta2[[0, 1, 3]], eta[[0, 1, 3]])
    assert torch.equal(mpo_dual(q2, eta2.log(), eps)[[0, 1, 3]], mpo_dual(q, eta.log(), eps)[[0, 1, 3]])


def test_bad_input_is_one_line_config_error():
    q = torch.randn(2, 3, 4)
    with pytest.raises(ConfigError, match="epsilon"):
        solve_temperature(q, 0.0)
    with pytest.raises(ConfigError, match="epsilon"):
        mpo_dual(q, 0.0, -0.1)
    with pytest.raises(ConfigError, match=r"\(N seeds, B states, Nd candidates\)"):
        solve_temperature(torch.randn(3, 4), 0.1)
    with pytest.raises(ConfigError, match="Nd >= 2"):
        solve_temperature(torch.randn(2, 3, 1), 0.1)
    with pytest.raises(ConfigError, match="Nd >= 2"):
        estep_weights(torch.randn(2, 3, 1), 1.0)
    with pytest.raises(ConfigError, match="one value per seed"):
        estep_weights(q, torch.ones(3))
    with pytest.raises(ConfigError, match="epsilon"):
        MPOTemperature(epsilon=0)
    with pytest.raises(ConfigError, match="mode"):
        MPOTemperature(mode="adam")
    with pytest.raises(ConfigError, match="holds 1 seed"):
        MPOTemperature()(q)


def test_persistent_temperature_exact_mode_matches_the_solver_and_is_gin_configurable():
    import qvpo.research.mpo  # noqa: F401 - registers MPOTemperature with gin
    gin.parse_config(["MPOTemperature.epsilon = 0.25", "MPOTemperature.num_seeds = 2"])
    temp = MPOTemperature()
    assert temp.epsilon == 0.25 and temp.mode == "exact"
    gin.clear_config()
    assert MPOTemperature().epsilon == 0.1  # the default: MPO's E-step bound
    q = torch.randn(2, 8, 16)
    w = temp(q)
    assert w.shape == q.shape and w.dtype == q.dtype
    assert torch.allclose(temp.eta, solve_temperature(q, 0.25), rtol=1e-9)
    assert torch.allclose(weights_kl(w), torch.full((2,), 0.25, dtype=torch.float64), atol=1e-6)


def test_persistent_learned_temperature_round_trips_and_approaches_the_exact_one():
    torch.manual_seed(4)
    q = torch.randn(2, 32, 16, dtype=torch.float64) * torch.tensor([1.0, 20.0], dtype=torch.float64)[:, None, None]
    temp = MPOTemperature(mode="learned", num_seeds=2, lr=0.05, learned_steps=5)
    for _ in range(3):
        temp(q)
    other = MPOTemperature(mode="learned", num_seeds=2, lr=0.05, learned_steps=5)
    other.load_state_dict(temp.state_dict())
    assert torch.equal(other.eta, temp.eta) and torch.equal(other.adam_v, temp.adam_v)
    assert torch.equal(other(q), temp(q))  # same state, same next step
    assert torch.equal(other.eta, temp.eta)
    for _ in range(200):
        temp(q)
    exact = solve_temperature(q, 0.1)
    assert torch.allclose(temp.eta.log(), exact.log(), atol=0.1)
    # a fresh temperature starts from eta_init, so the round trip above was not trivially equal
    assert not torch.allclose(MPOTemperature(mode="learned", num_seeds=2).eta, other.eta)


def test_qvpo_with_the_estep_weights_every_candidate_and_keeps_the_entropy_share(tiny):
    """train_selection = 'all' + MPOEStep: the loss rows are the Nd candidates of every state with
    weights Nd * softmax(Q / eta) (mean 1 per state, KL to uniform = epsilon), then the Ne uniform
    rows of each state with omega_ent * Nd (the state's total weight), as QVPO gives them
    omega_ent * w(s)."""
    from qvpo.agents.base import AgentContext
    from qvpo.agents.qvpo import QVPO
    from qvpo.research.mpo import MPOEStep
    from qvpo.schedules import Constant
    from helpers import filled_buffers

    B, Nd, Ne, eps = 8, 4, 2, 0.2
    agent = QVPO(AgentContext(3, 2, seeds=(0, 1)), batch_size=B, train_candidates=Nd, uniform_samples=Ne,
                 target_candidates=2, q_weight=MPOEStep(epsilon=eps), train_selection="all",
                 entropy_weight=Constant(0.05))
    seen = {}
    real_loss = agent.policy.loss

    def spy(states, actions, weights, rng=None, **kw):
        seen.update(states=states, actions=actions, weights=weights)
        return real_loss(states, actions, weights, rng, **kw)

    agent.policy.loss = spy
    m = agent.update(filled_buffers((0, 1)), step=1)
    w = seen["weights"]
    assert w.shape == (2, B * Nd + B * Ne) and seen["actions"].shape == (2, B * Nd + B * Ne, 2)
    cand = w[:, :B * Nd].view(2, B, Nd)
    torch.testing.assert_close(cand.sum(-1), torch.full((2, B), float(Nd)))  # Nd * softmax: mean 1 per state
    p = cand / Nd
    kl = (p * (Nd * p).clamp_min(1e-30).log()).sum(-1).mean(-1)
    torch.testing.assert_close(kl, torch.full((2,), eps), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m["mpo/kl"], torch.full((2,), eps), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w[:, B * Nd:], torch.full((2, B * Ne), 0.05 * Nd))
    # each state's Nd candidate rows sit next to each other, with that state's observation
    rows = seen["states"][:, :B * Nd].view(2, B, Nd, 3)
    torch.testing.assert_close(rows, rows[:, :, :1].expand_as(rows))


# ------------------------------------------------------------------------------------- M-step
def _mstep_agent(seeds=(0, 1), **hook):
    from qvpo.agents.base import AgentContext
    from qvpo.agents.qvpo import QVPO
    from qvpo.research.mpo import MStepTrustRegion

    hooks = [MStepTrustRegion(**hook)] if hook else []
    return QVPO(AgentContext(3, 2, seeds=seeds), batch_size=8, train_candidates=4, uniform_samples=2,
                target_candidates=2, hooks=hooks)


def test_denoiser_distance_is_zero_for_the_same_network_and_its_step_pulls_towards_the_old(tiny):
    """D = mean (eps_theta - eps_old)^2 on the forward-noised rows: 0 (and no gradient) when the
    policy is its target, positive after the policy moved; a gradient step on D moves it back."""
    from qvpo.research.mpo import denoiser_distance
    from qvpo.rng import SeedRNG

    agent = _mstep_agent()
    states, actions = torch.randn(2, 6, 3), torch.rand(2, 6, 2) * 2 - 1
    rng = lambda: SeedRNG([0, 1], "cpu", 99)  # noqa: E731 - the same (t, eps) each call
    d = denoiser_distance(agent.policy, agent.policy_target, states, actions, rng())
    assert d.shape == (2,) and torch.equal(d, torch.zeros(2))
    with torch.no_grad():
        for p in agent.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = denoiser_distance(agent.policy, agent.policy_target, states, actions, rng())
    assert (d > 0).all()
    d.sum().backward()
    with torch.no_grad():
        for p in agent.policy.parameters():
            p.sub_(0.5 * p.grad)
        assert (denoiser_distance(agent.policy, agent.policy_target, states, actions, rng()) < d).all()
        # by hand for seed 1: the same (t, eps), the noised action, both networks' predictions
        r = rng()
        t, eps = r.randint(agent.policy.T, 6), r.randn(6, 2)
        sch = agent.policy.schedule
        a_t = sch.sqrt_alpha_bar[t, None] * actions + sch.sqrt_one_minus_alpha_bar[t, None] * eps
        new, old = (net.denoiser(a_t, t, states, net.T) for net in (agent.policy, agent.policy_target))
        torch.testing.assert_close(denoiser_distance(agent.policy, agent.policy_target, states, actions, rng()),
                                   (new - old).pow(2).mean(dim=(1, 2)))


def test_the_trust_region_multiplier_follows_the_constraint_per_seed(tiny):
    """alpha grows for a seed whose distance exceeds epsilon and shrinks for one below it; the
    penalty added to the policy loss is alpha (before the step) times the distance."""
    from qvpo.research.mpo import MStepTrustRegion

    agent = _mstep_agent(epsilon=0.01, alpha_init=1.0, lr=0.1)
    hook = agent.hooks[0]
    assert isinstance(hook, MStepTrustRegion)
    torch.testing.assert_close(hook.alpha().detach(), torch.ones(2))
    with torch.no_grad():  # seed 0's policy moves far from its target, seed 1's not at all
        for p in agent.policy.parameters():
            p[0].add_(0.5 * torch.randn_like(p[0]))
    penalty = hook.policy_penalty(agent, torch.randn(2, 6, 3), torch.rand(2, 6, 2) * 2 - 1)
    distance, alpha_before = hook._last
    assert distance[0] > 0.01 and distance[1] == 0
    torch.testing.assert_close(penalty, alpha_before * distance)
    alpha = hook.alpha().detach()
    assert alpha[0] > 1.0 > alpha[1]


def test_the_trust_region_keeps_the_policy_near_its_target_and_is_logged(tiny):
    """Over 30 updates of one seed, a tight trust region (epsilon 1e-6, alpha starting at 100)
    leaves the policy closer to its EMA target than the same run without it; its distance and
    multiplier are logged."""
    from helpers import filled_buffers

    from qvpo.research.mpo import denoiser_distance
    from qvpo.rng import SeedRNG

    free, held = _mstep_agent(seeds=(0,)), _mstep_agent(seeds=(0,), epsilon=1e-6, alpha_init=100.0)
    buffers_free, buffers_held = filled_buffers((0,)), filled_buffers((0,))
    for step in range(1, 31):
        m_free, m_held = free.update(buffers_free, step), held.update(buffers_held, step)
    assert "mstep/distance" not in m_free and m_held["mstep/alpha"].shape == (1,)
    states, actions = torch.randn(1, 32, 3), torch.rand(1, 32, 2) * 2 - 1
    gap = [denoiser_distance(a.policy, a.policy_target, states, actions, SeedRNG([0], "cpu", 5)).item()
           for a in (free, held)]
    assert gap[1] < 0.5 * gap[0]


@pytest.mark.parametrize("selection, Ne", [("best", 2), ("all", 2), ("all", 0)])
def test_policy_penalty_gets_the_chosen_rows_only_and_none_changes_nothing(tiny, selection, Ne):
    """policy_penalty sees exactly the chosen candidates' rows of the policy loss (B rows under
    'best', B * Nd under 'all'; never the Ne uniform rows), with their states; a hook returning
    None leaves the update's numbers and the agent's random stream as they are without it."""
    from helpers import filled_buffers

    from qvpo.agents.base import AgentContext
    from qvpo.agents.qvpo import QVPO
    from qvpo.hooks import QVPOHook
    from qvpo.research.mpo import MPOEStep

    B, Nd = 8, 4
    seen = {}

    class Spy(QVPOHook):
        def policy_penalty(self, agent, states, actions):
            seen.update(states=states, actions=actions)

    def build(hooks):
        extra = dict(q_weight=MPOEStep(), train_selection="all") if selection == "all" else {}
        return QVPO(AgentContext(3, 2, seeds=(0, 1)), batch_size=B, train_candidates=Nd, uniform_samples=Ne,
                    target_candidates=2, hooks=hooks, **extra)

    spied, plain = build([Spy()]), build([])
    rows = {}
    real_rows = spied.policy_rows
    spied.policy_rows = lambda *a: rows.setdefault("all", real_rows(*a))
    m_spied, m_plain = spied.update(filled_buffers((0, 1)), 1), plain.update(filled_buffers((0, 1)), 1)
    R = B * (Nd if selection == "all" else 1)
    assert seen["actions"].shape == (2, R, 2) and seen["states"].shape == (2, R, 3)
    all_states, all_actions = rows["all"]
    assert all_actions.shape[1] == R + B * Ne
    assert torch.equal(seen["actions"], all_actions[:, :R]) and torch.equal(seen["states"], all_states[:, :R])
    assert m_spied["loss/actor"].tolist() == m_plain["loss/actor"].tolist()
    assert all(torch.equal(a, b) for a, b in zip(spied.policy.parameters(), plain.policy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(spied.rng.state_dict(), plain.rng.state_dict()))


def test_the_trust_region_draws_from_its_own_stream(tiny):
    """With the M-step hook the agent's own random stream advances exactly as without it (the
    distance's (t, eps) come from the hook's stream)."""
    from helpers import filled_buffers

    with_hook, without = _mstep_agent(epsilon=0.01), _mstep_agent()
    buffers_with, buffers_without = filled_buffers((0, 1)), filled_buffers((0, 1))
    for step in (1, 2, 3):  # at the first the policy is its target (D = 0): the penalty acts from the second
        with_hook.update(buffers_with, step)
        without.update(buffers_without, step)
    assert all(torch.equal(a, b) for a, b in zip(with_hook.rng.state_dict(), without.rng.state_dict()))
    assert not all(torch.equal(a, b) for a, b in zip(with_hook.policy.parameters(), without.policy.parameters()))


def test_trust_region_bad_settings_are_one_line(tiny):
    from qvpo.research.mpo import MStepTrustRegion

    for kw, name in (({"epsilon": 0}, "epsilon"), ({"alpha_init": -1.0}, "alpha_init"), ({"lr": float("nan")}, "lr")):
        with pytest.raises(ConfigError, match=f"MStepTrustRegion.{name} must be a finite number > 0"):
            MStepTrustRegion(**kw)
    agent = _mstep_agent(alpha_init=1e6)  # a large multiplier is a setting, not an overflow
    torch.testing.assert_close(agent.hooks[0].alpha().detach(), torch.full((2,), 1e6))
