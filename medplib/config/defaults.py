"""Where `mlflow.yaml` and `profiles/NAME.yaml` are read from: the project folder (`--project`, default the current
one) when it holds its own, else the copies packaged with medplib in `medplib/defaults/` (links to the repository's
top-level files in a checkout, the files themselves in an installed wheel). So a project folder overrides them, and
an install without `-e` still finds them."""
from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parents[1] / "defaults"
TRACKING_FILE = "mlflow.yaml"
PROFILES = "profiles"


def settings_dirs(project: Path | str | None, sub: str = "") -> list[Path]:
    """The folders to look in, in order: `<project>/<sub>` (when a project folder is given), then the packaged one."""
    return ([Path(project) / sub] if project is not None else []) + [PACKAGED / sub]


def settings_file(name: str, project: Path | str | None, sub: str = "") -> Path:
    """`<sub>/<name>` from the first folder of `settings_dirs` that holds it; the packaged path when none does."""
    return next((d / name for d in settings_dirs(project, sub) if (d / name).is_file()), PACKAGED / sub / name)
