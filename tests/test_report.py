"""qvpo.report on a fake MLflow store: its numbers recomputed by hand from the logged histories."""

import csv
import zlib

import numpy as np
import pytest
from scipy import stats as sps

from qvpo.errors import ConfigError
from qvpo.identity import RESULTS_VERSION, VERSION_TAG
from qvpo.report import CELL_IDENTITY_TAG, build_report

EVAL_STEPS = list(range(50_000, 300_001, 50_000))
PAPER = """# test paper table
env,algo,mean,std
Hopper,SAC,3000.0,100.0
Hopper,QVPO,3728.5,13.8
Walker2d,SAC,4888.1,80.0
Walker2d,QVPO,5191.8,60.2
"""
# (algo, env, seeds, final level, how long it runs): SAC has one seed on Walker2d (n < 2), one
# QVPO Walker2d seed stops at 250k (no value at 300k)
PLAN = [("QVPO", "Hopper-v5", [0, 1, 2], 3600, 300_000), ("SAC", "Hopper-v5", [0, 1, 2], 3000, 300_000),
        ("QVPO", "Walker2d-v5", [0, 1], 5000, 300_000), ("QVPO", "Walker2d-v5", [2], 5000, 250_000),
        ("SAC", "Walker2d-v5", [0], 4500, 300_000),
        ("Random", "Hopper-v5", [0, 1], 20, 300_000), ("Random", "Walker2d-v5", [0, 1], 5, 300_000)]


def current(label, env, **tags):
    """Tags of a run of the current results version, one configuration per (algo, env)."""
    return {VERSION_TAG: str(RESULTS_VERSION), CELL_IDENTITY_TAG: f"{label}-{env}", **tags}


def fake_history(level, seed, algo, end):
    """Eval curve rising to `level` with a seed offset and a dip; training episodes around it."""
    rng = np.random.default_rng([zlib.crc32(algo.encode()), level, seed])
    steps = [s for s in EVAL_STEPS if s <= end]
    if algo == "Random":
        evals = list(level + rng.normal(0, 3, len(steps)))
    else:
        evals = [level * (s / 300_000) ** 0.5 + 40 * seed + rng.normal(0, 30) for s in steps]
        evals[-1] -= 400  # a fall at the end: the best evaluation is not the last one
    train_steps = list(range(10_000, end + 1, 10_000))
    train = [0.8 * level * min(1.0, s / 200_000) + rng.normal(0, 50) for s in train_steps]
    return dict(zip(steps, evals)), dict(zip(train_steps, train))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("table1", artifact_location=(tmp / "artifacts").as_uri())
    truth = {}
    for algo, env, seeds, level, end in PLAN:
        for seed in seeds:
            evals, train = fake_history(level, seed, algo, end)
            run = client.create_run(exp, run_name=f"{algo}-{env}-{seed}", tags=current(
                algo, env, algo=algo, env_id=env, seed=str(seed), sweep="t1", config_hash="abc",
                git_commit="0" * 40))
            ms = [Metric("eval/return_mean", v, 0, s) for s, v in evals.items()]
            ms += [Metric("eval/return_best", max(v for t, v in evals.items() if t <= s), 0, s) for s in evals]
            ms += [Metric("train/episode_return", v, 0, s) for s, v in train.items()]
            client.log_batch(run.info.run_id, metrics=ms)
            client.set_terminated(run.info.run_id, "FINISHED")
            truth[(algo, env, seed)] = (run.info.run_id, evals, train)
    # a failed run must not count
    failed = client.create_run(exp, tags=current("QVPO", "Hopper-v5", algo="QVPO", env_id="Hopper-v5", seed="9"))
    client.log_batch(failed.info.run_id, metrics=[Metric("eval/return_mean", 1e6, 0, 50_000)])
    client.set_terminated(failed.info.run_id, "FAILED")
    paper = tmp / "paper.csv"
    paper.write_text(PAPER)
    out = build_report("table1", uri, paper, tmp / "reports")
    return dict(client=client, uri=uri, exp=exp, truth=truth, failed=failed.info.run_id, out=out, tmp=tmp,
                paper=paper)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def best(store, algo, env, seeds):
    return np.array([max(store["truth"][(algo, env, s)][1].values()) for s in seeds])


