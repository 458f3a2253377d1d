"""The sweep: expansion, run identities, skip / resume / restart planning, and a smoke profile
(two algorithms, one task, two seeds, two workers) through `qvpo sweep` into one MLflow store."""

import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats

from qvpo import sweep as sw
from qvpo.cli import main
from qvpo.errors import ConfigError

SPEC = """
Sweep.name = 'smoke'
Sweep.experiment = 'smoke'
Sweep.algos = ('qvpo', 'sac')
Sweep.envs = ('Pendulum-v1',)
Sweep.seeds = 2
Sweep.steps = 400
Sweep.bindings = ('SAC.batch_size = 16', 'SAC.hidden = (16, 16)', 'QVPO.batch_size = 16', 'QVPO.train_candidates = 4',
                  'QVPO.eval_candidates = 4', 'QVPO.T = 3', 'Denoiser.hidden = (16, 16)',
                  'TwinQ.hidden = (16, 16)',
                  'Trainer.warmup_steps = 100', 'Trainer.eval_every = 200', 'Trainer.eval_episodes = 2',
                  'Trainer.log_every = 100', 'Trainer.checkpoint_every = 200', 'ReplayBuffer.capacity = 1000')
Sweep.steps_per_s = {'sac': 100, 'qvpo': 50}
"""


LAYOUT_TAGS = ("qvpo.columns", "qvpo.treatment", "qvpo.layout_sweep")  # what a sweep records for its report


def _spec(tmp_path):
    path = tmp_path / "spec.gin"
    path.write_text(SPEC)
    return str(path)


def _identities(runs):
    sw.identify(runs)
    return [r.identity for r in runs]


def test_expand_and_run_identity(tmp_path):
    spec = sw.load_spec(_spec(tmp_path), [])
    runs = sw.expand(spec)
    assert [(r.algo, r.seed) for r in runs] == [("qvpo", 0), ("qvpo", 1), ("sac", 0), ("sac", 1),
                                                ("random", 0), ("random", 1)]
    ids = _identities(runs)
    assert len(set(ids)) == 6  # every run its own identity
    again = sw.expand(spec, bindings=["MlflowTracker.experiment = 'elsewhere'", "Trainer.progress = True",
                                      "DiffusionPolicy.fused = False", "Trainer.checkpoint_every = 7"])
    assert _identities(again) == ids  # tracking and speed-only settings are not identity
    same_value = sw.expand(spec, bindings=["QVPO.gamma = 0.99", "SAC.tau = 0.005"])  # = the defaults
    assert _identities(same_value) == ids
    other = _identities(sw.expand(spec, bindings=["QVPO.tau = 0.01"]))
    assert other[:2] != ids[:2] and other[2:] == ids[2:]  # QVPO's runs only: SAC's never see QVPO.*
    with pytest.raises(ConfigError, match="unknown algorithm 'sax'"):
        sw.expand(spec, algos=["sax"])
    with pytest.raises(ConfigError, match="unknown env id"):
        sw.expand(spec, envs=["Hopper-v9"])


def test_identity_ignores_comments_and_includes_but_not_values_or_the_results_version(tmp_path, monkeypatch):
    """A run's identity is its operative config: a comment edit or the same value through an
    include keeps it; a changed value or a results-version bump changes it."""
    from qvpo import identity

    extra = tmp_path / "extra.gin"
    spec_text = SPEC + f"Sweep.gin_files = {{'qvpo': ['{extra}']}}\n"
    (tmp_path / "spec.gin").write_text(spec_text)

    def ids(text):
        extra.write_text(text)
        runs = sw.expand(sw.load_spec(str(tmp_path / "spec.gin"), []))
        return _identities(runs)[:2]

    base = ids("QVPO.tau = 0.01\n")
    assert ids("# a comment\nQVPO.tau = 0.01   # another\n") == base
    (tmp_path / "inc.gin").write_text("QVPO.tau = 0.01\n")
    assert ids(f"include '{tmp_path / 'inc.gin'}'\n") == base  # the value through an include
    assert ids("QVPO.tau = 0.02\n") != base
    monkeypatch.setattr(identity, "RESULTS_VERSION", identity.RESULTS_VERSION + 1)
    assert ids("QVPO.tau = 0.01\n") != base


