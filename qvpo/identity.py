"""What makes two runs the same experiment: the run identity and the results version.

A run's identity is a hash of its *operative* gin config (every parameter of every configurable
the run built, whatever file, include, binding or code default it came from), leaving out the
settings that do not change what the run computes (speed-only switches, tracking, progress
output, checkpoint cadence), plus RESULTS_VERSION. Two runs with the same identity compute the
same thing; a comment edit in a gin file, or binding a value that equals its default, does not
change it.

RESULTS_VERSION: bump it in the same commit as any change that alters what a run computes for
an unchanged config (the maths of an update, an environment wrapper, an evaluation protocol, the
order of random draws). Finished runs of an older version are then re-run by a sweep, and the
report never pools them with newer ones. Do not bump it for speed-only changes that keep the
numbers (the tests that compare fast paths with the plain ones say whether they do).
"""

from __future__ import annotations

import hashlib

RESULTS_VERSION = 2  # 1: runs before run identities existed (tag config_hash only)

IDENTITY_TAG = "qvpo.run_identity"
VERSION_TAG = "qvpo.results_version"

# parameters that change how fast or how visibly a run computes, never what it computes
# (each is tested to give the same numbers on and off, or only concerns output and storage)
NOT_IDENTITY = (
    "MlflowTracker.",                 # where and how metrics are sent
    "Trainer.progress", "Trainer.num_threads", "Trainer.sync_timing", "Trainer.log_every",
    "Trainer.checkpoint_every", "Trainer.device",
    "DiffusionPolicy.native", "DiffusionPolicy.fused", "DiffusionPolicy.block_rows",
    "DiffusionPolicy.compile",
    "TwinQ.fused",
)

# experiment tags in which a sweep records its report's layout (qvpo.sweep.record_layout; read by
# qvpo.report.layout): here, in a module both import, so neither imports the other for them
TREATMENT_TAG = "qvpo.treatment"  # the treatment's label
COLUMNS_TAG = "qvpo.columns"  # the column labels in order, a JSON list
LAYOUT_SWEEP_TAG = "qvpo.layout_sweep"  # the sweep (Sweep.name) that recorded them

CELL_TAG = "qvpo.cell_identity"
PLANNED_TAG = "qvpo.planned_identity"  # a sweep's expectation: the run refuses to start if it differs
# the seeds are not part of a cell's identity: a run's identity is its cell's plus its seed
SEED_PARAMS = ("Trainer.seed", "Trainer.seeds_per_process")


def operative_entries() -> list[str]:
    """The operative gin config as sorted `scope/Configurable.param = value` lines, with the
    settings that do not change what a run computes (NOT_IDENTITY) and the seeds left out.

    Call after everything of the run is built: gin's operative config holds the configurables
    that have been called, with every parameter's value (bound or default).
    """
    from gin import config as gin_config

    lines = []
    for (scope, selector), values in gin_config._OPERATIVE_CONFIG.items():
        name = selector.split(".")[-1]
        for param, value in values.items():
            key = f"{name}.{param}"
            if key.startswith(NOT_IDENTITY) or key in SEED_PARAMS:
                continue
            lines.append(f"{scope + '/' if scope else ''}{key} = {gin_config._format_value(value)}")
    return sorted(lines)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def cell_identity(entries: list[str] | None = None) -> str:
    """Hash of the operative config without the seed, and of RESULTS_VERSION: runs of one table
    cell (algorithm or variant, task) that may be pooled share it."""
    entries = operative_entries() if entries is None else entries
    return _digest(f"results_version = {RESULTS_VERSION}", *entries)


def run_identity(cell: str, seed: int) -> str:
    """A run's identity: its cell's identity and its seed."""
    return _digest(cell, f"seed = {int(seed)}")


def identity_tags(cell: str, seed: int) -> dict[str, str]:
    return {IDENTITY_TAG: run_identity(cell, seed), CELL_TAG: cell, VERSION_TAG: str(RESULTS_VERSION)}
