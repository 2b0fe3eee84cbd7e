"""Dataclass configs with named presets (`tiny`, `full`), YAML overrides and one validation step."""
from medplib.config.base import ConfigError, from_dict, to_dict
from medplib.config.presets import Config, DataConfig, ModelConfig, PRESETS, load_config
from medplib.config.tracking import TrackingConfig, load_tracking_config
from medplib.config.home import Home, resolve_home

__all__ = [
    "Config", "ConfigError", "DataConfig", "Home", "ModelConfig", "PRESETS", "TrackingConfig",
    "from_dict", "load_config", "load_tracking_config", "resolve_home", "to_dict",
]