def test_files_written(store):
    out = store["out"]
    assert out == store["tmp"] / "reports" / "table1"
    for name in ("table.md", "cells.csv", "comparisons.csv", "aggregate.csv", "runs.csv",
                 "curves_Hopper.png", "curves_Walker2d.png", "aggregate_iqm.png", "performance_profile.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves_Hopper.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cell_numbers_match_the_runs(store):
    cells = {(r["algo"], r["env_id"]): r for r in rows(store["out"] / "cells.csv")}
    c = cells[("QVPO", "Hopper-v5")]
    x = best(store, "QVPO", "Hopper-v5", [0, 1, 2])
    assert int(c["n"]) == 3
    assert float(c["best_eval_mean"]) == pytest.approx(x.mean())
    assert float(c["best_eval_std"]) == pytest.approx(x.std(ddof=1))
    finals = [store["truth"][("QVPO", "Hopper-v5", s)][1][300_000] for s in range(3)]
    assert float(c["final_eval_mean"]) == pytest.approx(np.mean(finals))
    at100 = [store["truth"][("QVPO", "Hopper-v5", s)][1][100_000] for s in range(3)]
    assert float(c["best_eval_mean"]) > float(c["final_eval_mean"])
    assert float(c["eval_at_100k_mean"]) == pytest.approx(np.mean(at100))
    ends = [np.mean(list(store["truth"][("QVPO", "Hopper-v5", s)][2].values())[-10:]) for s in range(3)]
    assert float(c["train_end_mean"]) == pytest.approx(np.mean(ends))
    assert float(c["paper_mean"]) == 3728.5 and c["paper_metric"] == "best_eval"
    # the run that stopped at 250k has no value at 300k
    w = cells[("QVPO", "Walker2d-v5")]
    assert int(w["n"]) == 3 and int(w["eval_at_300k_n"]) == 2 and int(w["eval_at_200k_n"]) == 3
    # the failed run (return 1e6) was not read
    assert float(c["best_eval_mean"]) < 1e5


def test_one_seed_cell_says_no_test(store):
    cells = {(r["algo"], r["env_id"]): r for r in rows(store["out"] / "cells.csv")}
    one = cells[("SAC", "Walker2d-v5")]
    assert int(one["n"]) == 1 and one["note"] == "n < 2: no test" and one["best_eval_std"] == ""
    comps = {(r["baseline"], r["env_id"]): r for r in rows(store["out"] / "comparisons.csv")}
    assert comps[("SAC", "Walker2d-v5")]["note"] == "n < 2: no test"
    assert comps[("SAC", "Walker2d-v5")]["welch_p"] == ""
    assert "n < 2: no test" in (store["out"] / "table.md").read_text()


def test_comparison_is_scipys_welch_and_mwu(store):
    comps = {(r["baseline"], r["env_id"]): r for r in rows(store["out"] / "comparisons.csv")}
    c = comps[("SAC", "Hopper-v5")]
    x, y = best(store, "QVPO", "Hopper-v5", [0, 1, 2]), best(store, "SAC", "Hopper-v5", [0, 1, 2])
    w = sps.ttest_ind(x, y, equal_var=False)
    u = sps.mannwhitneyu(x, y, alternative="two-sided")
    assert float(c["welch_t"]) == pytest.approx(w.statistic) and float(c["welch_p"]) == pytest.approx(w.pvalue)
    assert float(c["mwu_u"]) == u.statistic and float(c["mwu_p"]) == pytest.approx(u.pvalue)
    assert float(c["diff"]) == pytest.approx(x.mean() - y.mean())
    ci = sps.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)  # Welch's interval, not a bootstrap
    assert (float(c["diff_ci_low"]), float(c["diff_ci_high"])) == pytest.approx((ci.low, ci.high))
    assert c["diff_ci_method"] == "welch_t" and c["mwu_method"] == "exact"
    # one test done in the family: Holm leaves its p as it is
    assert float(c["welch_p_holm"]) == pytest.approx(w.pvalue)
    assert {r["baseline"] for r in comps.values()} == {"SAC"}  # Random is no baseline


