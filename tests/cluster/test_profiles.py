"""Profiles switch where the services are (MLflow, DVC remote, Ray, Prefect) with the same code; secrets come only
from the environment."""
from __future__ import annotations

from pathlib import Path

import pytest

from medplib.config import ConfigError, RunContext, load_tracking_config
from medplib.config.profile import PROFILE_ENV, load_profile


@pytest.fixture
def cluster_env(monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)  # the profile is passed down, never read from here
    for var in ("MEDPLIB_MLFLOW_URI", "MEDPLIB_DVC_REMOTE", "MEDPLIB_S3_ENDPOINT", "MEDPLIB_RAY_ADDRESS",
                "PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_local_profile_is_mlflow_yaml_and_the_state_folder(cluster_env, home):
    from medplib.data.versioning import remote_config

    ctx = RunContext.resolve(home=home)
    assert ctx.profile.name == "local" and ctx.tracking == load_tracking_config().resolved(home)
    assert ctx.tracking.tracking_uri == f"sqlite:///{home.root.resolve()}/mlflow.db" and ctx.tracking.auth is False
    assert remote_config(home, ctx.profile.dvc) == remote_config(home) == {"url": str(home.dvc_remote)}
    assert ctx.profile.ray_address is None
    cluster_env.setenv("MEDPLIB_RAY_ADDRESS", "127.0.0.1:6380")  # a Ray already running on this machine
    assert RunContext.resolve(home=home).profile.ray_address == "127.0.0.1:6380"


def test_cluster_profile_switches_every_service(cluster_env, home):
    from medplib.data.versioning import remote_config

    cluster_env.setenv("MEDPLIB_MLFLOW_URI", "http://mlflow.internal:5000")
    ctx = RunContext.resolve(home=home, profile="cluster")
    t = ctx.tracking
    assert t.tracking_uri == t.registry_uri == "http://mlflow.internal:5000" and t.auth is True
    assert t.artifact_location == "mlflow-artifacts:/medplib"
    assert remote_config(home, ctx.profile.dvc) == {"url": "s3://medplib-data/dvc",
                                                    "endpointurl": "http://127.0.0.1:9000"}
    p = ctx.profile
    assert p.ray_address == "ray://127.0.0.1:10001" and p.prefect_api_url == "http://127.0.0.1:4200/api"


def test_auth_needs_credentials_from_the_environment(cluster_env, home):
    from medplib.registry import Registry, RegistryError

    cluster = load_profile("cluster")
    with pytest.raises(RegistryError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not set"):
        Registry(load_tracking_config(profile=cluster).resolved(home))
    cluster_env.setenv("MLFLOW_TRACKING_USERNAME", "medplib")
    with pytest.raises(RegistryError, match="MLFLOW_TRACKING_PASSWORD is not set"):
        Registry(load_tracking_config(profile=cluster).resolved(home))


def test_cli_profile_option_sets_prefect_and_names_bad_profiles(cluster_env, capsys):
    import os

    from medplib_cli.main import apply_profile, main, profile_name

    assert apply_profile("cluster").name == "cluster"
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert PROFILE_ENV not in os.environ  # the profile travels in the RunContext, not through the environment
    assert profile_name(None) == "local" and profile_name("cluster") == "cluster"
    cluster_env.setenv(PROFILE_ENV, "cluster")
    assert profile_name(None) == "cluster" and profile_name("local") == "local"
    assert main(["data", "status", "--profile", "staging"]) == 2
    assert "Profile 'staging' does not exist" in capsys.readouterr().err


def test_a_missing_environment_variable_is_named_with_file_and_key(tmp_path: Path):
    (tmp_path / "edge.yaml").write_text("mlflow:\n  tracking_uri: \"${EDGE_MLFLOW_URI}\"\n")
    with pytest.raises(ConfigError, match=r"edge.yaml: Config key 'mlflow.tracking_uri' needs the environment "
                                          r"variable EDGE_MLFLOW_URI"):
        load_profile("edge", tmp_path)
    (tmp_path / "typo.yaml").write_text("mlfow: {}\n")
    with pytest.raises(ConfigError, match="typo.yaml: .*mlfow"):
        load_profile("typo", tmp_path)


def test_the_project_folder_s_settings_come_before_the_packaged_ones(tmp_path: Path):
    """`profiles/NAME.yaml` and `mlflow.yaml` of the project folder win; what it lacks comes from the copies packaged
    in medplib/defaults/ (what an install without -e has)."""
    from medplib.config.defaults import PACKAGED

    assert (PACKAGED / "mlflow.yaml").is_file() and (PACKAGED / "profiles" / "local.yaml").is_file()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "local.yaml").write_text('dvc:\n  url: "/srv/project-remote"\n')
    (tmp_path / "mlflow.yaml").write_text("experiment: project-experiment\n")
    assert load_profile("local", project=tmp_path).dvc.url == "/srv/project-remote"
    assert load_profile("local").dvc.url == "{home}/dvc-remote"  # no project folder: the packaged profile
    assert load_profile("cluster", project=tmp_path).ray_address  # the project has none: the packaged one
    assert load_tracking_config(project=tmp_path).experiment == "project-experiment"
    assert load_tracking_config(project=tmp_path / "elsewhere").experiment == "medplib"
    ctx = RunContext.resolve(home=tmp_path / "home", project=tmp_path)
    assert ctx.profile.dvc.url == "/srv/project-remote" and ctx.tracking.experiment == "project-experiment"
    with pytest.raises(ConfigError, match=r"Profile 'staging' does not exist \(looked in .*/profiles, "
                                          r".*/medplib/defaults/profiles\); profiles: \['cluster', 'local'\]"):
        load_profile("staging", project=tmp_path)
