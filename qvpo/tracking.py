"""MLflow: the run's life cycle, params from the operative gin config, batched metrics, artifacts.

Embedded by default: the tracking URI is --tracking-uri, else $MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db in the working directory (MLflow's plain file store is refused by current
MLflow).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import gin

from qvpo.errors import ConfigError, one_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKED_PACKAGES = ("qvpo", "torch", "gymnasium", "mujoco", "gin-config", "mlflow", "numpy")
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the checkout that holds the package (with '-dirty' if it has changes)."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def installed_packages() -> str:
    """Every installed distribution as `name==version` lines, sorted (what `pip freeze` shows,
    without pip): logged with each run as environment/packages.txt."""
    seen = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            seen.setdefault(name.lower(), f"{name}=={dist.version}")
    return "\n".join(seen[k] for k in sorted(seen)) + "\n"


def flat_params() -> dict[str, str]:
    """The operative gin config as `scope/Configurable.param -> value` strings.

    Call after every configurable of the run has been built: gin's operative config lists only
    configurables that have been called.
    """
    from gin import config as gin_config

    params = {}
    for (scope, selector), values in gin_config._OPERATIVE_CONFIG.items():
        name = selector.split(".")[-1]
        prefix = f"{scope}/{name}" if scope else name
        for param, value in values.items():
            params[f"{prefix}.{param}"] = gin_config._format_value(value)[:6000]
    return params


# MLflow 3's UI opens experiments in its GenAI view (Evaluations, Traces) unless the URL asks for
# the model-training one (Runs, charts, artifacts); the experiment tag is what MLflow reads where
# it decides by experiment kind (the URL parameter alone switched it in MLflow 3.17)
ML_VIEW = "workflowType=machine_learning"
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def ui_links(base: str, experiment_id: str, run_id: str | None = None) -> dict[str, str]:
    """Links into the MLflow UI's model-training view: the runs table, every metric as charts,
    and (with run_id) one run's page."""
    root = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    links = {"runs table": f"{root}/runs?{ML_VIEW}",
             "metrics as charts": f"{root}/runs?{ML_VIEW}&compareRunsMode=CHART"}
    if run_id:
        links["this run"] = f"{root}/runs/{run_id}?{ML_VIEW}"
    return links


def tag_experiment_kind(client, experiment) -> None:
    """Mark an experiment (made before the tag, or by plain mlflow) as model training, where it
    carries no kind yet (a kind someone set is left alone)."""
    key, value = EXPERIMENT_KIND_TAG
    if key not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, key, value)


UI_PORT = 5000  # where `qvpo ui` / `make ui` serve a local store's UI


def is_server(tracking_uri: str) -> bool:
    """Whether the store is an MLflow tracking server (else a local store: sqlite, files)."""
    return tracking_uri.startswith(("http://", "https://"))


def local_ui(port: int = UI_PORT) -> str:
    """The address `qvpo ui` serves a store's UI at."""
    return f"http://127.0.0.1:{port}"


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """One run's page in the UI's model-training view: on the server itself when the store is
    one, else where `qvpo ui` serves it (said, so a reader knows how to open it)."""
    if is_server(tracking_uri):
        return ui_links(tracking_uri.rstrip("/"), experiment_id, run_id)["this run"]
    return ui_links(local_ui(), experiment_id, run_id)["this run"] + " (after `qvpo ui`, on its default port)"


