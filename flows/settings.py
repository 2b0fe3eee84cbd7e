"""What every flow turns its parameters into: the config, the state folder and the project folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medplib.config import Config, Home, load_config, resolve_home


@dataclass(frozen=True)
class StepInputs:
    cfg: Config
    home: Home
    project: Path

    @property
    def data_dir(self) -> Path:
        return self.project / "data"


def resolve(preset: str = "tiny", config: Path | None = None, home: Path | None = None,
            project: Path | None = None) -> StepInputs:
    """The preset with its YAML overrides, the state folder (`home`, MEDPLIB_HOME or `.medplib/`) and the project
    folder holding `data/` (default: the current folder)."""
    return StepInputs(cfg=load_config(preset, config), home=resolve_home(home).ensure(),
                      project=Path(project or Path.cwd()).resolve())