def test_iqm_of_normalised_scores(store):
    agg = rows(store["out"] / "aggregate.csv")
    iqm = {(r["algo"], r["metric"]): r for r in agg if r["statistic"] == "iqm"}
    assert ("Random", "best_eval") not in iqm
    scores = []
    for env, task_ref in (("Hopper-v5", 3728.5), ("Walker2d-v5", 5191.8)):  # the paper's best of the task
        rnd = np.mean([np.mean(list(store["truth"][("Random", env, s)][1].values())) for s in (0, 1)])
        scores += list((best(store, "QVPO", env, [0, 1, 2]) - rnd) / (task_ref - rnd))
    r = iqm[("QVPO", "best_eval")]
    assert float(r["value"]) == pytest.approx(sps.trim_mean(scores, 0.25))
    assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"])
    assert r["tasks"] == "Hopper Walker2d" and int(r["n_runs"]) == 6
    assert "n < 2" in iqm[("SAC", "best_eval")]["note"]  # SAC's Walker2d stratum has one run
    assert r["left_out"] == ""
    # the mean weighs tasks equally: SAC has 3 runs on Hopper and 1 on Walker2d, and its mean is
    # the mean of the two task means, not the mean of the 4 runs
    per_task = []
    for env, task_ref, seeds in (("Hopper-v5", 3728.5, [0, 1, 2]), ("Walker2d-v5", 5191.8, [0])):
        rnd = np.mean([np.mean(list(store["truth"][("Random", env, s)][1].values())) for s in (0, 1)])
        per_task.append(np.mean((best(store, "SAC", env, seeds) - rnd) / (task_ref - rnd)))
    mean = {r["algo"]: r for r in agg if r["statistic"] == "mean" and r["metric"] == "best_eval"}
    assert float(mean["SAC"]["value"]) == pytest.approx(np.mean(per_task))
    assert "tasks weigh equally" in mean["SAC"]["weighting"]
    poi = [r for r in agg if r["statistic"] == "prob_improvement" and r["metric"] == "best_eval"]
    assert len(poi) == 1 and poi[0]["versus"] == "SAC" and poi[0]["tasks"] == "Hopper"
    assert poi[0]["left_out"] == "Walker2d: fewer than 2 usable best_eval values (QVPO 3, SAC 1)"
    x, y = best(store, "QVPO", "Hopper-v5", [0, 1, 2]), best(store, "SAC", "Hopper-v5", [0, 1, 2])
    assert float(poi[0]["value"]) == pytest.approx((x[:, None] > y[None, :]).mean())


def test_markdown_sets_the_paper_beside_ours(store):
    md = (store["out"] / "table.md").read_text()
    assert "3728.5 (13.8)" in md and "5191.8 (60.2)" in md
    assert "best evaluation return" in md and "Hopper-v5" in md
    assert "0 = the uniformly random policy's mean return on the task, measured by this sweep's `Random` runs" in md
    assert "1 = the paper's best reported return on -v3: the maximum over algorithms of the paper's Table 1 mean" in md
    assert "IQM** = mean of the middle 50% of all runs of the covered tasks pooled" in md
    assert "every task weighs the same, whatever its number of runs" in md
    assert "Welch t-interval, 95% nominal" in md and "coverage is below the nominal 95%" in md
    assert "![curves_Hopper.png](curves_Hopper.png)" in md


def test_report_run_logged_and_not_read_back(store):
    client, exp = store["client"], store["exp"]
    reports = client.search_runs([exp], "tags.`qvpo.report` = '1'")
    assert len(reports) == 1
    rep = reports[0]
    assert rep.info.run_name == "report" and rep.info.status == "FINISHED"
    used = rep.data.tags["report.run_ids"].split(",")
    assert len(used) == sum(len(p[2]) for p in PLAN) and store["failed"] not in used
    assert store["truth"][("QVPO", "Hopper-v5", 0)][0] in used
    arts = {a.path for a in client.list_artifacts(rep.info.run_id)}
    assert {"table.md", "cells.csv", "comparisons.csv", "aggregate.csv", "curves_Hopper.png"} <= arts
    assert "report/iqm_QVPO" in rep.data.metrics

    again = build_report("table1", store["uri"], store["paper"], store["tmp"] / "again")
    assert len(rows(again / "runs.csv")) == len(used)
    assert {r["algo"] for r in rows(again / "cells.csv")} == {"QVPO", "SAC", "Random"}
    assert len(client.search_runs([exp], "tags.`qvpo.report` = '1'")) == 2


