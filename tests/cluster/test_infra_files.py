"""infra/ and profiles/ validated without Docker or Kubernetes: parsed, required fields present, images built from
infra/Dockerfile or named with a tag, every command one the repository really has, MLflow auth on in the cluster
profile, ports published on 127.0.0.1 only, no secret values."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from medplib.config.home import REPO_ROOT

INFRA = REPO_ROOT / "infra"
BUILT_IMAGES = {"medplib:cpu", "medplib:cuda"}  # what infra/Dockerfile builds (VARIANT=cpu|cuda)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _medplib_command_parses(argv: list[str]) -> None:
    from medplib_cli.main import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`medplib {' '.join(argv)}` is not a valid medplib command (exit {e.code})")


def test_dockerfile_builds_cpu_and_cuda_variants_from_the_lock():
    text = (INFRA / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and "FROM base-${VARIANT}" in text
    assert {"base-cpu", "base-cuda"} <= set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in src.split():
            assert (REPO_ROOT / part.rstrip("/")).exists(), f"Dockerfile copies {part}, which is not in the repo"
    assert "torch==2.13.0" in text and "-r requirements.lock" in text
    assert re.search(r"^USER (?!root)\S+$", text, re.M), "the image must not run as root"
    assert re.search(r'^ENTRYPOINT \["medplib"\]$', text, re.M)


def test_compose_services_images_commands_and_loopback_ports():
    compose = _docs(INFRA / "docker-compose.yml")[0]
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc, f"service {name} has no image"
        image = svc["image"]
        if image in BUILT_IMAGES:
            assert svc["build"]["dockerfile"] == "infra/Dockerfile" and (INFRA / svc["build"]["context"]).is_dir()
        else:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), \
                f"service {name}: image {image!r} must be pinned to a tag"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"service {name} publishes {port} beyond loopback"
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert str(value).startswith("${"), f"service {name}: {key} must come from the environment"
    mlflow = services["mlflow"]
    args = mlflow["command"]
    assert mlflow["entrypoint"] == ["mlflow"] and args[0] == "server"
    assert args[args.index("--app-name") + 1] == "basic-auth"  # auth on
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert "--serve-artifacts" in args and args[args.index("--artifacts-destination") + 1].startswith("s3://")
    assert services["prefect"]["command"][:2] == ["server", "start"]
    assert set(mlflow["depends_on"]) == {"postgres", "buckets"}


def test_rayjobs_one_per_stage_on_gpu_workers_running_real_commands():
    jobs = _docs(INFRA / "k8s" / "rayjobs.yaml")
    assert [j["kind"] for j in jobs] == ["RayJob"] * 4 and all(j["apiVersion"] == "ray.io/v1" for j in jobs)
    stages = []
    for job in jobs:
        *before, train = job["spec"]["entrypoint"].split(" && ")
        argv = shlex.split(train)
        assert argv[0] == "medplib"
        _medplib_command_parses(argv[1:])
        # the project folder on the shared volume; stage 1 pulls its recorded data version there first
        project = argv[argv.index("--project") + 1]
        assert project.startswith("/var/lib/medplib/")
        pull = [f"medplib data pull --profile cluster --project {project}"]
        assert before == (pull if argv[argv.index("--stage") + 1] == "1" else [])
        _medplib_command_parses(shlex.split(pull[0])[1:])
        stages.append(int(argv[argv.index("--stage") + 1]))
        assert argv[argv.index("--profile") + 1] == "cluster"
        cluster = job["spec"]["rayClusterSpec"]
        assert cluster["rayVersion"] == importlib.import_module("ray").__version__
        workers = cluster["workerGroupSpecs"][0]
        container = workers["template"]["spec"]["containers"][0]
        assert container["image"] in BUILT_IMAGES and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert workers["replicas"] == int(argv[argv.index("--workers") + 1]) == 4  # MedPLIB: 4 GPUs
        assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] in BUILT_IMAGES
    assert stages == [1, 2, 3, 4]


def test_k8s_services_run_mlflow_with_auth_and_prefect():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs(INFRA / "k8s" / "services.yaml")}
    assert {("Deployment", "mlflow"), ("Service", "mlflow"), ("Deployment", "prefect"), ("Service", "prefect"),
            ("PersistentVolumeClaim", "medplib-state")} <= set(docs)
    mlflow = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["image"] in BUILT_IMAGES and mlflow["command"] == ["mlflow"]
    assert mlflow["args"][mlflow["args"].index("--app-name") + 1] == "basic-auth"
    for name in ("mlflow", "prefect"):
        svc = docs[("Service", name)]["spec"]
        assert svc["type"] == "ClusterIP"  # not exposed outside the cluster by itself
        assert svc["selector"] == docs[("Deployment", name)]["spec"]["selector"]["matchLabels"]


def test_prefect_yaml_deploys_real_flows_with_real_parameters():
    spec = _docs(INFRA / "prefect.yaml")[0]
    assert spec["deployments"]
    for d in spec["deployments"]:
        path, name = d["entrypoint"].split(":")
        assert (REPO_ROOT / path).is_file(), d["entrypoint"]
        flow = getattr(importlib.import_module(path[:-3].replace("/", ".")), name)
        assert hasattr(flow, "fn") and hasattr(flow, "to_deployment"), f"{d['entrypoint']} is not a Prefect flow"
        accepted = set(flow.parameters.properties)
        assert set(d.get("parameters", {})) <= accepted, (d["name"], set(d.get("parameters", {})) - accepted)
        for s in d.get("schedules", []):
            assert len(s["cron"].split()) == 5
        assert d["work_pool"]["name"] == "medplib-pool"


def test_prefect_yaml_retrains_on_a_folder_that_changes_and_on_ingest_events():
    from pydantic import TypeAdapter
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.events.schemas.events import Resource

    from flows.events import DATA_INGESTED
    from medplib.data import readers

    spec = _docs(INFRA / "prefect.yaml")[0]
    deployments = {d["name"]: d for d in spec["deployments"]}
    for name in ("retrain-nightly", "retrain-on-data-change"):
        source = deployments[name]["parameters"]["source"]
        kind, _, folder = source.partition(":")
        assert readers.get(kind).takes_folder and folder.startswith("/var/lib/medplib/"), source  # not `synth`
    watched = deployments["retrain-on-data-change"]
    assert watched["parameters"]["only_if_data_changed"] is True
    (trigger,) = [TypeAdapter(DeploymentTriggerTypes).validate_python(t) for t in watched["triggers"]]
    # what `medplib data ingest` in the deployments' working directory (the pull step's) emits
    project = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert DATA_INGESTED in trigger.expect and trigger.match.matches(Resource(
        {"prefect.resource.id": "medplib.dataset.abc.dir", "medplib.project": project}))
    assert trigger.parameters == {"source": "{{ event.payload.source }}"}


def test_cluster_profile_turns_mlflow_auth_on_and_holds_no_secret():
    from medplib.config.profile import load_profile

    raw = (REPO_ROOT / "profiles" / "cluster.yaml").read_text(encoding="utf-8")
    assert not re.search(r"(?i)(password|secret|token)\s*:", raw)
    cluster = load_profile("cluster")
    assert cluster.mlflow.auth is True and cluster.mlflow.tracking_uri.startswith("http")
    assert cluster.dvc.url.startswith("s3://") and cluster.ray_address and cluster.prefect_api_url
    local = load_profile("local")
    assert local.mlflow.auth is False and local.ray_address is None and local.prefect_api_url is None
