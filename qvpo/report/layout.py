"""Which columns the report shows, in which order, and the treatment every other is compared with.

A sweep spec says it (`Sweep.treatment`, the order of `Sweep.algos` / `Sweep.variants` or an
explicit `Sweep.columns`: qvpo.sweep.layout), and the sweep records it in its MLflow experiment
when it starts (experiment tags COLUMNS_TAG, TREATMENT_TAG, LAYOUT_SWEEP_TAG: a report may run on
another machine from the store alone). The report takes, in this order: the spec given to it
(`qvpo report --spec`), else those tags, else the defaults of experiments no sweep tagged (plain
`qvpo train` runs, sweeps older than the tags): QVPO as the treatment, the paper's Table 1 order
for its algorithms. Every layout puts the labels it does not name after its own, alphabetically,
and the random policy last; the report says which source its layout came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from qvpo.errors import ConfigError
from qvpo.identity import COLUMNS_TAG, LAYOUT_SWEEP_TAG, TREATMENT_TAG  # the tags the sweep writes

RANDOM = "Random"  # algo tag of the uniformly random policy runs (normalisation's 0): always last
DEFAULT_TREATMENT = "QVPO"  # the treatment of experiments without a recorded layout
PAPER_ORDER = ("PPO", "SPO", "TD3", "SAC", "DIPO", "QSM", "QVPO")  # the paper's Table 1 column order
_DEFAULTS = (f"{DEFAULT_TREATMENT} is the treatment, the paper's algorithms come in its Table 1 order "
             f"({', '.join(PAPER_ORDER)}), others after them alphabetically")


@dataclass(frozen=True)
class Layout:
    """The report's column order and treatment.

    columns: labels (the `variant` tag, else `algo`) in the order the report shows them; labels
      of the runs not among them follow, alphabetically, and the random policy comes last.
    treatment: the label every other column is compared with.
    source: where the two came from, as the report says it.
    recorded: True when a spec or a sweep gave them (False: the defaults).
    """

    columns: tuple[str, ...]
    treatment: str
    source: str
    recorded: bool = True

    def order(self, labels) -> list[str]:
        """The labels present, in the report's order."""
        labels = set(labels)
        known = [a for a in self.columns if a in labels and a != RANDOM]
        return known + sorted(a for a in labels if a not in self.columns and a != RANDOM) + \
            ([RANDOM] if RANDOM in labels else [])

    def unplaced(self, labels) -> list[str]:
        """The labels present that the layout does not name (the random policy aside)."""
        return sorted(a for a in set(labels) if a not in self.columns and a != RANDOM)

    def colors(self, labels) -> dict[str, str]:
        """A fixed matplotlib colour per label: the layout's columns first, then the others."""
        ordered = list(self.columns) + sorted(set(labels) - set(self.columns))
        return {a: f"C{i % 10}" for i, a in enumerate(ordered)}


def default() -> Layout:
    """The layout of an experiment no sweep tagged: QVPO against the paper's algorithms in its order."""
    return Layout(PAPER_ORDER, DEFAULT_TREATMENT,
                  "are the defaults, as no sweep recorded them in the experiment (no experiment tag "
                  f"`{COLUMNS_TAG}`: runs of plain `qvpo train`, or of a sweep older than that tag) and no "
                  f"`--spec` was given: {_DEFAULTS}", recorded=False)


def from_tags(tags: dict) -> Layout | None:
    """The layout a sweep recorded in its experiment's tags; None without COLUMNS_TAG. Tags that
    cannot be read give the defaults, with the reason in their source."""
    if COLUMNS_TAG not in tags:
        return None
    raw, treatment = tags[COLUMNS_TAG], tags.get(TREATMENT_TAG, "")
    try:
        columns = json.loads(raw)
        ok = isinstance(columns, list) and all(isinstance(c, str) and c for c in columns) and treatment
    except ValueError:
        ok = False
    if not ok:
        fallback = default()
        return Layout(fallback.columns, fallback.treatment,
                      f"are the defaults, as the experiment's tags `{COLUMNS_TAG}` = {raw!r} and `{TREATMENT_TAG}` "
                      f"= {treatment!r} cannot be read (expected a JSON list of labels and one label): {_DEFAULTS}",
                      recorded=False)
    sweep = tags.get(LAYOUT_SWEEP_TAG)
    who = f"sweep `{sweep}`" if sweep else "a sweep"
    return Layout(tuple(columns), treatment,
                  f"recorded by {who} in the experiment's tags `{COLUMNS_TAG}` and `{TREATMENT_TAG}` when it "
                  "started (its spec's `Sweep.treatment` and column order)")


def from_spec(spec: str, experiment: str | None = None) -> Layout:
    """The layout of a sweep spec (a path or a shipped spec's name), checked like a sweep checks it."""
    from qvpo import sweep  # (the spec reader builds configs: only when a spec is given)

    s = sweep.load_spec(spec, [])
    columns, treatment = sweep.layout(s)
    if treatment is None:
        raise ConfigError(f"sweep spec {spec!r} has no algorithms or variants: it gives the report no columns")
    other = f"; the spec's experiment is `{s.experiment}`, not this one" if experiment and \
        s.experiment != experiment else ""
    return Layout(tuple(columns), treatment, f"from the sweep spec `{spec}` given with `--spec` "
                                             f"(its `Sweep.treatment` and column order){other}")


def resolve(experiment_tags: dict, spec_layout: Layout | None = None) -> Layout:
    """The spec's layout if one was given, else the experiment's recorded one, else the defaults."""
    if spec_layout is not None:
        return spec_layout
    return from_tags(experiment_tags) or default()