def test_without_paper_table_aggregates_are_skipped_with_a_reason(store):
    out = build_report("table1", store["uri"], None, store["tmp"] / "nopaper", log_to_mlflow=False)
    md = (out / "table.md").read_text()
    assert "Normalised scores skipped: no paper table given" in md
    assert not [r for r in rows(out / "aggregate.csv") if r["statistic"] == "iqm"]
    assert [r for r in rows(out / "aggregate.csv") if r["statistic"] == "prob_improvement"]  # needs no paper
    with pytest.raises(ConfigError, match="no MLflow experiment 'nope'"):
        build_report("nope", store["uri"], None, store["tmp"] / "x", log_to_mlflow=False)


def test_ablation_runs_are_grouped_by_their_variant_tag(tmp_path):
    """A sweep's ablation variants (tag `variant`) are the report's groups, QVPO the treatment."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("abl", artifact_location=(tmp_path / "art").as_uri())
    for variant, level in (("QVPO", 100.0), ("Kb1-Kt1", 50.0)):
        for seed in range(3):
            run = client.create_run(exp, tags=current(variant, "Ant-v5", algo="QVPO", variant=variant,
                                                       env_id="Ant-v5", seed=str(seed)))
            client.log_batch(run.info.run_id, metrics=[Metric("eval/return_mean", level + seed, 0, 10_000)])
            client.set_terminated(run.info.run_id)
    out = build_report("abl", uri, None, tmp_path / "reports", log_to_mlflow=False)
    cells = {r["algo"]: r for r in csv.DictReader(open(out / "cells.csv"))}
    assert set(cells) == {"QVPO", "Kb1-Kt1"} and float(cells["Kb1-Kt1"]["best_eval_mean"]) == pytest.approx(51.0)
    [comp] = list(csv.DictReader(open(out / "comparisons.csv")))
    assert comp["baseline"] == "Kb1-Kt1" and float(comp["diff"]) == pytest.approx(50.0)


def _variant_store(tmp_path, name, tags=None):
    """Three variants on Ant-v5, 3 seeds each (QVPO 100, Kb1-Kt1 50, Kb4-Kt1 80, + seed), and
    Random; the experiment's tags as a sweep would record them."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(name, artifact_location=(tmp_path / "art").as_uri(), tags=tags or {})
    for variant, level in (("QVPO", 100.0), ("Kb1-Kt1", 50.0), ("Kb4-Kt1", 80.0), ("Random", 1.0)):
        for seed in range(3):
            algo = "Random" if variant == "Random" else "QVPO"
            t = current(variant, "Ant-v5", algo=algo, env_id="Ant-v5", seed=str(seed))
            if algo != "Random":
                t["variant"] = variant
            run = client.create_run(exp, tags=t)
            client.log_batch(run.info.run_id, metrics=[Metric("eval/return_mean", level + seed, 0, 10_000)])
            client.set_terminated(run.info.run_id)
    return uri


