"""The model registry: versions with lineage, the promotion gate, champion/challenger aliases, rollback.

Registry operations live only here (DESIGN.md). Aliases only (stages are deprecated); versions are never
deleted, a promotion or rollback only moves aliases.

What is stored where, all on the MLflow model version:
- lineage tags: `medplib.git_commit`, `medplib.data_version` (DVC hash of the training data),
  `medplib.config_digest`, `medplib.parent_run_id`, plus any extra tags given to `register`;
- eval metrics: tag `medplib.eval` = JSON `{"data_version", "split", "metrics": {"all": {...}, "<modality>": {...}}}`
  (the shape `medplib.eval.metrics.aggregate_by_modality` returns), and `medplib.eval_data_version` /
  `medplib.eval_split` as plain tags for searching. Metrics are compared only when both were measured on the
  same data version and split;
- the last gate decision: `medplib.decision` (promoted | rejected), `medplib.decision_reason`,
  `medplib.decision_run_id`; on a champion, `medplib.replaced_version` names the champion it replaced, which is
  where a second rollback goes;
- after a rollback: `medplib.rolled_back_by_run_id` (+ reason) on the demoted version,
  `medplib.restored_by_run_id` on the restored one.
What a pipeline trained is also on its parent run: `medplib.trained_data_version` (set when its training finished,
whatever the gate then decided) and `medplib.registered_model`; `trained_on` reads it, with the versions' lineage, for
data-triggered retraining.
Every decision (promotion or not, rollback) is also an MLflow run in the experiment: tags `medplib.kind`,
`medplib.decision`, `medplib.reason`; params (versions, thresholds, data version); metrics (primary values and
deltas); the full record as `decision.json`.

Alias moves are not transactional across processes: run one promotion or rollback at a time.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from medplib.config import Home, TrackingConfig, load_tracking_config, resolve_home
from medplib.config.tracking import GateConfig

log = logging.getLogger(__name__)

TAG_GIT_COMMIT = "medplib.git_commit"
TAG_DATA_VERSION = "medplib.data_version"
TAG_CONFIG_DIGEST = "medplib.config_digest"
TAG_PARENT_RUN = "medplib.parent_run_id"
TAG_EVAL = "medplib.eval"
TAG_EVAL_DATA_VERSION = "medplib.eval_data_version"
TAG_EVAL_SPLIT = "medplib.eval_split"
TAG_EVAL_RUN = "medplib.eval_run_id"  # the MLflow run whose metrics TAG_EVAL holds
TAG_DECISION = "medplib.decision"
TAG_DECISION_REASON = "medplib.decision_reason"
TAG_DECISION_RUN = "medplib.decision_run_id"
TAG_REPLACED = "medplib.replaced_version"
TAG_ROLLED_BACK_RUN = "medplib.rolled_back_by_run_id"
TAG_ROLLED_BACK_REASON = "medplib.rollback_reason"
TAG_RESTORED_RUN = "medplib.restored_by_run_id"
TAG_TRAINED_DATA_VERSION = "medplib.trained_data_version"  # on a pipeline run whose training finished
TAG_REGISTERED_MODEL = "medplib.registered_model"
# MLflow 3's experiment kind: the experiment is model training, not GenAI (traces, tokens). MLflow 3.17's UI no longer
# reads it to choose a page: its "GenAI | Model training" switch is global, kept in the browser, GenAI at first; the
# URL parameter below sets it, so every link medplib prints opens on the training runs (`ui_url`).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_TRAINING = "workflowType=machine_learning"


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of the experiment's training runs (or of one run), in its model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs{f'/{run_id}' if run_id else ''}?{UI_TRAINING}"


def ui_version_url(base: str, name: str, version: str) -> str:
    """The MLflow UI's page of one registered version (its model card, aliases, lineage)."""
    return f"{base.rstrip('/')}/#/models/{name}/versions/{version}?{UI_TRAINING}"

_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))")
_EPS = 1e-12  # float slack so that 0.75 - 0.70 counts as a delta of 0.05
_MAX_RUN_TAG = 7900  # MLflow run tag values stop at 8000 characters; decision.json keeps the full text


@contextmanager
def use_tracking(cfg: TrackingConfig) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs (and their environment variables) at `cfg` for the
    duration, then restore them exactly. Some MLflow 3.17 paths ignore a client's own URIs: resolving a
    `models:/` URI, registering a logged model, the fluent API. Not thread-safe, like MLflow's globals."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri, {k: os.environ.get(k) for k in names}
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked; the message says why and what to do.

    A ValueError like the project's other errors for people, so the CLI reports it as `medplib: error: ...`."""


