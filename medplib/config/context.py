"""One resolved run context per command: the config (stage specs included), the state folder, the project folder,
the profile, the tracking settings for the model family, and the data version once it is known.

A command resolves it once at its entry (the command line, or the top of a flow, whose parameters stay plain for
Prefect) and passes it down; nothing below re-reads config files, `mlflow.yaml`, profiles or the environment.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from medplib.config.home import Home, resolve_home
from medplib.config.presets import Config, load_config, with_stage_overrides
from medplib.config.profile import Profile, load_profile
from medplib.config.tracking import TrackingConfig, load_tracking_config

if TYPE_CHECKING:
    from medplib.model.family import ModelFamily


@dataclass(frozen=True)
class RunContext:
    cfg: Config
    home: Home
    project: Path  # the folder holding data/, data.dvc and .dvc/
    profile: Profile
    settings: TrackingConfig  # mlflow.yaml with the profile's MLflow URIs, resolved against `home`, as the file says
    model: str = "medplib"  # the model family (--model NAME)
    data_version: str | None = None  # the DVC version of data/, once ingested or read
    # where evaluation, publishing and predictions run (--device auto|cpu|cuda[:N]; medplib.device resolves it where
    # a model is loaded). Training places itself: its Ray workers use a GPU when the cluster has one.
    device: str = "auto"

    @property
    def data_dir(self) -> Path:
        return self.project / "data"

    @cached_property
    def tracking(self) -> TrackingConfig:
        """The tracking settings of this run: `settings` with the family's registered-model name and gate metric
        where `mlflow.yaml` sets none. Filled on first use, as that imports the family's module (the model code): a
        command that never touches MLflow (`medplib data status`) does not pay for it."""
        return self.settings.for_family(self.family)

    @property
    def family(self) -> "ModelFamily":
        from medplib.model.family import get_family

        return get_family(self.model)

    def dataset(self) -> dict | None:
        """The data version as an MLflow dataset input (`medplib.data.versioning.dataset_record`); None before one is
        known."""
        if not self.data_version:
            return None
        from medplib.data.versioning import dataset_record

        return dataset_record(self.project, self.home, self.data_version, self.profile.dvc)

    def with_data_version(self, version: str | None) -> "RunContext":
        return replace(self, data_version=version)

    def with_stage_overrides(self, overrides: dict[int, dict] | None) -> "RunContext":
        """This context with per-stage overrides ({3: {"epochs": 1}}) folded into the config's stage specs."""
        return replace(self, cfg=with_stage_overrides(self.cfg, overrides, self.family)) if overrides else self

    @classmethod
    def resolve(cls, preset: str = "tiny", config: Path | str | dict | Config | None = None,
                home: Home | Path | str | None = None, project: Path | str | None = None,
                profile: Profile | str = "local", model: str = "medplib", tracking_file: Path | None = None,
                data_version: str | None = None, device: str = "auto") -> "RunContext":
        """Resolve everything a command needs, once: `preset` with `config` (a YAML file, a dict of overrides or a
        ready Config), the state folder (`home`, else MEDPLIB_HOME, else `.medplib/`, created), the project folder
        (default: the current one), the named profile and `mlflow.yaml` (or `tracking_file`) for family `model`, both
        the project folder's when it has them, else the packaged ones (medplib.config.defaults);
        `device` where models are evaluated and served."""
        cfg = config if isinstance(config, Config) else load_config(preset, config)
        h = (home if isinstance(home, Home) else resolve_home(home)).ensure()
        folder = Path(project or Path.cwd()).resolve()
        prof = profile if isinstance(profile, Profile) else load_profile(profile, project=folder)
        settings = load_tracking_config(tracking_file, profile=prof, family=None, project=folder).resolved(h)
        return cls(cfg=cfg, home=h, project=folder, profile=prof, settings=settings, model=model,
                   data_version=data_version, device=device)
