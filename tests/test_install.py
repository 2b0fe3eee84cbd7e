"""An install without `-e` works: `pip install` of the project into a new virtualenv (no network, no dependencies:
they come from this environment), then `medplib` from a folder outside the repository finds its profiles and
`mlflow.yaml` (the project folder's, else the packaged ones) and keeps its state in that folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from medplib.config.home import REPO_ROOT

pytestmark = pytest.mark.integration

# what a build of the project reads (pyproject.toml names the packages and the README; medplib/defaults links to
# mlflow.yaml and profiles/)
SOURCES = ("pyproject.toml", "README.md", "medplib", "medplib_cli", "flows", "mlflow.yaml", "profiles")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # nothing may lead back to the repository: no PYTHONPATH, no state folder or profile from the environment
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDPLIB_HOME", "MEDPLIB_PROFILE")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_an_install_without_editable_mode_finds_its_profiles_and_mlflow_yaml(tmp_path: Path):
    src = tmp_path / "src"  # a copy: a build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO_ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The dependencies (and pip, setuptools) are this environment's: `--system-site-packages` would give the base
    # interpreter's, not this virtualenv's. A path line in a .pth adds the folder alone, not this environment's own
    # editable install of medplib (that is a .pth of its own, which is not read).
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    pip = _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                str(src)], tmp_path)
    assert pip.returncode == 0, pip.stderr

    installed = _run([str(python), "-c", "import medplib, pathlib; print(pathlib.Path(medplib.__file__).parent)"],
                     tmp_path)
    package = Path(installed.stdout.strip())
    assert package.is_relative_to(site) and not (package / "defaults" / "profiles").is_symlink()
    for name in ("mlflow.yaml", "profiles/local.yaml", "profiles/cluster.yaml"):
        assert (package / "defaults" / name).read_bytes() == (REPO_ROOT / name).read_bytes(), name

    project = tmp_path / "project"  # a project folder outside the repository, with one profile of its own
    (project / "profiles").mkdir(parents=True)
    (project / "profiles" / "edge.yaml").write_text('dvc:\n  url: "/srv/edge-remote"\n')
    medplib = str(venv / "bin" / "medplib")
    for profile in ("cluster", "edge"):  # packaged, the project's
        p = _run([medplib, "--profile", profile, "data", "status", "--json"], project)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == {"version": None, "in_sync": False, "pushed": False,
                                        "data_dir": str(project / "data")}
    assert (project / ".medplib").is_dir()  # the state folder: here, not inside site-packages
    p = _run([medplib, "--profile", "staging", "data", "status"], project)
    assert p.returncode == 2
    assert (f"Profile 'staging' does not exist (looked in {project / 'profiles'}, {package / 'defaults' / 'profiles'}"
            "); profiles: ['cluster', 'edge', 'local']") in p.stderr
