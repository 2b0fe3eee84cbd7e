"""The top-level config and its named presets; YAML files override any key."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from medplib.config.base import ConfigError, from_dict, merge
from medplib.config.model import ModelConfig
from medplib.config.stages import TrainConfig, full_stages, stage_overrides_config, tiny_stages
from medplib.data.schema import MODALITIES

if TYPE_CHECKING:
    from medplib.config.stages import StageSpec
    from medplib.model.family import ModelFamily


@dataclass
class DataConfig:
    image_size: int = 64  # side of the synthetic phantoms
    synth_n: int = 1920  # synthetic images (each gives several QA samples; fewer and the tiny model memorises)
    synth_seed: int = 42
    # Held out of grounding training: their grounding questions form the zero-shot split.
    zeroshot_modalities: tuple[str, ...] = ("pet", "fundus")
    test_fraction: float = 0.2
    # Carved from train at ingest, by image (a hash of its pixels), for a source without a validation split of its own
    # (R2Gen's `val` is kept as it is): what the promotion gate and any selection read.
    val_fraction: float = 0.1
    max_image_pixels: int = 8192 * 8192

    def validate(self, prefix: str = "") -> None:
        for m in self.zeroshot_modalities:
            if m not in MODALITIES:
                raise ConfigError(f"Config key '{prefix}zeroshot_modalities' has {m!r}, not one of {list(MODALITIES)}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(f"Config key '{prefix}val_fraction' = {self.val_fraction} must be in [0, 0.5)")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"Config key '{prefix}test_fraction' = {self.test_fraction} must be in (0, 1)")
        if self.image_size < 16 or self.image_size > 1024:
            raise ConfigError(f"Config key '{prefix}image_size' = {self.image_size} must be in [16, 1024]")
        if self.synth_n < 1:
            raise ConfigError(f"Config key '{prefix}synth_n' = {self.synth_n} must be >= 1")


@dataclass
class EvalConfig:
    # Generation length per task when evaluated, over the task's own `max_new_tokens` (report: 60, R2Gen's IU X-Ray
    # setting; 100 for MIMIC-CXR as R2Gen has it). Keys are registered task names.
    max_new_tokens: dict[str, int] = field(default_factory=dict)

    def validate(self, prefix: str = "") -> None:
        from medplib import tasks  # the registry: a task module may add a task

        for name, length in self.max_new_tokens.items():
            if name not in tasks.names():
                raise ConfigError(f"Config key '{prefix}max_new_tokens' names {name!r}, not a registered task "
                                  f"({tasks.names()})")
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise ConfigError(f"Config key '{prefix}max_new_tokens.{name}' = {length!r} must be an integer >= 1")


@dataclass
class Config:
    preset: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Model families other than MedPLIB keep their own keys here, over their preset's defaults (`families:
    # {reclmis: {model: {...}, train: {stage2: {...}}}}`); the family checks them (`family_settings`).
    families: dict[str, dict] = field(default_factory=dict)

    def validate(self, prefix: str = "") -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"Config key '{prefix}preset' = {self.preset!r} is not one of {sorted(PRESETS)}")
        for name, section in self.families.items():
            if not isinstance(section, dict):
                raise ConfigError(f"Config key '{prefix}families.{name}' must be a mapping, got {section!r}")


PRESETS = {
    "tiny": lambda: Config(preset="tiny", data=DataConfig(), model=ModelConfig.tiny(),
                           train=TrainConfig.of(tiny_stages())),
    "full": lambda: Config(preset="full", data=DataConfig(image_size=336), model=ModelConfig.full(),
                           train=TrainConfig.of(full_stages())),
}


def with_stage_overrides(cfg: Config, overrides: dict[int, dict] | None,
                         family: "ModelFamily | None" = None) -> Config:
    """`cfg` with per-stage overrides ({3: {"epochs": 1}}, what `--epochs` and flows pass) folded into the stage plan
    of `family` (default MedPLIB's: `train`; another family's: `families.<name>.train`)."""
    if not overrides:
        return cfg
    folded = stage_overrides_config(overrides)
    if family is not None and family.settings is not None:
        folded = {"families": {family.name: folded}}
    return merge(cfg, folded)


def family_settings(cfg: Config, family: "ModelFamily") -> Any:
    """A family's own config section: its preset's defaults with `families.<name>` of `cfg` over them (keys checked
    by the family's dataclasses, errors naming `families.<name>.…`). MedPLIB's (no `settings`): `cfg` itself, whose
    `model` and `train` are MedPLIB's."""
    if family.settings is None:
        return cfg
    return merge(family.settings.preset(cfg.preset), cfg.families.get(family.name, {}),
                 prefix=f"families.{family.name}.")


def family_stage_spec(cfg: Config | str, family: "ModelFamily", stage: int,
                      overrides: dict | None = None) -> "StageSpec":
    """Stage `stage` of `family`'s plan in `cfg` (a Config, or a preset name), with optional overrides validated key
    by key."""
    from medplib.config.stages import stage_spec

    if isinstance(cfg, str):
        cfg = load_config(cfg)
    if family.settings is None:
        return stage_spec(cfg, stage, overrides)
    specs = family_settings(cfg, family).train.stages()
    if stage not in specs:
        raise ConfigError(f"Stage {stage} does not exist; model family {family.name!r} has stages {sorted(specs)}")
    return merge(specs[stage], overrides or {}, prefix=f"families.{family.name}.train.stage{stage}.")


def load_config(preset: str = "tiny", overrides: Path | dict | None = None) -> Config:
    """The named preset with optional overrides (a YAML file or a dict), validated as a whole."""
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    if overrides is None:
        return merge(cfg, {})
    if isinstance(overrides, (str, Path)):
        path = Path(overrides)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"Config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top, got {type(data).__name__}")
        try:
            return merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return merge(cfg, overrides)
