"""`mlflow.yaml`: tracking and registry URIs, names, aliases and promotion-gate thresholds."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medplib.config.base import ConfigError, from_dict
from medplib.config.home import Home

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "mlflow.yaml"


@dataclass
class Aliases:
    champion: str = "champion"
    challenger: str = "challenger"
    previous_champion: str = "previous-champion"


@dataclass
class GateConfig:
    primary_metric: str = "grounding_mdice"
    min_delta: float = 0.0
    max_modality_regression: float = 0.05

    def validate(self, prefix: str = "") -> None:
        from medplib import tasks  # the headline metrics are the registered tasks' summary keys

        if self.primary_metric not in tasks.summary_keys():
            raise ConfigError(f"Config key '{prefix}primary_metric' = {self.primary_metric!r} is no task's headline "
                              f"metric; choose one of {sorted(tasks.summary_keys())}")
        if self.min_delta < 0:
            raise ConfigError(f"Config key '{prefix}min_delta' = {self.min_delta} must be >= 0")
        if not 0 <= self.max_modality_regression <= 1:
            raise ConfigError(f"Config key '{prefix}max_modality_regression' = {self.max_modality_regression} "
                              "must be in [0, 1]")


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///{home}/mlflow.db"
    registry_uri: str = "sqlite:///{home}/mlflow.db"
    artifact_location: str = "{home}/mlartifacts"
    experiment: str = "medplib"
    registered_model: str = "medplib"
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


def load_tracking_config(path: Path | None = None) -> TrackingConfig:
    """Read `mlflow.yaml` (the repository's by default; unknown keys are errors naming the key), then apply the
    active profile's MLflow URIs and auth (medplib.config.profile)."""
    from medplib.config.profile import load_profile

    path = Path(path) if path else DEFAULT_FILE
    data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}
    try:
        cfg = from_dict(TrackingConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    m = load_profile().mlflow
    for key in ("tracking_uri", "registry_uri", "artifact_location"):
        if getattr(m, key) is not None:
            setattr(cfg, key, getattr(m, key))
    cfg.auth = m.auth
    return cfg