def search_all(client, experiment_id: str, filter_string: str = "", order_by: list[str] | None = None):
    """Every run of an experiment that matches, across MLflow's result pages (1000 a page)."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, order_by=order_by,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


class _RetryOnLock:
    """An MlflowClient whose calls are retried while a sqlite store is locked by another writer
    (sqlite allows one writer at a time; under load a sweep's workers can time out waiting)."""

    def __init__(self, client, attempts: int = 8, wait_s: float = 0.25):
        self._client, self._attempts, self._wait_s = client, attempts, wait_s

    def __getattr__(self, name):
        fn = getattr(self._client, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            for attempt in range(self._attempts):
                try:
                    return fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - only lock contention is retried here
                    if "locked" not in str(e) or attempt == self._attempts - 1:
                        raise
                    time.sleep(self._wait_s * 2 ** attempt)
        return call


@gin.configurable
class MlflowTracker:
    """One MLflow run: `start`, `log` (buffered), `flush`, `end`.

    Args:
      experiment: MLflow experiment name (--experiment).
      tracking_uri: None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db (--tracking-uri).
      flush_every_s: seconds between metric flushes (metrics are sent with log_batch).
      retries, retry_wait_s: a failed send is retried `retries` times, waiting retry_wait_s,
        2 retry_wait_s, ... in between; after that the metrics stay buffered (in memory and in
        every checkpoint written meanwhile) and go with the next flush: a tracking outage does
        not stop training.
    """

    def __init__(self, experiment: str = "qvpo", tracking_uri: str | None = None,
                 flush_every_s: float = 10.0, retries: int = 3, retry_wait_s: float = 1.0):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.flush_every_s = flush_every_s
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self.outage = False
        try:
            mlflow.set_tracking_uri(self.uri)
            self.client = _RetryOnLock(MlflowClient(self.uri))
        except Exception as e:  # noqa: BLE001 - e.g. an unknown URI scheme
            first = one_line(e)
            raise ConfigError(f"cannot use MLflow tracking URI {self.uri!r}: {first}") from None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._pending: list = []
        self._last_flush = time.monotonic()
        # hold=True: metrics are sent only by explicit flush() calls (the trainer flushes after
        # each durable checkpoint, so a resumed run never logs a step twice)
        self.hold = False

    def check(self) -> str:
        """Fail fast (ConfigError) if the store cannot be reached; returns the experiment id."""
        if is_server(self.uri):  # MLflow's client would retry for minutes
            import urllib.error
            import urllib.request

            try:
                urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5).close()
            except (urllib.error.URLError, OSError) as e:
                raise ConfigError(f"cannot reach the MLflow tracking server {self.uri!r}: "
                                  f"{getattr(e, 'reason', e)}") from None
        try:
            return self._experiment_id()
        except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
            first = one_line(e)
            raise ConfigError(f"cannot use MLflow tracking store {self.uri!r}: {first}") from None

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp:
            tag_experiment_kind(self.client, exp)
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment, tags=dict([EXPERIMENT_KIND_TAG]))
        except Exception:  # noqa: BLE001
            # Several runs starting at once on a new experiment (a sweep's workers) all find it
            # missing and all create it; the store keeps one and refuses the others. The loser
            # uses the winner's experiment instead of failing.
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, run_name: str, params: dict[str, str], config_str: str,
              tags: dict[str, str]) -> str:
        from mlflow.entities import Param

        exp_id = self.check()
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.experiment_id = exp_id
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow: at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.client.log_text(self.run_id, config_str, "config.gin")
        self.client.log_text(self.run_id, installed_packages(), "environment/packages.txt")
        return self.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        if not self.hold and time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def pending_rows(self) -> list[tuple[str, float, int, int]]:
        """The metrics not yet sent, as (key, value, timestamp, step) rows (for a checkpoint)."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self._pending]

    def resume(self, run_id: str, pending: list[tuple[str, float, int, int]], step: int) -> None:
        """Continue an existing run: mark it RUNNING again and send the metrics its checkpoint
        held (MLflow ignores an exact repeat of a metric, so rows sent before the crash are not
        doubled)."""
        from mlflow.entities import Metric

        try:
            run = self.client.get_run(run_id)
        except Exception as e:  # noqa: BLE001
            first = one_line(e)
            raise ConfigError(f"cannot resume MLflow run {run_id!r} at {self.uri!r}: {first}") from None
        if run.info.status == "FINISHED":
            raise ConfigError(f"MLflow run {run_id} has already FINISHED; nothing to resume")
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "qvpo.resumed_at_step", str(step))
        self._pending = [Metric(*row) for row in pending]
        self.flush()

    def flush(self) -> bool:
        """Send the buffered metrics; on a store failure retry, then keep them buffered (False)."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return True
        for attempt in range(self.retries + 1):
            try:
                # a resend after a partial failure repeats rows exactly: MLflow ignores the repeats
                for i in range(0, len(self._pending), MAX_BATCH):
                    self.client.log_batch(self.run_id, metrics=self._pending[i:i + MAX_BATCH])
            except Exception as e:  # noqa: BLE001 - any store failure: retry, then buffer
                error = e
                if attempt < self.retries:
                    time.sleep(self.retry_wait_s * 2 ** attempt)
                continue
            if self.outage:
                print(f"qvpo: MLflow store reachable again; buffered metrics of run {self.run_id} sent",
                      file=sys.stderr)
            self._pending, self.outage = [], False
            return True
        if not self.outage:
            first = one_line(error)
            print(f"qvpo: warning: MLflow store {self.uri!r} failed ({first[:200]}); training goes on, "
                  f"{len(self._pending)} metric values stay buffered for run {self.run_id}", file=sys.stderr)
        self.outage = True
        return False

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_artifacts(self, local_dir: Path) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir))

    def end(self, status: str = "FINISHED", reason: str | None = None, flush: bool = True) -> None:
        """Flush (unless told not to: metrics after the last checkpoint stay unsent, so a resume
        logs them once) and mark the run; a failing store is reported, never raised."""
        if self.run_id is None:
            return
        try:
            if flush and not self.flush():
                print(f"qvpo: warning: {len(self._pending)} metric values of run {self.run_id} could not be "
                      "sent", file=sys.stderr)
            if reason:
                self.client.set_tag(self.run_id, "end_reason", reason[:5000])
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001
            print(f"qvpo: warning: could not end MLflow run {self.run_id} as {status}: {e}", file=sys.stderr)


def run_tags(device: str) -> dict[str, str]:
    tags = {"device": device, "host": socket.gethostname(), "python": platform.python_version()}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    tags.update(package_versions())
    return tags
