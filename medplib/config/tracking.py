"""`mlflow.yaml`: tracking and registry URIs, names, aliases and promotion-gate thresholds.

The registered-model name and the gate's primary metric are the model family's (medplib.model.family) unless
`mlflow.yaml` sets them: `for_family` fills in what the file leaves unset.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from medplib.config.base import ConfigError, from_dict
from medplib.config.defaults import TRACKING_FILE, settings_file
from medplib.config.home import Home

if TYPE_CHECKING:
    from medplib.config.profile import Profile
    from medplib.model.family import ModelFamily


@dataclass
class Aliases:
    champion: str = "champion"
    challenger: str = "challenger"
    previous_champion: str = "previous-champion"


@dataclass
class GateConfig:
    """The promotion gate (medplib.registry.gate). A challenger is promoted over the champion only when, on the same
    eval data: the lower end of the `confidence` interval of a paired bootstrap of the primary metric's delta
    (`bootstrap_samples` resamples of the samples both were scored on) lies above `min_delta`; no guard metric drops
    by more than its tolerance; no modality's primary metric drops by more than `max_modality_regression`. The first
    champion must reach every `floor`."""

    primary_metric: Optional[str] = None  # None: the model family's gate metric
    min_delta: float = 0.0
    max_modality_regression: float = 0.05
    guard_tolerance: float = 0.02  # how far each guard metric may drop, as a share of its range (CIDEr's is 10)
    guards: Optional[dict[str, float]] = None  # metric → its own tolerance; None: every task's headline metric
    floor: dict[str, float] = field(default_factory=dict)  # metric → the minimum a first champion must reach
    bootstrap_samples: int = 1000  # 0 judges the point delta alone (no interval)
    confidence: float = 0.9
    seed: int = 0

    def guard_metrics(self) -> dict[str, float]:
        """Metric → tolerance of every guard: `guards`, or each registered task's headline metric (the primary
        excepted) at `guard_tolerance` times the metric's range (0.02 of a [0, 1] metric; 0.2 of CIDEr's [0, 10])."""
        from medplib import tasks

        if self.guards is not None:
            return {m: float(t) for m, t in self.guards.items() if m != self.primary_metric}
        return {m: self.guard_tolerance * tasks.metric_range(m) for m in tasks.headline_metrics()
                if m != self.primary_metric}

    def validate(self, prefix: str = "") -> None:
        from medplib import tasks  # the headline metrics are the registered tasks' summary keys

        known = tasks.summary_keys()
        if self.primary_metric is not None and self.primary_metric not in known:
            raise ConfigError(f"Config key '{prefix}primary_metric' = {self.primary_metric!r} is no task's headline "
                              f"metric; choose one of {sorted(known)}")
        if self.min_delta < 0:
            raise ConfigError(f"Config key '{prefix}min_delta' = {self.min_delta} must be >= 0")
        for key, value in (("max_modality_regression", self.max_modality_regression),
                           ("guard_tolerance", self.guard_tolerance)):
            if not 0 <= value <= 1:
                raise ConfigError(f"Config key '{prefix}{key}' = {value} must be in [0, 1]")
        for key, table in (("guards", self.guards or {}), ("floor", self.floor)):
            for metric, value in table.items():
                if metric not in known:
                    raise ConfigError(f"Config key '{prefix}{key}.{metric}' names no task's headline metric; "
                                      f"choose from {sorted(known)}")
                top = tasks.metric_range(metric)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
                    raise ConfigError(f"Config key '{prefix}{key}.{metric}' = {value!r} must be a number in "
                                      f"[0, {top:g}]")
        if self.bootstrap_samples < 0:
            raise ConfigError(f"Config key '{prefix}bootstrap_samples' = {self.bootstrap_samples} must be >= 0 "
                              "(0: no bootstrap)")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"Config key '{prefix}confidence' = {self.confidence} must be in [0.5, 1)")


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///{home}/mlflow.db"
    registry_uri: str = "sqlite:///{home}/mlflow.db"
    artifact_location: str = "{home}/mlartifacts"
    experiment: str = "medplib"
    registered_model: Optional[str] = None  # None: the model family's registered-model name
    aliases: Aliases = field(default_factory=Aliases)
    gate: GateConfig = field(default_factory=GateConfig)
    auth: bool = False  # the server runs MLflow's basic-auth app (set by the profile)

    def resolved(self, home: "Home | Path | str") -> "TrackingConfig":
        """URIs with `{home}` replaced by the absolute state folder."""
        # A Home or a folder; not getattr(home, "root"): every Path has `.root` ("/").
        h = str(Path(home.root if isinstance(home, Home) else home).resolve())
        return TrackingConfig(
            tracking_uri=self.tracking_uri.replace("{home}", h), registry_uri=self.registry_uri.replace("{home}", h),
            artifact_location=self.artifact_location.replace("{home}", h), experiment=self.experiment,
            registered_model=self.registered_model, aliases=self.aliases, gate=self.gate, auth=self.auth,
        )

    def for_family(self, family: "str | ModelFamily" = "medplib") -> "TrackingConfig":
        """These settings with what `mlflow.yaml` leaves unset taken from the model family: its registered-model
        name and its gate metric (which must be a registered task's headline metric). A family evaluated on some
        tasks only (`ModelFamily.tasks`) keeps the floors on those tasks' metrics alone, and the family's own floors
        apply where the file sets none for the metric."""
        from medplib.model.family import get_family

        f = get_family(family) if isinstance(family, str) else family
        gate = self.gate
        if f.tasks is not None:  # a floor on a metric the family is never evaluated on could never be met
            from medplib import tasks

            measured = {key for t in tasks.resolve(f.tasks) for key in tasks.get(t).summary}
            gate = replace(gate, floor={m: v for m, v in gate.floor.items() if m in measured})
        if f.floor:
            gate = replace(gate, floor={**f.floor, **gate.floor})
        if gate.primary_metric is None:
            gate = replace(gate, primary_metric=f.gate_metric)
            try:
                gate.validate("gate.")
            except ConfigError as e:
                raise ConfigError(f"Model family {f.name!r}: gate_metric {f.gate_metric!r} cannot be the gate's "
                                  f"primary metric ({e})") from None
        return replace(self, registered_model=self.registered_model or f.registered_model, gate=gate)


def load_tracking_config(path: Path | None = None, *, profile: "Profile | None" = None,
                         family: "str | ModelFamily | None" = "medplib",
                         project: Path | str | None = None) -> TrackingConfig:
    """Read `mlflow.yaml` (`path`, else the project folder's, else the packaged one: medplib.config.defaults;
    unknown keys are errors naming the key), apply the profile's MLflow URIs and auth (default: the `local`
    profile), and fill in the model family's registered-model name and gate metric where the file sets none
    (`family=None`: leave them unset). A command gets this once, in its RunContext."""
    from medplib.config.profile import load_profile

    path = Path(path) if path else settings_file(TRACKING_FILE, project)
    data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}
    try:
        cfg = from_dict(TrackingConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    m = (profile or load_profile("local", project=project)).mlflow
    for key in ("tracking_uri", "registry_uri", "artifact_location"):
        if getattr(m, key) is not None:
            setattr(cfg, key, getattr(m, key))
    cfg.auth = m.auth
    return cfg if family is None else cfg.for_family(family)
