"""qvpo.research.gradient_variance: the gradient-variance estimator, the ESS, and the diagnostic on a tiny QVPO."""

import gin
import pytest
import torch

from qvpo.agents.base import AgentContext
from qvpo.agents.qvpo import QVPO
from qvpo.research.gradient_variance import (GradientVariance, build_weightings, effective_sample_size,
                                             scale_free_variance, weighting_gradient_variance)
from qvpo.weights import QExp
from qvpo.identity import RESULTS_VERSION, VERSION_TAG
from helpers import filled_buffers

NAMES = ("qadv", "qcut", "qrelu", "qexp", "qexpadv")
TINY_AGENT = dict(batch_size=8, train_candidates=4, uniform_samples=2, target_candidates=2)


def test_scale_free_variance_matches_a_known_covariance():
    """g = m + L z, Cov = L L^T: the ratio tends to tr(L L^T) / |m|^2 (here 2.5 * P / |m|^2)."""
    gen = torch.Generator().manual_seed(0)
    N, K, P = 3, 20_000, 6
    m = torch.randn(N, P, generator=gen) + 2.0
    scales = torch.tensor([0.5, 1.0, 2.0])  # per seed: the ratio scales with the noise's variance
    L = torch.randn(P, P, generator=gen) * 0.4
    z = torch.randn(N, K, P, generator=gen)
    g = m[:, None] + scales[:, None, None] * (z @ L.T)
    expected = scales.pow(2) * torch.trace(L @ L.T) / m.pow(2).sum(-1)
    got = scale_free_variance(g)
    assert got.shape == (N,)
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0)
    # exactly the unbiased sample covariance's trace (ddof = 1) over the squared mean norm
    small = g[:, :5].double()
    cov_trace = torch.stack([torch.trace(torch.cov(small[n].T)) for n in range(N)])
    torch.testing.assert_close(scale_free_variance(small), cov_trace / small.mean(1).pow(2).sum(-1))
    # scale-free: multiplying every gradient by a constant changes nothing
    torch.testing.assert_close(scale_free_variance(g * 37.0), got, rtol=1e-5, atol=0)
    torch.testing.assert_close(scale_free_variance(g * 1e-3), got, rtol=1e-5, atol=0)


def test_scale_free_variance_is_finite_for_a_zero_mean_gradient():
    g = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert torch.isfinite(scale_free_variance(g)).all() and scale_free_variance(g)[0] > 1e20
    assert scale_free_variance(torch.zeros(1, 3, 2))[0] == 0


def test_effective_sample_size_hand_examples():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0],     # uniform: 1
                      [2.0, 0.0, 0.0, 0.0],     # one state: 1/B
                      [1.0, 1.0, 0.0, 0.0],     # two of four: 1/2
                      [3.0, 1.0, 0.0, 0.0],     # (4)^2 / (4 * 10) = 0.4
                      [0.0, 0.0, 0.0, 0.0]])    # no weight at all: 0
    torch.testing.assert_close(effective_sample_size(w), torch.tensor([1.0, 0.25, 0.5, 0.4, 0.0]))
    torch.testing.assert_close(effective_sample_size(w[:4] * 1e4), torch.tensor([1.0, 0.25, 0.5, 0.4]))


def _trained(seeds, tiny_updates=2):
    agent = QVPO(AgentContext(3, 2, seeds=seeds), **TINY_AGENT)
    buffers = filled_buffers(seeds)
    for step in range(1, tiny_updates + 1):
        agent.update(buffers, step)
    return agent, buffers


def _weightings(agent):
    return build_weightings(NAMES, len(agent.seeds), agent.device)