def test_plan_skips_finished_resumes_checkpointed_restarts_the_rest(tmp_path):
    spec = sw.load_spec(_spec(tmp_path), [])
    runs = sw.expand(spec)[:4]
    sw.identify(runs)
    a, b, c, d = runs
    ckpt = tmp_path / "state.pt"
    ckpt.write_bytes(b"x")

    def run(status, checkpoint=None):
        return SimpleNamespace(info=SimpleNamespace(status=status, run_id=f"id-{status}"),
                               data=SimpleNamespace(tags={"qvpo.checkpoint": str(checkpoint)} if checkpoint else {}))

    known = {a.identity: run("FINISHED"), b.identity: run("KILLED", ckpt), c.identity: run("FAILED")}
    assert [(act, rid) for _, act, rid in sw.plan([a, b, c, d], known)] == [
        ("skip", "id-FINISHED"), ("resume", "id-KILLED"), ("new", "id-FAILED"), ("new", None)]


def test_smoke_sweep_two_workers_then_rerun_skips_everything(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = _spec(tmp_path)
    assert main(["sweep", spec, "--dry-run", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "6 runs" in out and "6 to start" in out and not (tmp_path / "mlflow.db").exists()  # dry run: nothing

    assert main(["sweep", spec, "--workers", "2", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "[6/6]" in out and "ETA" in out and "6 runs ended well, 0 failed" in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["sweep"] == "smoke" and r.data.tags.get("git_commit") for r in runs)
    for r in runs:  # each child's whole output is an artifact of its run
        [art] = client.list_artifacts(r.info.run_id, "logs")
        assert art.path == f"logs/{r.data.tags['qvpo.run_identity']}.log"
    for r in runs:  # every metric of every run is there
        evals = client.get_metric_history(r.info.run_id, "eval/return_mean")
        if r.data.tags["algo"] == "Random":
            assert [m.step for m in evals] == [400]
        else:
            assert sorted(m.step for m in evals) == [200, 400]
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss/critic")) == [200, 300, 400]

    # the report's layout, recorded in the experiment when the sweep started: the spec's order, its first algorithm
    tags = client.get_experiment_by_name("smoke").tags
    assert [tags[k] for k in LAYOUT_TAGS] == ['["QVPO", "SAC"]', "QVPO", "smoke"]

    assert main(["sweep", spec, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "0 to start, 0 to resume, 6 finished" in out
    assert len(client.search_runs([client.get_experiment_by_name("smoke").experiment_id])) == 6
    from qvpo import identity  # a results-version bump: every run is new again
    monkeypatch.setattr(identity, "RESULTS_VERSION", identity.RESULTS_VERSION + 1)
    assert main(["sweep", spec, "--dry-run", "--tracking-uri", uri]) == 0
    assert "6 to start, 0 to resume, 0 finished" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    # the report on these runs, its numbers recomputed here from the runs themselves
    paper = tmp_path / "paper.csv"
    paper.write_text("env,algo,mean,std\nPendulum,QVPO,-150.0,10.0\nPendulum,SAC,-160.0,12.0\n")
    assert main(["report", "smoke", "--tracking-uri", uri, "--paper", str(paper), "--out", str(tmp_path / "reports")]) == 0
    out_dir = tmp_path / "reports" / "smoke"
    best = {}
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "eval/return_mean")
        best.setdefault(r.data.tags["algo"], []).append(max(m.value for m in history))
    cells = {row["algo"]: row for row in csv.DictReader(open(out_dir / "cells.csv"))}
    assert float(cells["QVPO"]["best_eval_mean"]) == pytest.approx(np.mean(best["QVPO"]), rel=1e-9)
    [comp] = list(csv.DictReader(open(out_dir / "comparisons.csv")))
    assert comp["baseline"] == "SAC"
    welch = scipy.stats.ttest_ind(best["QVPO"], best["SAC"], equal_var=False)
    assert float(comp["welch_t"]) == pytest.approx(welch.statistic, rel=1e-9)
    # normalised best-eval scores: 0 = the random runs' mean evaluation return, 1 = the paper's best (-150)
    rnd = np.mean([np.mean([m.value for m in client.get_metric_history(r.info.run_id, "eval/return_mean")])
                   for r in runs if r.data.tags["algo"] == "Random"])
    scores = (np.array(best["SAC"]) - rnd) / (-150.0 - rnd)
    agg = [row for row in csv.DictReader(open(out_dir / "aggregate.csv"))
           if row["statistic"] == "iqm" and row["algo"] == "SAC" and row["metric"] == "best_eval"]
    assert float(agg[0]["value"]) == pytest.approx(scipy.stats.trim_mean(scores, 0.25), rel=1e-9)
    assert "-150" in (out_dir / "table.md").read_text() and list(out_dir.glob("*.png"))
    assert "Columns: QVPO, SAC, Random; the treatment, compared with every other column (the random policy aside): " \
           "**QVPO**. Order and treatment recorded by sweep `smoke`" in (out_dir / "table.md").read_text()
    provenance = list(csv.DictReader(open(out_dir / "provenance.csv")))  # commit, version, wall time per run
    assert len(provenance) == 6 and all(row["git_commit"] == r.data.tags["git_commit"] for row in provenance
                                        for r in runs if r.info.run_id == row["run_id"])
    assert all(float(row["wall_s"]) > 0 for row in provenance) and "## Provenance" in (out_dir / "table.md").read_text()
    # compute overhead: time per env step by phase, from the runs' own metrics
    compute = {row["algo"]: row for row in csv.DictReader(open(out_dir / "compute.csv"))}
    # time-weighted over the learning phase: the windows after the 100-step warm-up, all 100 steps long
    env_ms = [np.mean([m.value for m in client.get_metric_history(r.info.run_id, "time/env_ms_per_step") if m.step > 100])
              for r in runs if r.data.tags["algo"] == "SAC"]
    assert float(compute["SAC"]["env_ms_per_step"]) == pytest.approx(np.mean(env_ms), rel=1e-9)
    assert float(compute["QVPO"]["sampling_ms_per_step"]) > 0 and "by phase" in (out_dir / "table.md").read_text()
    report_runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], "tags.`qvpo.report` = '1'")
    assert len(report_runs) == 1


@pytest.mark.parametrize("spec", sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "reproduce").glob("*/*.gin")
                                         if p.name in ("sweep.gin", "cpu_scale.gin")))
def test_every_reproduce_spec_expands_and_its_runs_parse(spec):
    """Each reproduce/ folder's sweep: its runs expand, and every distinct run config parses with
    gin's unknown-name check (a misspelled binding fails here, not after hours of a sweep)."""
    from qvpo import config

    s = sw.load_spec(spec, [])
    runs = sw.expand(s)
    from qvpo.agents import ALGORITHMS

    columns, treatment = sw.layout(s)  # what the sweep records for the report
    assert treatment == "QVPO" and set(columns) == (set(s.variants) if s.variants else {ALGORITHMS[a] for a in s.algos})
    seen = set()
    for r in runs:
        key = (r.algo, tuple(r.gin_files), tuple(b for b in r.bindings if not b.startswith(("Trainer.seed", "Trainer.env_id"))))
        if key not in seen:
            seen.add(key)
            config.parse(r.gin_files, r.bindings, algo=r.algo)


TINY_QVPO = ["QVPO.batch_size = 16", "QVPO.train_candidates = 4", "QVPO.eval_candidates = 4", "QVPO.T = 3",
             "Denoiser.hidden = (16, 16)", "TwinQ.hidden = (16, 16)", "Trainer.warmup_steps = 100",
             "Trainer.eval_every = 150", "Trainer.eval_episodes = 1", "Trainer.log_every = 100",
             "ReplayBuffer.capacity = 1000",
             "GradientVariance.every = 100", "GradientVariance.samples = 3"]  # where a spec attaches it


# The variants each folder's smoke profile runs (with --variants): the treatment and the one whose
# code path differs most from it (a hook, another weight or selection, another algorithm). Every
# variant's bindings are parsed by test_every_reproduce_spec_expands_and_its_runs_parse; running all
# of them would cost a process each (~10 s) for settings already parsed.
SMOKE_VARIANTS = {
    "open_adaptive_entropy": ("QVPO", "adaptive"),
    "open_adaptive_k": ("QVPO", "adaptive-both"),
    "open_components": ("QVPO", "w1-random"),
    "open_mpo": ("QVPO", "mpo-estep-mstep"),
    "open_scaling": ("QVPO", "DIPO"),
    "open_sparse": ("QVPO", "SAC"),
    "open_weight_variance": ("QVPO",),
}


@pytest.mark.parametrize("folder", sorted(p.name for p in (Path(__file__).resolve().parent.parent / "reproduce").glob("open_*")))
def test_open_question_folder_smoke_profile(tmp_path, monkeypatch, capsys, folder):
    """Each open-question folder end to end at smoke scale: its sweep (two of its variants, see
    SMOKE_VARIANTS, one seed, Pendulum-v1, 200 steps, tiny networks) and its report."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = str(Path(__file__).resolve().parent.parent / "reproduce" / folder / "sweep.gin")
    # tiny settings, except QVPO's own that a variant of the folder sets (open_scaling's Nd = 256:
    # the variant would otherwise be the same run as QVPO's)
    varied = {b.split("=")[0].strip() for _, binds in sw.load_spec(spec, []).variants.values() for b in binds
              if b.startswith("QVPO.")}
    binds = [x for b in TINY_QVPO if b.split("=")[0].strip() not in varied for x in ("--bind", b)]
    chosen = SMOKE_VARIANTS[folder]  # a new folder needs its entry
    assert main(["sweep", spec, "--steps", "200", "--seeds", "1", "--envs", "Pendulum-v1", "--workers", "2",
                 "--variants", *chosen, "--tracking-uri", uri, *binds]) == 0
    experiment = sw.load_spec(spec, []).experiment
    assert main(["report", experiment, "--tracking-uri", uri, "--out", str(tmp_path / "reports"), "--spec", spec]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "attributes.status = 'FINISHED'")
    variants = {r.data.tags.get("variant") for r in runs if r.data.tags.get("variant")}
    assert variants == set(chosen)
    table = (tmp_path / "reports" / experiment / "table.md").read_text()
    assert "by phase" in table
    assert f"**QVPO**. Order and treatment from the sweep spec `{spec}` given with `--spec`" in table
    if folder == "open_weight_variance":
        assert (tmp_path / "reports" / experiment / "gradvar.csv").exists()


def test_local_pool_survives_a_child_that_floods_its_output(tmp_path, monkeypatch):
    """A child writing megabytes to stderr neither blocks the sweep (the old pipe filled at 64 KiB
    and the child waited forever) nor loses its reason: the whole output is in the run's log."""
    chatty = ("import sys; sys.stdout.write('o' * 1000 + chr(10)); sys.stderr.write(('e' * 999 + chr(10)) * 5000); "
              "sys.stderr.write('the reason it failed' + chr(10)); sys.exit(3)")
    monkeypatch.setattr(sw, "child_command", lambda args: [sys.executable, "-c", chatty])
    spec = sw.load_spec(_spec(tmp_path), [])
    runs = sw.expand(spec)[:2]
    messages = []
    results = sw.run_local(spec, [(r, "new", None) for r in runs], f"sqlite:///{tmp_path}/m.db", str(tmp_path), 2,
                           log=messages.append)
    assert sorted(rc for _, rc in results) == [3, 3]
    for r in runs:
        text = sw.log_path(str(tmp_path), spec, r).read_text()
        assert len(text) > 5_000_000 and text.rstrip().endswith("the reason it failed")
    assert sum("FAILED (exit 3): the reason it failed" in m for m in messages) == 2


def test_sweep_refuses_seed_bindings_and_variants_that_are_the_same_run(tmp_path):
    spec = sw.load_spec(_spec(tmp_path), [])
    with pytest.raises(ConfigError, match="sets each run's seed itself"):
        sw.expand(spec, bindings=["Trainer.seed = 3"])
    (tmp_path / "v.gin").write_text(SPEC + "Sweep.variants = {'QVPO': ('qvpo', ()), "
                                    "'same': ('qvpo', ('QVPO.gamma = 0.99',))}\nSweep.random_baseline = False\n")
    runs = sw.expand(sw.load_spec(str(tmp_path / "v.gin"), []))
    with pytest.raises(ConfigError, match="'QVPO Pendulum-v1 seed 0' and 'same Pendulum-v1 seed 0' are the same run"):
        sw.identify(runs)


def test_variants_option_runs_a_subset_with_the_whole_specs_identities(tmp_path, capsys):
    """--variants: the chosen variants' runs are exactly the whole spec's runs of those variants
    (same identities, so the rest can follow into the same experiment); a name the spec does not
    have, or --variants on a spec of algorithms, is one line before any store exists."""
    (tmp_path / "v.gin").write_text(SPEC + "Sweep.variants = {'QVPO': ('qvpo', ()), "
                                    "'Kb1': ('qvpo', ('QVPO.behavior_candidates = 1',)), 'SAC': ('sac', ())}\n")
    spec = sw.load_spec(str(tmp_path / "v.gin"), [])
    subset = sw.expand(spec, variants=["Kb1", "SAC"])
    assert {r.variant or r.algo for r in subset} == {"Kb1", "SAC", "random"}  # the random baseline stays
    assert len(subset) == 2 * 2 + 2 and set(_identities(subset)) < set(_identities(sw.expand(spec)))
    for path, message in ((tmp_path / "v.gin", "--variants: 'Kb2' is not a variant of sweep 'smoke'; expected some "
                                                "of QVPO, Kb1, SAC"),
                          (_spec(tmp_path), "sweep 'smoke' has no variants to choose from (--variants)")):
        uri = f"sqlite:///{tmp_path}/never.db"
        assert main(["sweep", str(path), "--variants", "Kb2", "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
        assert not (tmp_path / "never.db").exists()


def test_treatment_and_columns_come_from_the_spec_and_are_checked_before_anything(tmp_path, capsys):
    """Sweep.treatment / Sweep.columns: the report's layout, in spec order by default; a name that
    is not one of the spec's columns is one ConfigError line before any run or store exists."""
    spec = sw.load_spec(_spec(tmp_path), [])
    assert sw.layout(spec) == (["QVPO", "SAC"], "QVPO")  # the spec's order; its first algorithm
    (tmp_path / "o.gin").write_text(SPEC + "Sweep.columns = ('sac',)\nSweep.treatment = 'SAC'\n")
    assert sw.layout(sw.load_spec(str(tmp_path / "o.gin"), [])) == (["SAC", "QVPO"], "SAC")  # --algo names too
    (tmp_path / "v.gin").write_text(SPEC + "Sweep.variants = {'QVPO': ('qvpo', ()), "
                                    "'Kb1': ('qvpo', ('QVPO.behavior_candidates = 1',))}\nSweep.treatment = 'Kb1'\n")
    assert sw.layout(sw.load_spec(str(tmp_path / "v.gin"), [])) == (["QVPO", "Kb1"], "Kb1")  # variants, not algos

    for extra, message in (("Sweep.treatment = 'TD3'", "Sweep.treatment 'TD3' is not one of the spec's columns "
                                                       "(QVPO, SAC: its algorithms)"),
                           ("Sweep.columns = ('SAC', 'DIPO')", "Sweep.columns entry 'DIPO' is not one of the spec's "
                                                               "columns"),
                           ("Sweep.columns = ('SAC', 'sac')", "Sweep.columns names a column twice")):
        (tmp_path / "bad.gin").write_text(SPEC + extra + "\n")
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sw.expand(sw.load_spec(str(tmp_path / "bad.gin"), []))
        uri = f"sqlite:///{tmp_path}/never.db"
        assert main(["sweep", str(tmp_path / "bad.gin"), "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("qvpo: error: sweep 'smoke': ") and message in err
        assert not (tmp_path / "never.db").exists()


def test_record_layout_tags_the_experiment_and_the_latest_sweep_wins(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    sw.record_layout(sw.load_spec(_spec(tmp_path), []), uri)  # creates the experiment
    (tmp_path / "o.gin").write_text(SPEC + "Sweep.name = 'other'\nSweep.columns = ('SAC', 'QVPO')\n")
    tags = MlflowClient(uri).get_experiment_by_name("smoke").tags
    assert [tags[k] for k in LAYOUT_TAGS] == ['["QVPO", "SAC"]', "QVPO", "smoke"]
    sw.record_layout(sw.load_spec(str(tmp_path / "o.gin"), []), uri)
    tags = MlflowClient(uri).get_experiment_by_name("smoke").tags
    assert [tags[k] for k in LAYOUT_TAGS] == ['["SAC", "QVPO"]', "QVPO", "other"]