def test_recorded_columns_and_treatment_are_the_reports(tmp_path):
    """The layout a sweep recorded in its experiment: the columns in its order, every other column
    compared with its treatment, and the report says where both came from."""
    from qvpo.report import COLUMNS_TAG, LAYOUT_SWEEP_TAG, TREATMENT_TAG

    uri = _variant_store(tmp_path, "abl", {COLUMNS_TAG: '["Kb4-Kt1", "QVPO", "Kb1-Kt1"]',
                                           TREATMENT_TAG: "Kb4-Kt1", LAYOUT_SWEEP_TAG: "abl-sweep"})
    out = build_report("abl", uri, None, tmp_path / "reports", log_to_mlflow=False)
    assert [r["algo"] for r in rows(out / "cells.csv")] == ["Kb4-Kt1", "QVPO", "Kb1-Kt1", "Random"]
    comps = {r["baseline"]: r for r in rows(out / "comparisons.csv")}
    assert set(comps) == {"QVPO", "Kb1-Kt1"} and {r["algo"] for r in comps.values()} == {"Kb4-Kt1"}
    assert float(comps["QVPO"]["diff"]) == pytest.approx(-20.0)  # 81 - 101
    assert float(comps["Kb1-Kt1"]["diff"]) == pytest.approx(30.0)
    poi = [r for r in rows(out / "aggregate.csv") if r["statistic"] == "prob_improvement"]
    assert {(r["algo"], r["versus"]) for r in poi} == {("Kb4-Kt1", "QVPO"), ("Kb4-Kt1", "Kb1-Kt1")}
    md = (out / "table.md").read_text()
    assert "Columns: Kb4-Kt1, QVPO, Kb1-Kt1, Random; the treatment, compared with every other column" in md
    assert "**Kb4-Kt1**. Order and treatment recorded by sweep `abl-sweep` in the experiment's tags" in md
    assert "## Kb4-Kt1 against each baseline, per task" in md and "| task | baseline | n (Kb4-Kt1, baseline)" in md
    table = md[md.index("## Table 1"):md.index("## Per task")]
    assert table.index("| Kb4-Kt1 |") < table.index("| QVPO |") < table.index("| Kb1-Kt1 |") < table.index("| Random |")


def test_spec_given_to_the_report_wins_and_labels_it_does_not_name_are_said(tmp_path):
    """--spec: the spec's Sweep.treatment and variant order, over the experiment's tags; a label of
    the runs that the spec lacks comes after its columns, and the report names it."""
    from qvpo.report import COLUMNS_TAG, TREATMENT_TAG

    uri = _variant_store(tmp_path, "abl", {COLUMNS_TAG: '["QVPO", "Kb1-Kt1", "Kb4-Kt1"]', TREATMENT_TAG: "QVPO"})
    spec = tmp_path / "spec.gin"
    spec.write_text("Sweep.name = 'abl'\nSweep.experiment = 'abl'\nSweep.treatment = 'Kb1-Kt1'\n"
                    "Sweep.variants = {'Kb1-Kt1': ('qvpo', ('QVPO.behavior_candidates = 1',)), 'QVPO': ('qvpo', ())}\n")
    out = build_report("abl", uri, None, tmp_path / "reports", log_to_mlflow=False, spec=str(spec))
    assert [r["algo"] for r in rows(out / "cells.csv")] == ["Kb1-Kt1", "QVPO", "Kb4-Kt1", "Random"]
    assert {r["algo"] for r in rows(out / "comparisons.csv")} == {"Kb1-Kt1"}
    md = (out / "table.md").read_text()
    assert f"Order and treatment from the sweep spec `{spec}` given with `--spec`" in md
    assert "Labels that order does not name, after it alphabetically: Kb4-Kt1." in md


def test_untagged_experiment_says_it_uses_the_defaults(store):
    """No sweep layout in the experiment (the fake Table 1 store): QVPO and the paper's order, said so."""
    md = (store["out"] / "table.md").read_text()
    assert "Columns: SAC, QVPO, Random; the treatment, compared with every other column (the random policy " \
           "aside): **QVPO**. Order and treatment are the defaults, as no sweep recorded them" in md
    assert [r["algo"] for r in rows(store["out"] / "cells.csv")][:3] == ["SAC", "QVPO", "Random"]


def test_unreadable_layout_tags_fall_back_to_the_defaults_and_say_why(tmp_path):
    from qvpo.report import COLUMNS_TAG, TREATMENT_TAG

    uri = _variant_store(tmp_path, "abl", {COLUMNS_TAG: "Kb4-Kt1, QVPO", TREATMENT_TAG: "Kb4-Kt1"})
    out = build_report("abl", uri, None, tmp_path / "reports", log_to_mlflow=False)
    assert {r["algo"] for r in rows(out / "comparisons.csv")} == {"QVPO"}
    md = (out / "table.md").read_text()
    assert "are the defaults, as the experiment's tags `qvpo.columns` = 'Kb4-Kt1, QVPO'" in md
    assert "cannot be read" in md


