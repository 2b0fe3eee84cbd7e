"""Dataclass configs with named presets (`tiny`, `full`), YAML overrides and one validation step."""
from medplib.config.base import ConfigError, from_dict, to_dict
from medplib.config.presets import (
    Config, DataConfig, EvalConfig, ModelConfig, PRESETS, family_settings, family_stage_spec, load_config,
    with_stage_overrides,
)
from medplib.config.stages import StageSpec, TrainConfig, stage_spec
from medplib.config.tracking import TrackingConfig, load_tracking_config
from medplib.config.home import Home, resolve_home
from medplib.config.profile import Profile, load_profile
from medplib.config.context import RunContext

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "Home", "ModelConfig", "PRESETS", "Profile", "RunContext",
    "StageSpec", "TrackingConfig", "TrainConfig", "family_settings", "family_stage_spec", "from_dict", "load_config",
    "load_profile", "load_tracking_config",
    "resolve_home", "stage_spec", "to_dict", "with_stage_overrides",
]
