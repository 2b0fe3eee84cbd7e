"""The state folder: everything a run writes lives under MEDPLIB_HOME (default `.medplib/` in the repository)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def dvc_remote(self) -> Path:
        return self.root / "dvc-remote"

    @property
    def sources(self) -> Path:
        """Where generated sources (the synthetic MeCoVQA folder) are written before ingest."""
        return self.root / "sources"

    @property
    def reports(self) -> Path:
        """Validation Data Docs and other human-readable reports."""
        return self.root / "reports"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    @property
    def logs(self) -> Path:
        """Each command's full log (`<command>-<time>.log`) and the UIs' server logs."""
        return self.root / "logs"

    @property
    def ray_tmp(self) -> Path:
        return self.root / "ray"

    def ensure(self) -> "Home":
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def resolve_home(home: str | Path | None = None) -> Home:
    """`--home` wins, then MEDPLIB_HOME, then `.medplib/` in the repository (a source checkout), or in the current
    folder for an install without one (never inside site-packages)."""
    if home is None:
        checkout = (REPO_ROOT / "pyproject.toml").is_file()
        home = os.environ.get("MEDPLIB_HOME") or ((REPO_ROOT if checkout else Path.cwd()) / ".medplib")
    return Home(Path(home).expanduser().resolve())