def test_a_spec_whose_treatment_is_not_a_column_is_one_config_error(tmp_path):
    """Bad input in --spec stops the report before it reads anything."""
    spec = tmp_path / "spec.gin"
    spec.write_text("Sweep.name = 'bad'\nSweep.algos = ('qvpo', 'sac')\nSweep.treatment = 'td3'\n")
    with pytest.raises(ConfigError, match=r"sweep 'bad': Sweep.treatment 'td3' is not one of the spec's columns "
                                          r"\(QVPO, SAC: its algorithms\)"):
        build_report("nowhere", f"sqlite:///{tmp_path}/none.db", None, tmp_path / "x", spec=str(spec))
    assert not (tmp_path / "none.db").exists()  # stopped before the store was opened


def test_section_registry_adds_the_sections_that_apply(store, monkeypatch):
    """A registered provider's section goes into table.md (after compute, before provenance) with
    its files, when it applies to the runs; one that does not apply writes nothing."""
    from qvpo.report import sections

    seen = {}

    class Applies:
        name = "fake section"

        def applies(self, runs):
            seen["labels"] = {r.algo for r in runs}
            return True

        def build(self, client, runs, report_dir):
            (report_dir / "fake.csv").write_text("n\n" + str(len(runs)) + "\n")
            return sections.Section("\n## A fake open question\n\nIt read every run.\n", ["fake.csv"])

    class Skips:
        name = "never"

        def applies(self, runs):
            return False

        def build(self, client, runs, report_dir):
            raise AssertionError("built a section that does not apply")

    monkeypatch.setattr(sections, "_registered", [])
    sections.register(Applies())
    sections.register(Skips())
    out = build_report("table1", store["uri"], store["paper"], store["tmp"] / "sections", log_to_mlflow=False)
    assert seen["labels"] == {"QVPO", "SAC", "Random"}
    assert (out / "fake.csv").read_text() == f"n\n{len(rows(out / 'runs.csv'))}\n"
    md = (out / "table.md").read_text()
    assert md.index("## Compute") < md.index("## A fake open question") < md.index("## Provenance")
    assert "Gradient variance" not in md  # the shipped gradvar section: these runs logged no gradvar/*


def test_gradient_variance_section_applies_only_to_runs_with_its_metrics():
    from qvpo.report import sections
    from qvpo.report.load import Run
    from qvpo.research.gradient_variance_report import SECTION

    assert SECTION in sections.providers()

    def run(*keys):
        empty = np.array([])
        return Run("r", "QVPO", "Ant-v5", "0", 0, "", empty, empty, empty, empty, metric_keys=frozenset(keys))

    assert not SECTION.applies([run("eval/return_mean"), run("gradvar/summary")])
    assert SECTION.applies([run("eval/return_mean"), run("gradvar/qadv/ess", "gradvar/qcut/ess")])