def test_diagnostic_metrics_and_training_untouched(tiny):
    agent, buffers = _trained((0, 1))
    weightings = _weightings(agent)
    weightings["qexp"](torch.randn(2, 8, 4))  # running statistics set
    qexp_state = {k: v.clone() for k, v in weightings["qexp"].state_dict().items()}
    params = {k: v.clone() for k, v in agent.state_dict()["policy"].items()}
    critic = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    rng_state = [s.clone() for s in agent.rng.state_dict()]
    buf_state = [b.generator.get_state().clone() for b in buffers.buffers]
    grads = [None if p.grad is None else p.grad.clone() for p in agent.policy.parameters()]

    out = weighting_gradient_variance(agent, buffers, weightings, K=4, step=5)
    assert set(out) == {f"gradvar/{n}/{m}" for n in NAMES for m in ("scale_free_var", "loss_var", "ess")}
    for key, v in out.items():
        assert v.shape == (2,) and torch.isfinite(v).all(), key
        assert (v >= 0).all(), key
    for n in NAMES:
        assert (out[f"gradvar/{n}/ess"] <= 1 + 1e-6).all()
    assert (out["gradvar/qcut/ess"] > 0).all()

    for k, v in agent.state_dict()["policy"].items():
        assert torch.equal(v, params[k]), k
    for k, v in agent.critic.state_dict().items():
        assert torch.equal(v, critic[k]), k
    for p, g in zip(agent.policy.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)  # .grad left as training left it
    for a, b in zip(agent.rng.state_dict(), rng_state):
        assert torch.equal(a, b)
    for buf, s in zip(buffers.buffers, buf_state):
        assert torch.equal(buf.generator.get_state(), s)
    for k, v in weightings["qexp"].state_dict().items():
        assert torch.equal(v, qexp_state[k]), k
    # the same step gives the same draws (reproducible); another step, other draws
    again = weighting_gradient_variance(agent, buffers, weightings, K=4, step=5)
    torch.testing.assert_close(again["gradvar/qadv/scale_free_var"], out["gradvar/qadv/scale_free_var"])
    other = weighting_gradient_variance(agent, buffers, weightings, K=4, step=6)
    assert not torch.equal(other["gradvar/qadv/loss_var"], out["gradvar/qadv/loss_var"])


