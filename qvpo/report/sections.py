"""Extra sections of the report, each kept beside the mechanism whose metrics it reads.

An open question's module (qvpo/research/<question>_report.py) provides a section: an object with
  name: str                                 what the section is (for messages)
  applies(runs) -> bool                     whether the report's runs logged its metrics
  build(client, runs, report_dir) -> Section  its files written into report_dir, and its markdown
The report asks every provider, in the order of providers(), and appends the markdown of each that
applies to table.md (after the compute section, before provenance).

PROVIDERS names the shipped ones as "module:attribute", imported only when a report is built (so
the report imports no research code until then); register() adds one at run time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

PROVIDERS = [
    "qvpo.research.selection_gain_report:SECTION",  # reproduce/open_scaling: qweight/mean, q/candidates_std
    "qvpo.research.gradient_variance_report:SECTION",  # reproduce/open_weight_variance: gradvar/*
    "qvpo.envs.success_report:SECTION",  # tasks that define success (reproduce/open_sparse): eval/success_rate
]
_registered: list = []


@dataclass
class Section:
    """A section's markdown (appended to table.md as it is) and the files it wrote (names in report_dir)."""

    markdown: str
    files: list[str] = field(default_factory=list)


class SectionProvider(Protocol):
    name: str

    def applies(self, runs) -> bool: ...

    def build(self, client, runs, report_dir) -> Section: ...


def register(provider: SectionProvider) -> None:
    """Add a section provider (after the shipped ones); registering one twice adds it once."""
    if provider not in _registered:
        _registered.append(provider)


def providers() -> list[SectionProvider]:
    """The shipped providers (PROVIDERS, imported now), then the registered ones."""
    out = []
    for path in PROVIDERS:
        module, _, attr = path.partition(":")
        out.append(getattr(importlib.import_module(module), attr))
    return out + [p for p in _registered if p not in out]


def build_sections(client, runs, report_dir) -> list[tuple[SectionProvider, Section]]:
    """Every provider that applies to the runs, with the section it built."""
    return [(p, p.build(client, runs, report_dir)) for p in providers() if p.applies(runs)]
