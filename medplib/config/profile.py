"""Profiles (`profiles/<name>.yaml`): where the services are. `local` (the default) keeps everything on this machine;
`cluster` points MLflow, the DVC remote, Ray and Prefect at servers. Same code, a different profile.

Secrets are never in a profile: a value may name an environment variable, `${VAR}` or `${VAR:-default}`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from medplib.config.base import ConfigError, from_dict
from medplib.config.defaults import PROFILES, settings_dirs, settings_file
PROFILE_ENV = "MEDPLIB_PROFILE"  # read by the command line only (medplib_cli.main.profile_name)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class MlflowProfile:
    tracking_uri: Optional[str] = None  # None: mlflow.yaml's
    registry_uri: Optional[str] = None
    artifact_location: Optional[str] = None
    auth: bool = False  # the server runs MLflow's basic-auth app: credentials from the environment


@dataclass
class DvcProfile:
    url: str = "{home}/dvc-remote"
    endpoint_url: Optional[str] = None  # S3-compatible stores (MinIO, moto, …)


@dataclass
class Profile:
    name: str = "local"
    mlflow: MlflowProfile = field(default_factory=MlflowProfile)
    dvc: DvcProfile = field(default_factory=DvcProfile)
    ray_address: Optional[str] = None  # None: a local Ray per training job
    prefect_api_url: Optional[str] = None  # None: Prefect's ephemeral API

    def __post_init__(self) -> None:
        # "${VAR:-}" with VAR unset expands to "": the same as leaving the key null
        self.ray_address = self.ray_address or None
        self.prefect_api_url = self.prefect_api_url or None

    def validate(self, prefix: str = "") -> None:
        if self.prefect_api_url is not None and not self.prefect_api_url.startswith(("http://", "https://")):
            raise ConfigError(f"Config key '{prefix}prefect_api_url' = {self.prefect_api_url!r} must be a URL "
                              "(http://HOST:PORT/api)")


def _expand(value, where: str):
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is None:
            raise ConfigError(f"Config key '{where}' needs the environment variable {var} (set it, or give a "
                              f"default as ${{{var}:-…}})")
        return default

    return _VAR.sub(sub, value)


def load_profile(name: str = "local", directory: Path | None = None, project: Path | str | None = None) -> Profile:
    """The named profile with `${VAR}` references expanded: `<directory>/NAME.yaml`, or by default
    `<project>/profiles/NAME.yaml` when the project folder has it, else the packaged one (medplib.config.defaults).
    Which profile a command runs with is decided once, at its entry (the command line: --profile, else
    $MEDPLIB_PROFILE, else `local`), and passed down in the RunContext."""
    dirs = [Path(directory)] if directory else settings_dirs(project, PROFILES)
    path = dirs[0] / f"{name}.yaml" if directory else settings_file(f"{name}.yaml", project, PROFILES)
    if not path.is_file():
        known = sorted({p.stem for d in dirs for p in d.glob("*.yaml")})
        raise ConfigError(f"Profile {name!r} does not exist (looked in {', '.join(map(str, dirs))}); "
                          f"profiles: {known}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Profile file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Profile file {path} must hold a mapping at the top")
    try:
        return from_dict(Profile, {"name": name, **_expand(data, "")})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