def test_scale_free_variance_ignores_the_scale_of_the_weights(tiny):
    """Multiplying every weight by c leaves the ratio as it is (qcut with a floor above every Q is
    1000 * uniform) and multiplies the loss variance by c^2."""
    agent, buffers = _trained((0,))
    gin.parse_config(["QCut.c = 1000.0"])  # every Q below the floor: w = 1000, a constant like Uniform
    weightings = build_weightings(("uniform", "qcut"), 1, agent.device)
    out = weighting_gradient_variance(agent, buffers, weightings, K=4, step=1)
    torch.testing.assert_close(out["gradvar/qcut/scale_free_var"], out["gradvar/uniform/scale_free_var"],
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(out["gradvar/qcut/loss_var"], 1e6 * out["gradvar/uniform/loss_var"], rtol=1e-4, atol=0)
    torch.testing.assert_close(out["gradvar/qcut/ess"], torch.ones(1))


def test_agent_hook_is_off_by_default_and_logs_every_n_steps(tiny):
    buffers = filled_buffers((0,))
    plain = QVPO(AgentContext(3, 2), **TINY_AGENT)
    assert plain.hooks == []
    assert not any(k.startswith("gradvar/") for k in plain.update(buffers, 10))
    assert plain.state_dict()["hooks"] == []

    diagnostic = GradientVariance(every=5, samples=3)
    agent = QVPO(AgentContext(3, 2), hooks=[diagnostic], q_weight=QExp(), **TINY_AGENT)
    twin = QVPO(AgentContext(3, 2), q_weight=QExp(), **TINY_AGENT)
    buffers, b2 = filled_buffers((0,)), filled_buffers((0,))
    for step in range(1, 11):
        m = agent.update(buffers, step)
        m2 = twin.update(b2, step)
        has = any(k.startswith("gradvar/") for k in m)
        assert has == (step % 5 == 0)
    assert len([k for k in m if k.startswith("gradvar/")]) == 3 * len(NAMES)
    # training is the same with and without the diagnostic
    for p, q in zip(agent.policy.parameters(), twin.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(m["loss/actor"], m2["loss/actor"], rtol=0, atol=0)
    # the diagnostic's qexp followed the training Q values as the training QExp did
    torch.testing.assert_close(diagnostic.weightings["qexp"].mean, agent.q_weight.mean)
    # its state round trip: the contract suite's `qvpo+hooks` case (tests/test_agent_contract.py)


def test_unknown_weighting_is_a_config_error():
    from qvpo.errors import ConfigError

    with pytest.raises(ConfigError, match="qnope"):
        QVPO(AgentContext(3, 2), hooks=[GradientVariance(every=1, weightings=("qadv", "qnope"))])


def test_report_section_recomputes_wilcoxon(tmp_path):
    """gradvar.csv on a fake store: per-run means over logged steps, paired Wilcoxon on logs, Holm."""
    import csv

    import numpy as np
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from scipy import stats as sps

    from qvpo import stats
    from qvpo.report import build_report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("wv", artifact_location=(tmp_path / "art").as_uri())
    rng = np.random.default_rng(0)
    truth = {}  # (env, seed, weighting) -> per-run mean scale-free variance
    for env in ("Hopper-v5", "Ant-v5"):
        for seed in range(4):
            run = client.create_run(exp, tags={"algo": "QVPO", "env_id": env, "seed": str(seed),
                                                   VERSION_TAG: str(RESULTS_VERSION)})
            ms = [Metric("eval/return_mean", 100.0 + seed, 0, 20_000)]
            for name, level in (("qadv", 1.0), ("qcut", 5.0), ("qexp", 2.0)):
                vals = level * np.exp(rng.normal(0, 0.5, 2))
                truth[(env, seed, name)] = vals.mean()
                for step, v in zip((10_000, 20_000), vals):
                    ms += [Metric(f"gradvar/{name}/scale_free_var", float(v), 0, step),
                           Metric(f"gradvar/{name}/loss_var", float(v) * 3, 0, step),
                           Metric(f"gradvar/{name}/ess", 0.5, 0, step)]
            client.log_batch(run.info.run_id, metrics=ms)
            client.set_terminated(run.info.run_id)
    out = build_report("wv", uri, None, tmp_path / "reports", log_to_mlflow=False)
    for name in ("gradvar.csv", "gradvar_runs.csv", "gradvar.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert "## Gradient variance by Q-weighting" in (out / "table.md").read_text()
    rows = {(r["scope"], r["weighting"]): r for r in csv.DictReader(open(out / "gradvar.csv"))}
    assert set(rows) == {(s, w) for s in ("Ant-v5", "Hopper-v5", "all") for w in ("qcut", "qexp")}
    ps = []
    for (scope, w), r in rows.items():  # file order = the order Holm is applied in
        keys = [(e, s) for e in ("Hopper-v5", "Ant-v5") for s in range(4) if scope in ("all", e)]
        d = np.log([truth[(e, s, w)] for e, s in keys]) - np.log([truth[(e, s, "qadv")] for e, s in keys])
        res = sps.wilcoxon(d, alternative="two-sided")
        assert int(r["n"]) == len(keys)
        assert float(r["wilcoxon_w"]) == pytest.approx(res.statistic)
        assert float(r["wilcoxon_p"]) == pytest.approx(res.pvalue)
        assert float(r["median_ratio"]) == pytest.approx(np.exp(np.median(d)))
        ps.append(res.pvalue)
    holm = stats.holm_bonferroni(ps)
    assert [float(r["wilcoxon_p_holm"]) for r in rows.values()] == pytest.approx(list(holm))
    assert float(rows[("all", "qcut")]["frac_weighting_higher"]) == 1.0  # qcut is 5x noisier by construction
    per_run = list(csv.DictReader(open(out / "gradvar_runs.csv")))
    assert len(per_run) == 2 * 4 * 3
    hop0 = next(r for r in per_run if r["env_id"] == "Hopper-v5" and r["seed"] == "0" and r["weighting"] == "qexp")
    assert float(hop0["scale_free_var"]) == pytest.approx(truth[("Hopper-v5", 0, "qexp")])
    # a report of runs without the diagnostic writes none of it
    plain = client.create_experiment("plain", artifact_location=(tmp_path / "art2").as_uri())
    run = client.create_run(plain, tags={"algo": "QVPO", "env_id": "Ant-v5", "seed": "0",
                                          VERSION_TAG: str(RESULTS_VERSION)})
    client.log_batch(run.info.run_id, metrics=[Metric("eval/return_mean", 1.0, 0, 10_000)])
    client.set_terminated(run.info.run_id)
    out2 = build_report("plain", uri, None, tmp_path / "r2", log_to_mlflow=False)
    assert not (out2 / "gradvar.csv").exists() and "Gradient variance" not in (out2 / "table.md").read_text()


def test_metric_accumulator_averages_a_periodic_metric_over_the_updates_that_logged_it():
    from qvpo.train import MetricAccumulator

    acc = MetricAccumulator()
    for step in range(1, 11):
        m = {"loss/actor": torch.tensor([float(step), 2.0 * step]), "entropy/weight": 0.5}
        if step % 5 == 0:
            m["gradvar/qadv/ess"] = torch.tensor([step / 10, 1.0])
        acc.add(m)
    assert acc.count == 10
    out = acc.pop(2)
    assert out[0]["loss/actor"] == pytest.approx(5.5) and out[1]["loss/actor"] == pytest.approx(11.0)
    assert out[0]["entropy/weight"] == pytest.approx(0.5)
    assert out[0]["gradvar/qadv/ess"] == pytest.approx(0.75) and out[1]["gradvar/qadv/ess"] == pytest.approx(1.0)
    assert acc.count == 0 and acc.pop(2) == [{}, {}]