def test_success_rate_section_summarises_the_seeds_at_each_evaluation(tmp_path):
    """Runs that logged eval/success_rate get the success-rate section: per column and step the
    mean over seeds with the Student-t interval (by hand here), the final rate, the first step
    with mean >= 0.5; runs without the metric do not."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from qvpo.envs.success_report import SECTION

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("sparse", artifact_location=(tmp_path / "artifacts").as_uri())
    rates = {"QVPO": [[0.0, 0.4, 1.0], [0.2, 0.6, 0.8], [0.0, 0.8, 1.0]], "SAC": [[0.0, 0.0, 0.2], [0.0, 0.2, 0.0]]}
    for label, per_seed in rates.items():
        for seed, values in enumerate(per_seed):
            run = client.create_run(exp, tags=current(label, "MountainCarContinuous-v0", algo=label,
                                                      env_id="MountainCarContinuous-v0", seed=str(seed)))
            ms = [Metric("eval/success_rate", v, 0, 1000 * (i + 1)) for i, v in enumerate(values)]
            ms += [Metric("eval/return_mean", 10.0 * v, 0, 1000 * (i + 1)) for i, v in enumerate(values)]
            client.log_batch(run.info.run_id, metrics=ms)
            client.set_terminated(run.info.run_id, "FINISHED")
    out = build_report("sparse", uri, None, tmp_path / "reports", log_to_mlflow=False)
    md = (out / "table.md").read_text()
    assert "## Success rate" in md and (out / "success_rate.png").exists()
    got = {(r["label"], int(r["step"])): r for r in rows(out / "success_rate.csv")}
    for label, per_seed in rates.items():
        for i in range(3):
            x = np.array([s[i] for s in per_seed])
            half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
            r = got[(label, 1000 * (i + 1))]
            assert float(r["mean"]) == pytest.approx(x.mean())
            assert float(r["ci_low"]) == pytest.approx(x.mean() - half)
            assert float(r["ci_high"]) == pytest.approx(x.mean() + half)
    section = md[md.index("## Success rate"):].splitlines()
    qvpo_row = next(line for line in section if line.startswith("| MountainCarContinuous | QVPO |"))
    assert "0.93" in qvpo_row and "| 3,000 | 2,000 |" in qvpo_row  # final mean 2.8 / 3; >= 0.5 first at 2,000
    sac_row = next(line for line in section if line.startswith("| MountainCarContinuous | SAC |"))
    assert sac_row.endswith("| never |")
    assert not SECTION.applies([])


def test_selection_gain_section_takes_second_half_means_of_qadv_runs_only(tmp_path):
    """The best-of-Nd selection section: per run the mean over the second half of qweight/mean,
    q/candidates_std and q/mean (by hand here), per cell the seeds' mean; a run with another weight
    (its qweight/mean is not the gain) is left out; |A| comes from the task."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("scaling", artifact_location=(tmp_path / "artifacts").as_uri())
    gains = {0: [9.0, 9.0, 2.0, 4.0], 1: [0.0, 5.0, 1.0, 3.0]}  # second halves: means 3.0 and 2.0
    for label, weight, seeds in (("QVPO", "@QAdv()", (0, 1)), ("qexp", "@QExpAdv()", (0,))):
        for seed in seeds:
            run = client.create_run(exp, tags=current(label, "Pendulum-v1", algo=label, env_id="Pendulum-v1",
                                                      seed=str(seed)))
            ms = [Metric("eval/return_mean", -500.0, 0, 1000)]
            for i, g in enumerate(gains[seed]):
                ms += [Metric("qweight/mean", g, 0, 100 * i), Metric("q/candidates_std", 2.0, 0, 100 * i),
                       Metric("q/mean", -10.0, 0, 100 * i)]
            client.log_batch(run.info.run_id, metrics=ms,
                             params=[Param("QVPO.q_weight", weight), Param("QVPO.train_selection", "'best'"),
                                     Param("QVPO.train_candidates", "64")])
            client.set_terminated(run.info.run_id, "FINISHED")
    out = build_report("scaling", uri, None, tmp_path / "reports", log_to_mlflow=False)
    got = rows(out / "selection_gain.csv")
    assert sorted((r["label"], r["seed"], float(r["gain"]), float(r["gain_per_spread"]), float(r["gain_per_abs_q"]),
                   r["action_dim"]) for r in got) == [("QVPO", "0", 3.0, 1.5, 0.3, "1"), ("QVPO", "1", 2.0, 1.0, 0.2, "1")]
    md = (out / "table.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| Pendulum | 1 | QVPO | 64 |"))
    half = sps.t.ppf(0.975, 1) * np.std([3.0, 2.0], ddof=1) / np.sqrt(2)
    assert row.startswith(f"| Pendulum | 1 | QVPO | 64 | 2.500 [{2.5 - half:.3f}, {2.5 + half:.3f}] |") and row.endswith("| 2 |")
    section = md[md.index("## Best-of-Nd"):]
    assert "| qexp |" not in section[:section.index("\n## ")]