@dataclass(frozen=True)
class EvalMetrics:
    """Aggregated eval metrics of one model on one dataset version and split.

    `metrics` is `{"all": {metric: value, ...}, "<modality>": {...}, ...}` as `aggregate_by_modality` returns.
    """

    data_version: str
    metrics: dict[str, dict[str, float]]
    split: str = "test"
    # Per-sample rows of the evaluation (id, split, task, modality, metric values, texts), for the gate's paired
    # bootstrap; not part of the version tag (too large): read from the eval run's `eval/samples.json`.
    samples: list[dict] | None = field(default=None, compare=False, repr=False)

    def primary(self, metric: str, group: str = "all") -> float | None:
        value = self.metrics.get(group, {}).get(metric)
        return None if value is None else float(value)

    def to_json(self) -> str:
        return json.dumps({"data_version": self.data_version, "split": self.split, "metrics": self.metrics},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EvalMetrics":
        d = json.loads(text)
        return cls(data_version=d["data_version"], metrics=d["metrics"], split=d.get("split", "test"))


@dataclass
class Decision:
    """What the gate decided and why; deltas are challenger minus champion. `interval` is the paired bootstrap's
    (low, high) of the primary metric's delta at `confidence`; `guard_deltas` the guard metrics' changes."""

    promote: bool
    reason: str
    primary_metric: str
    challenger: float | None = None
    champion: float | None = None
    delta: float | None = None
    modality_deltas: dict[str, float] = field(default_factory=dict)
    interval: tuple[float, float] | None = None
    confidence: float | None = None
    paired_samples: int | None = None
    guard_deltas: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Interval:
    """A paired bootstrap's view of `metric`'s delta (challenger minus champion) over `n` shared samples."""

    metric: str
    delta: float
    low: float
    high: float
    confidence: float
    n: int


def paired_bootstrap(challenger_rows: list[dict], champion_rows: list[dict], metric: str, *, resamples: int = 1000,
                     confidence: float = 0.9, seed: int = 0, split: str = "test") -> Interval:
    """Resample the samples both models were scored on (with replacement, the same draw for both) and return the
    central `confidence` interval of the headline `metric`'s delta. A per-sample-mean metric is resampled as the
    mean of paired differences; a corpus metric (BLEU, CIDEr) is re-aggregated by its task on every resample.
    Raises ValueError when the two were not scored on the same samples."""
    import numpy as np

    from medplib import tasks
    from medplib.tasks import Cumulative

    keys = tasks.headline_tables(split)  # a test headline measured on `split` (the gate's: validation)
    if metric not in keys:
        raise ValueError(f"'{metric}' is no task's headline metric on split {split!r}; known: {sorted(keys)}")
    table, column = keys[metric]
    split, task_name = table.split("/", 1)

    task = tasks.get(task_name)
    per_sample = type(task.metric()) is Cumulative  # a per-sample mean; otherwise a corpus metric

    def pick(rows: list[dict]) -> dict[str, dict]:
        return {str(r["id"]): r for r in rows if r.get("split") == split and r.get("task") == task_name
                and (not per_sample or r.get(column) is not None)}

    a, b = pick(challenger_rows), pick(champion_rows)
    if not a or not b:
        what = f"'{column}' scores" if per_sample else "rows"
        raise ValueError(f"no per-sample {what} of {table} for the "
                         f"{'challenger' if not a else 'champion'}: the paired bootstrap of {metric} needs them")
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise ValueError(f"challenger and champion were scored on different {table} samples ({len(only)} differ, "
                         f"e.g. {only[0]}): re-evaluate the champion on the same data")
    ids = sorted(a)
    n = len(ids)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    if per_sample:  # the delta is the mean paired difference
        diff = np.array([float(a[i][column]) - float(b[i][column]) for i in ids])
        delta, boots = float(diff.mean()), diff[draws].mean(axis=1)
    else:
        def value(rows: list[dict]) -> float:
            agg = task.metric()
            for r in rows:
                agg.append({k: v for k, v in r.items() if k not in ("id", "split", "task")})
            return float(agg.aggregate()["all"][column])

        ra, rb = [a[i] for i in ids], [b[i] for i in ids]
        delta = value(ra) - value(rb)
        boots = np.array([value([ra[j] for j in d]) - value([rb[j] for j in d]) for d in draws])
    tail = (1 - confidence) / 2
    low, high = np.quantile(boots, [tail, 1 - tail])
    return Interval(metric, delta, float(low), float(high), confidence, n)


def gate(challenger: EvalMetrics, champion: EvalMetrics | None, cfg: GateConfig) -> Decision:
    """The promotion decision (GateConfig says what each threshold means). Without a champion, the challenger
    must reach every floor. Otherwise, on the same eval data and split: the primary metric's delta must be > 0 and,
    with the bootstrap on, the lower end of its paired interval must lie above `min_delta` (without it, the point
    delta must reach `min_delta`); no guard metric may drop by more than its tolerance; no modality's primary
    metric by more than `max_modality_regression`. Every comparison is in the decision."""
    p = cfg.primary_metric
    c = challenger.primary(p)
    if c is None:
        raise ValueError(f"Challenger metrics have no '{p}' in their 'all' row "
                         f"(has: {sorted(challenger.metrics.get('all', {}))}); the gate's primary_metric is '{p}'")
    if champion is None:
        short = []
        for metric, minimum in sorted(cfg.floor.items()):
            value = challenger.primary(metric)
            if value is None or math.isnan(value) or value < minimum - _EPS:
                short.append(f"{metric} {'missing' if value is None else f'{value:.4f}'} is below the first "
                             f"champion's floor {minimum}")
        if short:
            return Decision(False, "no champion yet, but " + "; ".join(short), p, challenger=c)
        floors = f" (floors met: {', '.join(f'{m} >= {v}' for m, v in sorted(cfg.floor.items()))})" \
            if cfg.floor else ""
        return Decision(True, f"no champion yet: promote with {p} = {c:.4f}{floors}", p, challenger=c)
    if (challenger.data_version, challenger.split) != (champion.data_version, champion.split):
        return Decision(False, f"not comparable: challenger evaluated on data {challenger.data_version} "
                               f"split '{challenger.split}', champion on data {champion.data_version} split "
                               f"'{champion.split}'; re-evaluate the champion on the same data", p, challenger=c)
    ch = champion.primary(p)
    if ch is None or math.isnan(ch) or math.isnan(c):
        return Decision(False, f"not comparable: {p} is {c} for the challenger and {ch} for the champion", p,
                        challenger=c, champion=ch)

    delta = c - ch
    failures: list[str] = []
    passed: list[str] = []
    interval: Interval | None = None
    if delta <= 0:
        failures.append(f"{p} {c:.4f} does not beat the champion's {ch:.4f} (delta {delta:+.4f})")
    elif cfg.bootstrap_samples > 0 and challenger.samples is not None and champion.samples is not None:
        try:
            interval = paired_bootstrap(challenger.samples, champion.samples, p, resamples=cfg.bootstrap_samples,
                                        confidence=cfg.confidence, seed=cfg.seed,
                                        split=challenger.split.split("[", 1)[0])
        except ValueError as e:
            failures.append(str(e))
        if interval is not None:
            where = f"{cfg.confidence:.0%} interval [{interval.low:+.4f}, {interval.high:+.4f}] over {interval.n} " \
                    "paired samples"
            if interval.low <= cfg.min_delta + _EPS:
                failures.append(f"{p} {c:.4f} vs the champion's {ch:.4f} (delta {delta:+.4f}) is within the noise: "
                                f"its {where} does not lie above min_delta {cfg.min_delta}")
            else:
                passed.append(f"{p} {c:.4f} vs champion {ch:.4f} (delta {delta:+.4f}; {where}, above min_delta "
                              f"{cfg.min_delta})")
    else:  # no bootstrap: configured off, or metrics recorded without per-sample scores (no eval run)
        unpaired = " (point delta: no per-sample scores to bootstrap)" if cfg.bootstrap_samples > 0 else ""
        if delta < cfg.min_delta - _EPS:
            failures.append(f"{p} {c:.4f} beats the champion's {ch:.4f} by {delta:+.4f}, "
                            f"less than min_delta {cfg.min_delta}{unpaired}")
        else:
            passed.append(f"{p} {c:.4f} vs champion {ch:.4f} (delta {delta:+.4f} >= min_delta {cfg.min_delta}"
                          f"{unpaired})")

    guard_deltas: dict[str, float] = {}
    for metric, tolerance in cfg.guard_metrics().items():
        ch_g = champion.primary(metric)
        if ch_g is None or math.isnan(ch_g):
            continue  # the champion was not measured on it: nothing to guard
        c_g = challenger.primary(metric)
        if c_g is None or math.isnan(c_g):
            failures.append(f"guard {metric} is {ch_g:.4f} for the champion but missing for the challenger")
            continue
        guard_deltas[metric] = c_g - ch_g
        if ch_g - c_g > tolerance + _EPS:
            failures.append(f"guard {metric} drops {ch_g:.4f} -> {c_g:.4f} ({c_g - ch_g:+.4f}), more than its "
                            f"tolerance {tolerance}")
    if guard_deltas:
        passed.append("guards within tolerance: " + ", ".join(f"{m} {d:+.4f}" for m, d in guard_deltas.items()))

    modality_deltas: dict[str, float] = {}
    for modality in sorted(m for m in champion.metrics if m != "all"):
        ch_m = champion.primary(p, modality)
        if ch_m is None:
            continue
        c_m = challenger.primary(p, modality)
        if c_m is None:
            failures.append(f"modality '{modality}' has {p} {ch_m:.4f} for the champion but none for the challenger")
            continue
        d = c_m - ch_m
        modality_deltas[modality] = d
        if -d > cfg.max_modality_regression + _EPS:
            failures.append(f"modality '{modality}' {p} drops {ch_m:.4f} -> {c_m:.4f} ({d:+.4f}), "
                            f"more than max_modality_regression {cfg.max_modality_regression}")

    extra = dict(interval=(interval.low, interval.high) if interval else None,
                 confidence=cfg.confidence if interval else None, paired_samples=interval.n if interval else None,
                 guard_deltas=guard_deltas)
    if failures:
        return Decision(False, "; ".join(failures), p, c, ch, delta, modality_deltas, **extra)
    worst = min(modality_deltas.items(), key=lambda kv: kv[1]) if modality_deltas else None
    passed.append(f"no modality dropped more than {cfg.max_modality_regression}"
                  + (f"; smallest modality change {worst[0]} {worst[1]:+.4f}" if worst else ""))
    return Decision(True, "; ".join(passed), p, c, ch, delta, modality_deltas, **extra)


_READY_STORES: set[tuple[str, str]] = set()


def log_dataset(client: MlflowClient, run_id: str, dataset: dict | None, context: str) -> None:
    """Record the data version a run used as its MLflow dataset input (`dataset`: `RunContext.dataset()`, None: no
    version known, nothing logged); `context` ("training", "evaluation") is the input's `mlflow.data.context` tag."""
    if not dataset:
        return
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client.log_inputs(run_id, [DatasetInput(Dataset(**dataset), tags=[InputTag("mlflow.data.context", context)])])


def _client(cfg: TrackingConfig) -> MlflowClient:
    """An MlflowClient whose sqlite databases, if new, are created (migrated) under an exclusive file lock. Two
    processes opening a new database at once otherwise race in MLflow's alembic migrations ("table
    _alembic_tmp_experiments already exists")."""
    import fcntl

    key = (cfg.tracking_uri, cfg.registry_uri)
    sqlite = [u for u in dict.fromkeys(key) if u.startswith("sqlite:///")]
    if not sqlite or key in _READY_STORES:
        return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.registry_uri)
    db = Path(sqlite[0][len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.init-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.registry_uri)  # creates the store
            client.search_registered_models(max_results=1)  # and the registry's
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_STORES.add(key)
    return client


class Registry:
    """Registered-model operations for one tracking config (URIs already resolved against the home)."""

    def __init__(self, cfg: TrackingConfig):
        if "{home}" in cfg.tracking_uri + cfg.registry_uri + cfg.artifact_location:
            raise ValueError("TrackingConfig still contains '{home}': call .resolved(home) first")
        if cfg.registered_model is None or cfg.gate.primary_metric is None:
            cfg = cfg.for_family("medplib")  # settings built by hand, not for a family (a RunContext's are)
        self.cfg = cfg
        self.name = cfg.registered_model
        if cfg.auth:
            missing = [v for v in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if not os.environ.get(v)]
            if missing:
                raise RegistryError(f"The MLflow server at {cfg.tracking_uri} has auth on (profile) but "
                                    f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                                    "credentials come from the environment only")
        self.client = _client(cfg)

    def check_reachable(self, tries: int = 3, timeout: float = 5.0, backoff: float = 1.0) -> None:
        """Fail fast, before any work, when a tracking or registry server does not answer: `tries` GETs of its
        /health with doubling pauses, then a RegistryError naming the URI (local sqlite/file stores pass)."""
        import time

        import httpx

        for uri in dict.fromkeys((self.cfg.tracking_uri, self.cfg.registry_uri)):
            if not uri.startswith(("http://", "https://")):
                continue
            error: Exception | None = None
            for attempt in range(tries):
                try:
                    if httpx.get(uri.rstrip("/") + "/health", timeout=timeout).status_code == 200:
                        error = None
                        break
                    error = RuntimeError("/health did not answer 200")
                except httpx.HTTPError as e:
                    error = e
                if attempt + 1 < tries:
                    time.sleep(backoff * 2 ** attempt)
            if error is not None:
                raise RegistryError(f"The MLflow server at {uri} is unreachable after {tries} tries "
                                    f"({type(error).__name__}: {error}). Nothing was run or registered; start the "
                                    "server or fix tracking_uri / registry_uri (mlflow.yaml or the profile)")

    @classmethod
    def from_home(cls, home: Home | str | Path | None = None, config_path: Path | None = None) -> "Registry":
        """The registry of a state folder (`--home`, MEDPLIB_HOME or `.medplib/`) in the local profile, settings from
        `mlflow.yaml` for MedPLIB; a command passes its RunContext's `tracking` to `Registry(...)` instead."""
        h = home if isinstance(home, Home) else resolve_home(home)
        h.ensure()
        return cls(load_tracking_config(config_path).resolved(h))

    # ---- reading -------------------------------------------------------------------------------------------

    def aliases(self) -> dict[str, str]:
        """{alias: version} of the registered model; empty if it is not registered yet."""
        try:
            rm = self.client.get_registered_model(self.name)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(version) for alias, version in rm.aliases.items()}

    def versions(self) -> list[str]:
        """Every version of the registered model, newest first; empty if it is not registered yet."""
        found = self.client.search_model_versions(f"name='{self.name}'")
        return [str(v) for v in sorted((int(mv.version) for mv in found), reverse=True)]

    def champion_version(self) -> str | None:
        """The version the `champion` alias points at, or None."""
        return self.aliases().get(self.cfg.aliases.champion)

    def version_of(self, model_uri: str) -> str | None:
        """The version a `models:/<name>/<N>` or `models:/<name>@<alias>` URI of this registered model points at;
        None for any other URI or folder. An alias that is not set is an error naming the aliases that are."""
        m = _MODEL_URI.fullmatch(str(model_uri).rstrip("/"))
        if not m or m["name"] != self.name:
            return None
        if m["version"]:
            self._version(m["version"])
            return m["version"]
        version = self.aliases().get(m["alias"])
        if version is None:
            raise RegistryError(f"No alias '{m['alias']}' on registered model '{self.name}' "
                                f"(aliases: {self.aliases() or 'none'})")
        return version

    def version_tags(self, version: str | int) -> dict[str, str]:
        """All tags of a version: lineage, eval metrics, decisions."""
        return dict(self._version(version).tags)

    def eval_metrics(self, version: str | int) -> EvalMetrics | None:
        """The eval metrics recorded on a version (tag `medplib.eval`), or None."""
        text = self._version(version).tags.get(TAG_EVAL)
        return EvalMetrics.from_json(text) if text else None

    def eval_samples(self, version: str | int) -> list[dict] | None:
        """The per-sample rows behind a version's recorded metrics (`eval/samples.json` of the run tagged
        `medplib.eval_run_id`), or None when the version has no such run or the run has no such artifact."""
        import tempfile

        run_id = self._version(version).tags.get(TAG_EVAL_RUN)
        if not run_id:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run_id, "eval/samples.json", tmp)
            except (MlflowException, OSError) as e:
                log.warning("Version %s: no per-sample scores in eval run %s (%s)", version, run_id, e)
                return None
            table = json.loads(Path(path).read_text(encoding="utf-8"))
        return [dict(zip(table["columns"], row)) for row in table["data"]]

    def trained_on(self, data_version: str) -> str | None:
        """What says this registered model was already trained on `data_version`: a version registered from it
        (`version N`) or a pipeline run whose training finished on it though nothing was registered (`pipeline run
        ID`: evaluation failed after training); None when nothing was."""
        versions = self.client.search_model_versions(  # [] while the model is not registered
            f"name = '{self.name}' and tags.`{TAG_DATA_VERSION}` = '{data_version}'")
        if versions:
            return f"version {min(int(v.version) for v in versions)}"
        runs = self.client.search_runs(
            [self.experiment_id()], max_results=1, order_by=["attributes.start_time ASC"],
            filter_string=f"tags.`{TAG_TRAINED_DATA_VERSION}` = '{data_version}' and "
                          f"tags.`{TAG_REGISTERED_MODEL}` = '{self.name}'")
        return f"pipeline run {runs[0].info.run_id}" if runs else None

    def mark_trained(self, run_id: str, data_version: str) -> None:
        """Record on a pipeline run that its training on `data_version` finished for this registered model: from now
        on `trained_on(data_version)` answers, whatever the gate decides and even if evaluation fails."""
        self.client.set_tag(run_id, TAG_REGISTERED_MODEL, self.name)
        self.client.set_tag(run_id, TAG_TRAINED_DATA_VERSION, data_version)

    def experiment_id(self) -> str:
        """The experiment's id, creating it with the configured artifact location if absent; it is marked as model
        training (`mlflow.experimentKind`)."""
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag was set, or by another tool
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.cfg.experiment, artifact_location=self.cfg.artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:  # created meanwhile by another process
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
            return self.client.get_experiment_by_name(self.cfg.experiment).experiment_id

    # ---- writing -------------------------------------------------------------------------------------------

    def register(self, run_id: str, artifact_path: str, *, git_commit: str, data_version: str,
                 config_digest: str, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> str:
        """Register the model logged by `run_id` at `artifact_path` as a new version with its lineage tags and
        point `challenger` at it; creates the registered model if absent. Returns the version."""
        missing = [k for k, v in (("git_commit", git_commit), ("data_version", data_version),
                                  ("config_digest", config_digest)) if not v]
        if missing:
            raise ValueError(f"Lineage missing for run {run_id}: {', '.join(missing)} must be non-empty")
        run = self._run(run_id)
        source, model_id = self._model_source(run, artifact_path)
        parent = parent_run_id or run.data.tags.get("mlflow.parentRunId")
        if not parent:
            log.warning("Run %s has no parent run; tagging %s = 'none'", run_id, TAG_PARENT_RUN)
        all_tags = {**(tags or {}), TAG_GIT_COMMIT: git_commit, TAG_DATA_VERSION: data_version,
                    TAG_CONFIG_DIGEST: config_digest, TAG_PARENT_RUN: parent or "none"}
        self._ensure_registered_model()
        # MLflow's sqlite registry resolves a `models:/<model id>` source through the *global* tracking URI, not
        # this client's (a TODO in its SqlAlchemyStore.create_model_version): point it at ours meanwhile.
        with use_tracking(self.cfg):
            mv = self.client.create_model_version(self.name, source, run_id=run_id, tags=all_tags,
                                                  model_id=model_id)
        self.client.set_registered_model_alias(self.name, self.cfg.aliases.challenger, mv.version)
        log.info("Registered %s version %s from %s (run %s); alias '%s' -> %s", self.name, mv.version, source,
                 run_id, self.cfg.aliases.challenger, mv.version)
        return str(mv.version)

    def record_eval(self, version: str | int, metrics: EvalMetrics, eval_run_id: str | None = None) -> None:
        """Store eval metrics on a version (replacing earlier ones) so later gates can read them; `eval_run_id`: the
        MLflow run that measured them (a re-evaluation of a champion replaces the one that registered it)."""
        version = str(version)
        self._version(version)
        self.client.set_model_version_tag(self.name, version, TAG_EVAL, metrics.to_json())
        self.client.set_model_version_tag(self.name, version, TAG_EVAL_DATA_VERSION, metrics.data_version)
        self.client.set_model_version_tag(self.name, version, TAG_EVAL_SPLIT, metrics.split)
        if eval_run_id:
            self.client.set_model_version_tag(self.name, version, TAG_EVAL_RUN, eval_run_id)
        elif TAG_EVAL_RUN in self._version(version).tags:  # metrics given by hand: no run's samples stand behind them
            self.client.delete_model_version_tag(self.name, version, TAG_EVAL_RUN)

    def register_and_gate(self, run_id: str, artifact_path: str, metrics: EvalMetrics, *, git_commit: str,
                          data_version: str, config_digest: str, parent_run_id: str | None = None,
                          tags: dict[str, str] | None = None,
                          before_gate: Callable[[str], None] | None = None) -> tuple[str, Decision]:
        """The publishing sequence: register the logged model (lineage, `challenger`), record its metrics, run
        `before_gate(version)` (the caller re-measures the champion on this data there, if it must), then gate
        it against the champion. Returns the version and the gate's decision."""
        version = self.register(run_id, artifact_path, git_commit=git_commit, data_version=data_version,
                                config_digest=config_digest, parent_run_id=parent_run_id, tags=tags)
        self.record_eval(version, metrics, eval_run_id=(tags or {}).get(TAG_EVAL_RUN))
        if before_gate is not None:
            before_gate(version)
        return version, self.promote_if_better(version, parent_run_id=parent_run_id)

    def promote_if_better(self, version: str | int, metrics: EvalMetrics | None = None, *,
                          parent_run_id: str | None = None) -> Decision:
        """Gate `version` against the champion (recording `metrics` on it first if given); on promotion point
        `previous-champion` at the old champion, then `champion` at `version`. The decision is recorded as
        version tags and as a run in the experiment either way."""
        version = str(version)
        self._version(version)
        if metrics is not None:
            self.record_eval(version, metrics)
        challenger = self.eval_metrics(version)
        if challenger is None:
            raise RegistryError(f"Version {version} of '{self.name}' has no recorded eval metrics: "
                                "pass metrics= or call record_eval first")
        old = self.champion_version()
        champion = self.eval_metrics(old) if old is not None else None
        p = self.cfg.gate.primary_metric
        if self.cfg.gate.bootstrap_samples > 0 and champion is not None and old != version:
            # The per-sample scores of the runs that measured the recorded metrics (none when the metrics were
            # recorded by hand: the gate then judges the point delta and says so).
            challenger = replace(challenger, samples=self.eval_samples(version))
            champion = replace(champion, samples=self.eval_samples(old))
        if old == version:
            decision = Decision(False, f"version {version} is already the champion", p,
                                challenger=challenger.primary(p))
        elif old is not None and champion is None:
            decision = Decision(False, f"champion version {old} has no recorded eval metrics: cannot compare; "
                                       "evaluate it and call record_eval", p, challenger=challenger.primary(p))
        else:
            decision = gate(challenger, champion, self.cfg.gate)

        g = self.cfg.gate
        params = {"version": version, "champion_version": old or "none", "primary_metric": p,
                  "min_delta": g.min_delta, "max_modality_regression": g.max_modality_regression,
                  "bootstrap_samples": g.bootstrap_samples, "confidence": g.confidence,
                  **{f"guard.{m}": t for m, t in g.guard_metrics().items()},
                  **{f"floor.{m}": v for m, v in sorted(g.floor.items())},
                  "eval_data_version": challenger.data_version, "eval_split": challenger.split}
        low, high = decision.interval or (None, None)
        metrics_out = {"challenger": decision.challenger, "champion": decision.champion, "delta": decision.delta,
                       "delta_low": low, "delta_high": high, "paired_samples": decision.paired_samples,
                       **{f"guard_delta.{m}": d for m, d in decision.guard_deltas.items()},
                       **{f"modality_delta.{m}": d for m, d in decision.modality_deltas.items()}}
        label = "promoted" if decision.promote else "rejected"
        with self._decision_run(f"promote-v{version}", "promotion", label, decision.reason, params, metrics_out,
                                {"decision": asdict(decision), **params}, parent_run_id) as run_id:
            if decision.promote:
                if old is not None:
                    # Set the fallback first: each alias set replaces atomically, so `champion` is never missing.
                    self.client.set_registered_model_alias(self.name, self.cfg.aliases.previous_champion, old)
                    self.client.set_model_version_tag(self.name, version, TAG_REPLACED, old)
                self.client.set_registered_model_alias(self.name, self.cfg.aliases.champion, version)
            for key, value in ((TAG_DECISION, label), (TAG_DECISION_REASON, decision.reason),
                               (TAG_DECISION_RUN, run_id)):
                self.client.set_model_version_tag(self.name, version, key, value)
        log.info("%s version %s %s: %s", self.name, version, label, decision.reason)
        return decision

    def rollback(self, reason: str = "manual rollback", *, parent_run_id: str | None = None) -> str:
        """Point `champion` back at `previous-champion` (and `previous-champion` one further back, or remove
        it); recorded like a decision. Returns the restored version."""
        a = self.cfg.aliases
        aliases = self.aliases()
        current, previous = aliases.get(a.champion), aliases.get(a.previous_champion)
        if previous is None:
            raise RegistryError(f"Cannot roll back '{self.name}': no '{a.previous_champion}' alias (champion is "
                                f"{'version ' + current if current else 'not set'}). A rollback needs an earlier "
                                "promotion to go back to.")
        if previous == current:
            raise RegistryError(f"Cannot roll back '{self.name}': '{a.champion}' and '{a.previous_champion}' both "
                                f"point at version {previous}")
        further_back = self._version(previous).tags.get(TAG_REPLACED)
        if further_back == current:
            further_back = None
        full_reason = f"{reason}: champion version {current} -> {previous}"
        params = {"from_version": current or "none", "to_version": previous,
                  "new_previous_champion": further_back or "none"}
        with self._decision_run(f"rollback-v{current}-to-v{previous}", "rollback", "rolled-back", full_reason,
                                params, {}, params, parent_run_id) as run_id:
            self.client.set_registered_model_alias(self.name, a.champion, previous)
            if further_back:
                self.client.set_registered_model_alias(self.name, a.previous_champion, further_back)
            else:
                self.client.delete_registered_model_alias(self.name, a.previous_champion)
            if current:
                self.client.set_model_version_tag(self.name, current, TAG_ROLLED_BACK_RUN, run_id)
                self.client.set_model_version_tag(self.name, current, TAG_ROLLED_BACK_REASON, reason)
            self.client.set_model_version_tag(self.name, previous, TAG_RESTORED_RUN, run_id)
        log.info("%s rolled back: %s", self.name, full_reason)
        return previous

    # ---- internals -----------------------------------------------------------------------------------------

    def _version(self, version: str | int):
        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as e:
            raise RegistryError(f"No version {version} of registered model '{self.name}' in "
                                f"{self.cfg.registry_uri}: {e.message}") from None

    def _run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except MlflowException as e:
            raise RegistryError(f"Run '{run_id}' not found in {self.cfg.tracking_uri}: {e.message}") from None

    def _ensure_registered_model(self) -> None:
        try:
            self.client.create_registered_model(self.name, description="MedPLIB-style models trained by medplib")
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise

    def _model_source(self, run, artifact_path: str) -> tuple[str, str | None]:
        """(source URI, logged-model id) of the model a run logged at `artifact_path`."""
        run_id = run.info.run_id
        # MLflow 3 `log_model(name=...)` keeps the model as a LoggedModel outside the run's artifact folder.
        logged = self.client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{artifact_path}'")
        if logged:
            newest = max(logged, key=lambda m: m.creation_timestamp)
            if len(logged) > 1:
                log.warning("Run %s logged %d models named '%s'; registering the newest, %s", run_id, len(logged),
                            artifact_path, newest.model_id)
            return f"models:/{newest.model_id}", newest.model_id
        # A model folder logged as plain run artifacts (save_model + log_artifacts).
        files = {f.path for f in self.client.list_artifacts(run_id, artifact_path)}
        if f"{artifact_path}/MLmodel" in files:
            return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}", None
        raise RegistryError(f"Run {run_id} has no model at '{artifact_path}': no logged model of that name and no "
                            f"{artifact_path}/MLmodel among its artifacts. Log it with "
                            f"mlflow.pyfunc.log_model(name='{artifact_path}', ...)")

    @contextmanager
    def _decision_run(self, run_name: str, kind: str, label: str, reason: str, params: dict[str, Any],
                      metrics: dict[str, float | None], record: dict[str, Any],
                      parent_run_id: str | None) -> Iterator[str]:
        """A run recording one decision: RUNNING while the aliases move, then FINISHED (FAILED on error)."""
        tags = {"medplib.kind": kind, "medplib.decision": label, "medplib.reason": reason[:_MAX_RUN_TAG],
                "medplib.registered_model": self.name}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags).info.run_id
        status = "FAILED"
        try:
            now = int(time.time() * 1000)
            self.client.log_batch(run_id,
                                  metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
                                  params=[Param(k, str(v)) for k, v in params.items()])
            self.client.log_dict(run_id, {"kind": kind, "decision": label, "reason": reason, **record},
                                 "decision.json")
            yield run_id
            status = "FINISHED"
        finally:
            self.client.set_terminated(run_id, status=status)
