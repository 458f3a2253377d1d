"""Statistics for comparing RL algorithms over a few seeds: pure functions on numpy arrays.

Two families, each function naming its source:
- per task, two samples of seeds: mean / sd / t-interval, Welch's t-test, Mann-Whitney U (exact or
  exhaustive-permutation p at small n), Holm-Bonferroni over a table's comparisons, Hedges' g,
  Welch's t-interval of the difference of means;
- across tasks (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice",
  arXiv:2108.13264, the rliable library): normalised scores, IQM and mean with stratified
  bootstrap intervals, probability of improvement, performance profiles, normalised area under
  the learning curve.

With 5 seeds a cell is too small for any test to mean much: every function returns NaN where a
sample has fewer than 2 values rather than a number that looks like evidence (MIN_N).

Intervals and what they are worth at 3-5 seeds (checked by simulation in tests/test_stats.py):
- the difference of two means: Welch's t-interval (welch_mean_difference), whose coverage of the
  nominal 95 % stays within 93-97 % at 3 vs 3 and 5 vs 5 normal seeds with unequal variances. The
  percentile bootstrap of the same difference (bootstrap_mean_difference, kept for reference)
  covers only about 77 % at 3 vs 3 and 84 % at 5 vs 5 in the same simulation: resampling n values
  shrinks their spread by sqrt((n-1)/n) and uses normal-like rather than t tails (Hesterberg 2015,
  "What teachers should know about the bootstrap", The American Statistician, arXiv:1411.5279:
  percentile intervals are too narrow in small samples).
- aggregates across tasks (IQM, mean, probability of improvement): stratified percentile
  bootstrap, seeded, as rliable does (BCa's jackknife acceleration is itself noise at 3-5 seeds
  and degenerate samples make it NaN). Their coverage is below nominal with 3-5 runs per task,
  for the same reason: STRATIFIED_COVERAGE holds the figures measured in tests/test_stats.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as sps

MIN_N = 2  # fewer seeds than this: no sd, no interval, no test
CONFIDENCE = 0.95
N_RESAMPLES = 10_000  # rliable's default number of bootstrap resamples (its paper uses 50k)
NO_TEST = "n < 2: no test"
# Mann-Whitney: exact / exhaustive-permutation p when the number of splits C(n+m, n) is at most
# this (12,870 = C(16, 8): every n, m <= 8); beyond, scipy's tie-corrected normal approximation
MWU_EXACT_MAX = 20_000
# measured coverage of the nominal 95 % stratified percentile-bootstrap intervals of the
# aggregates, {(statistic, runs per task): coverage}, in a simulation of 3 tasks with normal
# scores (means 0.2, 0.5, 0.8, sd 0.2; 600 replications, 1,000 resamples each, seeded; Monte
# Carlo error about ±0.03): the report quotes these, and
# tests/test_stats.py::test_stratified_bootstrap_coverage_is_below_nominal measures them again
STRATIFIED_COVERAGE = {("mean", 3): 0.82, ("iqm", 3): 0.79, ("mean", 5): 0.88, ("iqm", 5): 0.88}
STRATIFIED_SIMULATION = dict(task_means=(0.2, 0.5, 0.8), sd=0.2, replications=600, n_resamples=1000)
WELCH_COVERAGE_NOTE = ("Welch t-interval, 95% nominal (Welch-Satterthwaite df); coverage checked "
                       "by simulation at n = 3 and 5 per side in tests/test_stats.py: 93-97%")


class Summary(NamedTuple):
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


class TestResult(NamedTuple):
    statistic: float
    pvalue: float


class Interval(NamedTuple):
    estimate: float
    low: float
    high: float


def _clean(x) -> np.ndarray:
    """1-d float array without NaNs (a run too short for a metric gives NaN, not a zero)."""
    x = np.asarray(x, dtype=float).ravel()
    return x[~np.isnan(x)]


def enough(*samples) -> bool:
    """True when every sample has at least MIN_N (non-NaN) values."""
    return all(len(_clean(s)) >= MIN_N for s in samples)


def summarize(x, confidence: float = CONFIDENCE) -> Summary:
    """n, mean, sample sd (ddof=1) and the Student-t interval of the mean,
    mean ± t_{(1+c)/2, n-1} · sd / √n (Student 1908; any statistics text).

    The mean of a single seed is still given (it is what was measured); sd and interval are NaN.
    """
    x = _clean(x)
    n = len(x)
    mean = float(x.mean()) if n else np.nan
    if n < MIN_N:
        return Summary(n, mean, np.nan, np.nan, np.nan)
    sd = float(x.std(ddof=1))
    half = sps.t.ppf((1 + confidence) / 2, n - 1) * sd / np.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def welch_t(x, y) -> TestResult:
    """Welch's unequal-variance t-test, two-sided (Welch 1947; scipy.stats.ttest_ind,
    equal_var=False). Welch rather than Student because the seeds' spread differs a lot between
    algorithms (the paper's own table: sd 7 for DIPO on Hopper, 998 for QSM).

    Both samples constant: t = d / 0 (±inf, or NaN for equal means) and the Welch-Satterthwaite
    df is 0/0, so there is no t distribution to read a p from: p is NaN (no test), not the 0
    scipy gives, which a Holm correction would count as the strongest evidence of the table."""
    x, y = _clean(x), _clean(y)
    if not enough(x, y):
        return TestResult(np.nan, np.nan)
    if x.var() == 0 and y.var() == 0:
        d = x.mean() - y.mean()
        return TestResult(float(np.sign(d) * np.inf) if d else np.nan, np.nan)
    with warnings.catch_warnings():  # one constant sample: its variance is exactly 0, not a precision loss
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        r = sps.ttest_ind(x, y, equal_var=False)
    return TestResult(float(r.statistic), float(r.pvalue))


def mann_whitney_u(x, y) -> TestResult:
    """Mann-Whitney U test, two-sided (Mann & Whitney 1947); the statistic is U of x (count of
    pairs with x > y, ties 1/2, as scipy.stats.mannwhitneyu).

    The p-value is exact at small sizes (mwu_method says which applies), so that the floor
    min_mwu_pvalue (2 / C(10, 5) = 0.0079 at 5 vs 5) holds:
    - no ties: scipy's exact null distribution of U (method='exact');
    - ties: scipy's exact method assumes none, and its default falls back to a normal
      approximation that can go below the floor; instead the exhaustive permutation p-value over
      all C(n+m, n) splits of the pooled values with their midranks (the exact conditional test
      given the ties, Lehmann 1975, "Nonparametrics: statistical methods based on ranks", ch. 1;
      the same as scipy.stats.permutation_test with n_resamples=inf), two-sided as
      2 min(P(U <= u), P(U >= u)), capped at 1;
    - more than MWU_EXACT_MAX splits: scipy's normal approximation with tie and continuity
      correction (n, m > 8: the floor is then far below any threshold in use).
    """
    x, y = _clean(x), _clean(y)
    if not enough(x, y):
        return TestResult(np.nan, np.nan)
    method = mwu_method(x, y)
    if method == "permutation":
        u = float(sps.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic").statistic)
        return TestResult(u, _mwu_permutation_pvalue(x, y))
    r = sps.mannwhitneyu(x, y, alternative="two-sided", method=method)
    return TestResult(float(r.statistic), float(r.pvalue))


def mwu_method(x, y) -> str:
    """Which p-value mann_whitney_u gives for these samples: 'exact', 'permutation' or 'asymptotic'."""
    from math import comb

    x, y = _clean(x), _clean(y)
    if comb(len(x) + len(y), len(x)) > MWU_EXACT_MAX:
        return "asymptotic"
    pooled = np.concatenate([x, y])
    return "exact" if len(np.unique(pooled)) == len(pooled) else "permutation"


def _mwu_permutation_pvalue(x, y) -> float:
    """Two-sided p of U over every split of the pooled sample into sizes n and m (see
    mann_whitney_u). U of x = R_x - n(n+1)/2, so the rank sum R_x orders the splits like U; twice
    the midranks are integers, so the comparison with the observed value is exact."""
    from itertools import chain, combinations

    n, pooled = len(x), np.concatenate([x, y])
    r2 = np.rint(2 * sps.rankdata(pooled)).astype(np.int64)
    splits = np.fromiter(chain.from_iterable(combinations(range(len(pooled)), n)), dtype=np.intp)
    sums = r2[splits.reshape(-1, n)].sum(axis=1)
    observed = r2[:n].sum()
    return float(min(1.0, 2 * min(np.mean(sums <= observed), np.mean(sums >= observed))))


def min_mwu_pvalue(n: int, m: int) -> float:
    """The smallest two-sided p the exact (or exhaustive-permutation) Mann-Whitney test can give
    for sizes n and m: 2 / C(n+m, n) (all of x above all of y; ties only raise it). Used to say
    when no correction can be passed; it bounds mann_whitney_u's p wherever mwu_method is not
    'asymptotic'."""
    from math import comb

    return min(1.0, 2.0 / comb(n + m, n)) if n and m else np.nan


def holm_bonferroni(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979), controlling the family-wise error rate.

    Sort the m p-values ascending, p_(1) <= ... <= p_(m); the adjusted value of p_(i) is
    max_{j <= i} min(1, (m - j + 1) p_(j)); reject where adjusted <= alpha. NaN entries (tests
    not done) are left NaN and do not count towards m.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)  # the step-down: never below an earlier one
    return out


def hedges_g(x, y) -> float:
    """Hedges' g of x over y: Cohen's d with the pooled sd,
    d = (mean x - mean y) / sqrt(((n-1) s_x² + (m-1) s_y²) / (n + m - 2)),
    times the small-sample bias correction J = 1 - 3 / (4 df - 1), df = n + m - 2, i.e.
    1 - 3 / (4 (n + m) - 9) (Hedges 1981, the usual approximation of his exact gamma-function
    factor). With 5 seeds each J = 0.90: d alone overstates the effect by ~10 %.
    Zero spread in both samples gives ±inf (or NaN when the means are equal too).
    """
    x, y = _clean(x), _clean(y)
    if not enough(x, y):
        return np.nan
    n, m = len(x), len(y)
    pooled = np.sqrt(((n - 1) * x.var(ddof=1) + (m - 1) * y.var(ddof=1)) / (n + m - 2))
    j = 1 - 3 / (4 * (n + m) - 9)
    with np.errstate(all="ignore"):
        return float(j * (x.mean() - y.mean()) / pooled)


def welch_mean_difference(x, y, confidence: float = CONFIDENCE) -> Interval:
    """mean(x) - mean(y) with Welch's t-interval: d ± t_{(1+c)/2, ν} · se, se² = s_x²/n + s_y²/m,
    ν = se⁴ / ((s_x²/n)² / (n-1) + (s_y²/m)² / (m-1)) (Welch 1947; Satterthwaite 1946; the
    interval of scipy.stats.ttest_ind(equal_var=False).confidence_interval()).

    The interval of the difference of means the report shows: at 3-5 seeds a side its coverage is
    close to nominal (tests/test_stats.py simulates it), where the percentile bootstrap's is not.
    Both samples constant: se = 0, and the interval is the point [d, d] (zero width, no spread:
    not a confidence statement). NaN when a sample has fewer than 2 values.
    """
    x, y = _clean(x), _clean(y)
    if not enough(x, y):
        return Interval(np.nan, np.nan, np.nan)
    n, m = len(x), len(y)
    d = float(x.mean() - y.mean())
    vx, vy = x.var(ddof=1) / n, y.var(ddof=1) / m
    se2 = vx + vy
    if se2 == 0:
        return Interval(d, d, d)
    df = se2 ** 2 / (vx ** 2 / (n - 1) + vy ** 2 / (m - 1))
    half = float(sps.t.ppf((1 + confidence) / 2, df) * np.sqrt(se2))
    return Interval(d, d - half, d + half)


def _mean_difference(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def bootstrap_mean_difference(x, y, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                              seed: int = 0, method: str = "percentile") -> Interval:
    """Bootstrap interval of mean(x) - mean(y), the two samples resampled independently
    (Efron & Tibshirani 1993, ch. 8 "two-sample problem"; scipy.stats.bootstrap, paired=False).
    Seeded: the same data give the same interval.

    Not what the report shows: with 3-5 seeds a side its 95 % percentile interval covers well
    under 90 % of the time (about 77 % at 3 vs 3 in tests/test_stats.py's simulation);
    welch_mean_difference replaced it."""
    x, y = _clean(x), _clean(y)
    if not enough(x, y):
        return Interval(np.nan, np.nan, np.nan)
    return _bootstrap_interval((x, y), _mean_difference, confidence, n_resamples, seed, method)


def _bootstrap_interval(samples: tuple, statistic, confidence: float, n_resamples: int, seed: int,
                        method: str = "percentile") -> Interval:
    """`statistic` of the samples with scipy's bootstrap CI, resampling each sample on its own."""
    estimate = float(statistic(*samples))
    ci = sps.bootstrap(samples, statistic, n_resamples=n_resamples, paired=False, confidence_level=confidence,
                       method=method, rng=np.random.default_rng(seed)).confidence_interval
    return Interval(estimate, float(ci.low), float(ci.high))


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle 50 % of the values, 25 % cut from each end
    (scipy.stats.trim_mean(x, 0.25); Agarwal et al. 2021, sec. 4.3). Robust to a failed seed
    like the median, but uses half of the runs instead of one."""
    x = _clean(x)
    return float(sps.trim_mean(x, 0.25)) if len(x) >= MIN_N else np.nan


def _pooled_iqm(*per_task, axis=-1):
    return sps.trim_mean(np.concatenate(per_task, axis=axis), 0.25, axis=axis)


def _task_weighted_mean(*per_task, axis=-1):
    """The mean of the per-task means: every task weighs 1 / (number of tasks), however many runs
    it has (batched over scipy.stats.bootstrap's resamples along `axis`)."""
    return np.mean([np.mean(t, axis=axis) for t in per_task], axis=0)


def _stratified(statistic, scores_per_task, confidence, n_resamples, seed) -> Interval:
    """A statistic of the tasks' runs, with a stratified percentile-bootstrap interval
    (Agarwal et al. 2021, arXiv:2108.13264, sec. 4.1, and rliable's StratifiedBootstrap): runs are
    resampled with replacement within each task, independently across tasks, so every resample
    keeps the task mix. scipy.stats.bootstrap does exactly this when each task is its own sample
    (paired=False); unlike rliable it allows a different number of runs per task.
    NaN interval when a task has fewer than 2 runs (a stratum of one cannot be resampled).
    A task with no value at all is left out here: the caller (qvpo.report) names it.

    Coverage: below the nominal level with 3-5 runs per task (a resample of n values has
    (n-1)/n of their variance, and percentiles ignore the t tails); STRATIFIED_COVERAGE holds the
    figures measured in tests/test_stats.py."""
    tasks = [_clean(s) for s in scores_per_task]
    tasks = [t for t in tasks if len(t)]
    if not tasks:
        return Interval(np.nan, np.nan, np.nan)
    if not enough(*tasks):
        return Interval(float(statistic(*tasks)), np.nan, np.nan)
    return _bootstrap_interval(tuple(tasks), statistic, confidence, n_resamples, seed)


def iqm_stratified(scores_per_task: Sequence, confidence: float = CONFIDENCE,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> Interval:
    """IQM of all runs of all tasks pooled (Agarwal et al. 2021's aggregate, as in rliable:
    trim_mean of the flattened run x task scores) with a stratified bootstrap 95 % interval
    (see _stratified). Pooled, so a task weighs in proportion to its number of runs (equal
    weights when every task has the same number, as in rliable's run x task matrix).
    A single run in total gives NaN (as iqm)."""
    if sum(len(_clean(s)) for s in scores_per_task) < MIN_N:
        return Interval(np.nan, np.nan, np.nan)
    return _stratified(_pooled_iqm, scores_per_task, confidence, n_resamples, seed)


def mean_stratified(scores_per_task: Sequence, confidence: float = CONFIDENCE,
                    n_resamples: int = N_RESAMPLES, seed: int = 0) -> Interval:
    """Mean over tasks of each task's mean score, every task weighted equally whatever its number
    of runs (rliable's `aggregate_mean`: the mean over tasks of the per-task means of a run x task
    matrix; Agarwal et al. 2021 report it beside the IQM), with the same stratified bootstrap
    interval as the IQM (see _stratified)."""
    return _stratified(_task_weighted_mean, scores_per_task, confidence, n_resamples, seed)


def _improvement(x, y, axis=-1):
    """P(X > Y) + P(X = Y) / 2 of one task, = U / (n m), for batched samples."""
    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    gt = (x[..., :, None] > y[..., None, :]).mean(axis=(-2, -1))
    eq = (x[..., :, None] == y[..., None, :]).mean(axis=(-2, -1))
    return gt + eq / 2


def probability_of_improvement(x_per_task: Sequence, y_per_task: Sequence,
                               confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                               seed: int = 0) -> Interval:
    """P(X > Y): the probability that a run of X beats a run of Y on a task drawn at random,
    averaged over tasks; per task the Mann-Whitney U of X over Y divided by n m (ties count 1/2)
    (Agarwal et al. 2021, sec. 4.3 and rliable's probability_of_improvement). 0.5 = no
    difference. The interval is the stratified bootstrap (each algorithm's runs resampled within
    each task). NaN when a task's sample has fewer than 2 runs.
    """
    xs, ys = [_clean(s) for s in x_per_task], [_clean(s) for s in y_per_task]
    if len(xs) != len(ys) or not xs or not enough(*xs, *ys):
        return Interval(np.nan, np.nan, np.nan)
    k = len(xs)

    def statistic(*samples, axis=-1):
        return np.mean([_improvement(samples[i], samples[k + i], axis) for i in range(k)], axis=0)

    return _bootstrap_interval((*xs, *ys), statistic, confidence, n_resamples, seed)


def performance_profile(scores_per_task: Sequence, taus) -> np.ndarray:
    """Run-score distribution: for each threshold tau the fraction of runs whose normalised score
    is above tau, averaged over tasks so that every task weighs the same (Dolan & Moré 2002;
    Agarwal et al. 2021, sec. 4.2, eq. of the "score distribution")."""
    taus = np.asarray(taus, dtype=float)
    tasks = [_clean(s) for s in scores_per_task]
    tasks = [t for t in tasks if len(t)]
    if not tasks:
        return np.full(taus.shape, np.nan)
    return np.mean([(t[:, None] > taus[None, :]).mean(axis=0) for t in tasks], axis=0)


def normalized_score(x, random: float, reference: float):
    """(x - random) / (reference - random) (Mnih et al. 2015 for Atari's human-normalised score;
    D4RL, Fu et al. 2020, arXiv:2004.07219, and rliable do the same).

    In qvpo.report, 0 (`random`) is the uniformly random policy's mean return on the task, measured
    by the sweep's own `Random` runs, and 1 (`reference`) is the paper's best reported return on
    the task: the maximum over algorithms of the mean in the paper's Table 1 (Ding et al. 2024,
    "Diffusion-based reinforcement learning via Q-weighted variational policy optimization",
    arXiv:2405.16173), which ran MuJoCo -v3 tasks while we run -v5, so 1 is a -v3 figure, not a
    return measured on the task we run."""
    with np.errstate(all="ignore"):
        return (np.asarray(x, dtype=float) - random) / (reference - random)


def mean_over_curve(steps, values, end: float | None = None) -> float:
    """The area under a learning curve (trapezoid rule over the logged steps) divided by its
    span: the curve's average height, in units of return, so runs of different eval spacing are
    comparable. Points after `end` are dropped, so every run of a task can be cut at the same
    step. NaN with fewer than 2 points."""
    s, v = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    keep = ~np.isnan(v) & (s <= (np.inf if end is None else end))
    s, v = s[keep], v[keep]
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    if len(s) < 2 or s[-1] == s[0]:
        return np.nan
    return float(np.trapezoid(v, s) / (s[-1] - s[0]))


def normalized_auc(steps, values, random: float, reference: float, end: float | None = None) -> float:
    """Normalised area under the learning curve: mean_over_curve, normalised like a score
    (1 = at the reference from the first evaluation on). A sample-efficiency measure: two runs
    with the same final return differ here when one got there sooner."""
    return float(normalized_score(mean_over_curve(steps, values, end), random, reference))
