"""Run one training stage end to end on the driver: inputs, the Ray job, MLflow child run, outputs.

Stage outputs are HF-style folders under `<home>/models/stage<N>` (config + safetensors + tokenizer, LoRA merged),
which the next stage loads. What a stage starts from is the model family's *stage plan* (`ModelFamily.plan`, a
`StagePlan`): MedPLIB's II from I; III from II; IV from II with experts from III (0) and II (1).
"""
from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from medplib.config import Config, Home, RunContext, TrackingConfig, family_settings, family_stage_spec, to_dict
from medplib.data.ingest import verify_data
from medplib.data.torch_dataset import read_records, strip_paths
from medplib.data.versioning import read_version
from medplib.train.launcher import run_stage
from medplib.config.stages import StageSpec
from medplib.train.worker import LoopConfig

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: int
    name: str
    out_dir: Path
    seconds: float
    history: list[dict] = field(default_factory=list)
    mlflow_run_id: str | None = None
    skipped: str | None = None  # why the stage was not trained (its folder holds what the next stage starts from)

    @property
    def first_loss(self) -> float | None:
        """The mean loss of the first tenth of the logged steps (None for a skipped stage)."""
        k = max(1, len(self.history) // 10)
        return sum(h["loss"] for h in self.history[:k]) / k if self.history else None

    @property
    def last_loss(self) -> float | None:
        k = max(1, len(self.history) // 10)
        return sum(h["loss"] for h in self.history[-k:]) / k if self.history else None

    def to_dict(self) -> dict:
        return {"stage": self.stage, "name": self.name, "out_dir": str(self.out_dir), "seconds": round(self.seconds, 1),
                "steps": self.history[-1]["step"] if self.history else 0, "first_loss": self.first_loss,
                "last_loss": self.last_loss, "mlflow_run_id": self.mlflow_run_id, "skipped": self.skipped}


def stage_dir(home: Home, stage: int | str, workspace: str | None = None) -> Path:
    """Where a stage's output lives: `<home>/models/stage<N>`, or `<home>/models/<workspace>/stage<N>` for a
    pipeline run (each run its own folder, so two pipelines on one home never overwrite each other's stages)."""
    root = home.root / "models" / workspace if workspace else home.root / "models"
    return root / (f"stage{stage}" if isinstance(stage, int) else stage)


VISION_PRETRAIN_FILE = "vision_pretrain.json"  # in the initial model's folder: how its tower was pretrained


def build_init_model(cfg: Config, data_dir: Path, out: Path, seed: int = 42) -> Path:
    """The model stage I starts from: parts with local weights in the config are loaded (full preset), the rest
    is seeded random init; without a tokenizer folder a BPE is trained on the train split's text (tiny), and with
    `model.vision.pretrain_epochs` a random vision tower is pretrained on the train split's captions (tiny)."""
    from medplib.model.loaders import build_model, load_tokenizer

    if cfg.preset == "full":
        cfg.model.require_weights()
    texts = None
    if not (cfg.model.llm.tokenizer or cfg.model.llm.weights):
        texts = [t["value"] for r in read_records(data_dir) if r.split == "train"
                 for t in strip_paths(r.conversations)[0]]
    torch.manual_seed(seed)
    model = build_model(cfg.model, load_tokenizer(cfg.model, texts))
    pretrained = None
    if cfg.model.vision.pretrain_epochs and not model.loaded["vision"]:
        from medplib.train.vision_pretrain import pretrain_vision

        pretrained = pretrain_vision(model, data_dir, seed=seed)
    model.save_pretrained(out)
    if pretrained is not None:
        (out / VISION_PRETRAIN_FILE).write_text(json.dumps(pretrained.to_dict(), indent=1))
    else:
        (out / VISION_PRETRAIN_FILE).unlink(missing_ok=True)
    return out


def resolve_start(value: str | None, ctx: RunContext) -> Path | None:
    """`--from`: a model folder, or an MLflow run id whose `model/` artifact is downloaded into the state folder."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.exists():
        return path.resolve()
    if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        from mlflow.artifacts import download_artifacts

        dst = ctx.home.root / "downloads" / value
        download_artifacts(run_id=value, artifact_path="model", dst_path=str(dst),
                           tracking_uri=ctx.tracking.tracking_uri)
        return dst / "model"
    raise FileNotFoundError(f"--from {value!r} is neither a model folder nor an MLflow run id")


def stage_inputs(stage: int, home: Home, base: Path | None,
                 workspace: str | None = None) -> tuple[Path, Path | None]:
    """Default inputs of a stage from the state folder; `base` overrides the model it starts from."""
    d = lambda s: stage_dir(home, s, workspace)  # noqa: E731
    default = {1: d("init"), 2: d(1), 3: d(2), 4: d(2)}
    start = Path(base) if base else default[stage]
    grounding = d(3) if stage == 4 else None
    for p in (start, grounding):
        if p is not None and not (p / "config.json").exists():
            raise FileNotFoundError(f"Stage {stage} starts from {p}, which holds no saved model: "
                                    f"run the earlier stage first (medplib train --stage {max(1, stage - 1)})")
    return start, grounding


class StagePlan(Protocol):
    """The driver's side of a family's stages: make what stage `stage` starts from (the initial model before the
    first) and say it as the recipe's config beside its spec and data ({"base": folder, …}; also logged); or, for a
    stage with nothing to train on the data, skip it: leave what the next stage starts from in its folder and say
    why (None: train it)."""

    def prepare(self, stage: int, spec: StageSpec, ctx: RunContext, base: Path | None,
                workspace: str | None) -> dict[str, str | None]: ...

    def skip(self, stage: int, spec: StageSpec, ctx: RunContext, base: Path | None,
             workspace: str | None) -> str | None: ...


def train_records(data_dir: Path, tasks: tuple[str, ...]) -> int:
    """How many train-split records of `tasks` (names or groups) `data_dir` holds: a stage's data."""
    from medplib.tasks import resolve

    chosen = resolve(tasks)
    return sum(1 for r in read_records(data_dir) if r.split == "train" and r.task in chosen)


class MedPLIBPlan:
    """MedPLIB's stages I-IV: I from the initial model (`build_init_model`), II from I, III from II, IV from II with
    the grounding expert from III. Stage I is skipped when the data has no alignment records (a real MeCoVQA
    download ships no caption files) and the LLaVA weights bring their trained projector."""

    def prepare(self, stage: int, spec: StageSpec, ctx: RunContext, base: Path | None,
                workspace: str | None) -> dict[str, str | None]:
        if stage == 1:
            build_init_model(ctx.cfg, ctx.data_dir, stage_dir(ctx.home, "init", workspace), seed=spec.seed)
        start, grounding = stage_inputs(stage, ctx.home, base, workspace)
        return {"base": str(start), "grounding": str(grounding) if grounding else None}

    def skip(self, stage: int, spec: StageSpec, ctx: RunContext, base: Path | None,
             workspace: str | None) -> str | None:
        if stage != 1 or base is not None or train_records(ctx.data_dir, spec.tasks):
            return None
        from medplib.model.loaders import has_aligned_projector

        llava = ctx.cfg.model.llm.weights
        if not (llava and has_aligned_projector(llava)):
            why = f"model.llm.weights {llava} has no projector" if llava else "model.llm.weights is unset"
            raise ValueError(f"Stage 1 ({spec.name}) has no train records of tasks {list(spec.tasks)} in "
                             f"{ctx.data_dir}, and it cannot be skipped: the projector it aligns is not pretrained "
                             f"({why}). Add caption (alignment) records, or start from LLaVA-1.5 weights")
        out = build_init_model(ctx.cfg, ctx.data_dir, stage_dir(ctx.home, 1, workspace), seed=spec.seed)
        (out / "history.json").write_text("[]")  # no steps (a reused stage folder may hold an earlier run's)
        return (f"no train records of tasks {list(spec.tasks)} in the data (a MeCoVQA download ships no caption "
                f"files), and LLaVA-1.5's projector ({llava}) is already aligned: stage 2 starts from the initial "
                "model")


def stage_plan(path: str) -> StagePlan:
    """The stage plan a family names ("module:Class")."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)()


TAG_SKIPPED = "medplib.stage_skipped"  # on a stage's MLflow run: why it was not trained


def _start_mlflow_run(t: TrackingConfig, spec: StageSpec, cfg: Config, data_version: str | None,
                      parent_run_id: str | None, inputs: dict, model_config: object,
                      family: str, dataset: dict | None = None, skipped: str | None = None) -> tuple[str, str]:
    from medplib.registry import Registry, log_dataset

    registry = Registry(t)  # one get-or-create of the experiment, safe when another process creates it first
    client, exp_id = registry.client, registry.experiment_id()
    tags = {"medplib.stage": str(spec.stage), "medplib.stage_name": spec.name, "medplib.preset": cfg.preset,
            "medplib.data_version": data_version or "unversioned", "medplib.model_family": family}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if skipped:
        tags[TAG_SKIPPED] = skipped
    run = client.create_run(exp_id, run_name=f"stage{spec.stage}-{spec.name}-{int(time.time())}", tags=tags)
    flat = _flatten({"stage": to_dict(spec), "model": to_dict(model_config), "inputs": inputs})
    from mlflow.entities import Param

    items = list(flat.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
    log_dataset(client, run.info.run_id, dataset, "training")
    return run.info.run_id, t.tracking_uri


def _log_vision_pretraining(tracking_uri: str, run_id: str, base: str | None) -> None:
    """On the run of the stage that starts from the initial model: how its vision tower was pretrained, as metrics
    `vision_pretrain.<key>` (the fields of vision_pretrain.PretrainResult)."""
    path = Path(base) / VISION_PRETRAIN_FILE if base else None
    if path is None or not path.exists():
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [Metric(f"vision_pretrain.{k}", float(v), now, 0) for k, v in json.loads(path.read_text()).items()]
    MlflowClient(tracking_uri=tracking_uri).log_batch(run_id, metrics=metrics)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def train_stage(stage: int, ctx: RunContext, *, workers: int = 2, base: Path | None = None,
                overrides: dict | None = None, parent_run_id: str | None = None, track: bool = True,
                max_failures: int = 1, extra: dict | None = None, address: str | None = None,
                max_steps: int = 0, workspace: str | None = None, placement: str = "PACK") -> StageResult:
    """Train one stage of the context's model family as a Ray Train job (the family's recipe) on the profile's Ray
    (`address` overrides it); rank 0 logs steps to an MLflow child run of the context's tracking settings, which
    reach the workers through the loop config; returns where it saved."""
    family = ctx.family
    if stage not in family.stages:
        raise ValueError(f"Stage {stage} is not in model family {family.name!r}'s plan {list(family.stages)}")
    cfg, home, project = ctx.cfg, ctx.home, ctx.project
    spec = family_stage_spec(cfg, family, stage, overrides)
    data_dir = ctx.data_dir
    verify_data(data_dir)  # a corrupted or swapped file stops the stage before any worker reads it
    plan = stage_plan(family.plan)
    t0 = time.perf_counter()
    skipped = plan.skip(stage, spec, ctx, base, workspace)
    inputs = {"skipped": skipped} if skipped else plan.prepare(stage, spec, ctx, base, workspace)
    model_config = family_settings(cfg, family).model
    out = stage_dir(home, stage, workspace)
    data_version = ctx.data_version or read_version(project)
    run_id = tracking_uri = None
    if track:
        run_id, tracking_uri = _start_mlflow_run(ctx.tracking, spec, cfg, data_version, parent_run_id,
                                                 {k: str(v) for k, v in inputs.items()}, model_config, family.name,
                                                 ctx.with_data_version(data_version).dataset(), skipped)
        _log_vision_pretraining(tracking_uri, run_id, inputs.get("base"))
    if skipped:
        log.warning("stage %d (%s) skipped: %s", stage, spec.name, skipped)
        if run_id:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status="FINISHED")
        return StageResult(stage, spec.name, out, time.perf_counter() - t0, [], run_id, skipped)
    loop = LoopConfig(
        recipe=family.recipe,
        # the family's model config as resolved now: a recipe may apply its training options to the loaded model
        recipe_config={"spec": to_dict(spec), "data_dir": str(data_dir), **inputs, "model": to_dict(model_config)},
        out_dir=str(out), epochs=spec.epochs, micro_batch=spec.micro_batch, grad_accum=spec.grad_accum, lr=spec.lr,
        betas=tuple(spec.betas), weight_decay=spec.weight_decay, warmup_ratio=spec.warmup_ratio,
        grad_clip=spec.grad_clip, zero_stage=spec.zero_stage, use_gpu=torch.cuda.is_available(), seed=spec.seed,
        checkpoint_every=spec.checkpoint_every, log_every=1, max_steps=max_steps or spec.max_steps,
        name=f"stage {stage} ({spec.name})",
        extra={**(extra or {}), **({"mlflow_run_id": run_id, "mlflow_tracking_uri": tracking_uri} if run_id else {})},
    )
    status = "FAILED"
    try:
        run_stage(loop, home, f"stage{stage}", workers=workers, max_failures=max_failures,
                  address=address or ctx.profile.ray_address,
                  placement=placement)
        status = "FINISHED"
    finally:
        if run_id:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri)
            if status == "FINISHED":
                client.log_artifacts(run_id, str(out), artifact_path="model")
            client.set_terminated(run_id, status=status)
    history = json.loads((out / "history.json").read_text())
    result = StageResult(stage, spec.name, out, time.perf_counter() - t0, history, run_id)
    log.info("stage %d (%s): loss %.3f → %.3f in %.0f s", stage, spec.name, result.first_loss, result.last_loss,
             result.seconds)
    return result
