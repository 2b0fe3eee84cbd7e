"""RecLMIS's stage plan and worker recipe without Ray: what each stage starts from, its records (the textseg notes
with their masks), the loss through the recipe, and a saved model that evaluates and serves through the same contract
as MedPLIB (`generate`, `predict`). The Ray Train run of the same recipe is the pipeline's (tests/flows)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medplib.config import RunContext, family_settings, family_stage_spec, to_dict
from medplib.data.ingest import build_dataset, stage_source
from medplib.data.torch_dataset import read_records
from medplib.model.prompts import PromptError
from medplib.model.reclmis import RecLMIS, note_of
from medplib.train.reclmis import RecLMISPlan, RecLMISRecipe, train_notes
from medplib.train.runner import stage_dir

SMALL = {"data": {"synth_n": 24},
         "families": {"reclmis": {"model": {"image_size": 32, "channels": [8, 16, 32], "interaction_dim": 32,
                                            "interaction_heads": 2,
                                            "text": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                                                     "num_heads": 2, "max_length": 24, "vocab_size": 300}}}}}


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> RunContext:
    root = tmp_path_factory.mktemp("reclmis")
    project = root / "project"
    project.mkdir()
    ctx = RunContext.resolve("tiny", SMALL, home=root / "home", project=project, model="reclmis")
    staged, errors, name = stage_source("synth", ctx.home, ctx.cfg, seed=3)
    build_dataset(staged, ctx.data_dir, name, errors, ctx.cfg.data.max_image_pixels, ctx.cfg.data.val_fraction)
    return ctx


def _recipe(ctx: RunContext, stage: int, inputs: dict, **model_keys) -> RecLMISRecipe:
    """The recipe as the runner configures it (medplib.train.runner.train_stage)."""
    spec = family_stage_spec(ctx.cfg, ctx.family, stage, {"micro_batch": 4})
    model = {**to_dict(family_settings(ctx.cfg, ctx.family).model), **model_keys}
    return RecLMISRecipe({"spec": to_dict(spec), "data_dir": str(ctx.data_dir), **inputs, "model": model})


def test_stages_chain_train_and_save(context: RunContext, tmp_path: Path):
    ctx, plan = context, RecLMISPlan()
    notes = train_notes(ctx.data_dir, ("textseg",))
    train = [r for r in read_records(ctx.data_dir) if r.split == "train" and r.task == "textseg"]
    assert len(notes) == len(train) > 0 and all(n and "Segment" not in n and "<image>" not in n for n in notes)

    with pytest.raises(FileNotFoundError, match="run the earlier stage first"):
        plan.prepare(2, family_stage_spec(ctx.cfg, ctx.family, 2), ctx, None, "w")
    inputs = plan.prepare(1, family_stage_spec(ctx.cfg, ctx.family, 1), ctx, None, "w")
    assert inputs == {"base": str(stage_dir(ctx.home, "init", "w"))}
    init = RecLMIS.from_pretrained(inputs["base"])
    assert init.config.image_size == 32 and len(init.tokenizer) <= 300  # the tokenizer was trained on the notes

    # stage 1: the text encoder alone trains, on the notes
    recipe = _recipe(ctx, 1, inputs)
    model = recipe.build_model()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text_encoder"}
    ds = recipe.train_dataset()
    assert len(ds) == len(train) and {s.record.task for s in (ds[0], ds[1])} == {"textseg"}
    batch = recipe.collate([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["masks"].shape == (4, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["masks"].sum() > 0
    loss, parts = recipe.loss(model, batch)
    assert set(parts) == {"lm_loss"} and loss.requires_grad
    recipe.save(model, stage_dir(ctx.home, 1, "w"))

    # stage 2: starts from stage 1, text encoder frozen, RecLMIS's four terms; the config's switch reaches it
    inputs = plan.prepare(2, family_stage_spec(ctx.cfg, ctx.family, 2), ctx, None, "w")
    assert inputs == {"base": str(stage_dir(ctx.home, 1, "w"))}
    recipe = _recipe(ctx, 2, inputs)
    model = recipe.build_model()
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"text_encoder"}
    loss, parts = recipe.loss(model, recipe.collate([ds[i] for i in range(4)]))
    assert set(parts) == {"seg_loss", "contrastive_loss", "text_rec_loss", "image_rec_loss"}
    off = _recipe(ctx, 2, inputs, reconstruction=False)
    off_model = off.build_model()
    assert set(off.loss(off_model, off.collate([ds[i] for i in range(4)]))[1]) == {"seg_loss", "contrastive_loss"}

    out = stage_dir(ctx.home, 2, "w")
    recipe.save(model, out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["format"] == "reclmis" and saved["model"]["reconstruction"] is True


def test_a_saved_model_evaluates_and_serves_through_the_shared_contract(context: RunContext, tmp_path: Path):
    import base64
    import io

    from PIL import Image

    from medplib.data.images import write_png
    from medplib.eval.runner import evaluate
    from medplib.serve import load_model, predict

    ctx = context
    out = Path(RecLMISPlan().prepare(1, family_stage_spec(ctx.cfg, ctx.family, 1), ctx, None, "serve")["base"])
    report = evaluate(load_model(out, family="reclmis"), ctx.data_dir, splits=("val", "test"))
    assert {r["task"] for r in report.rows} == {"textseg"}  # the family's tasks only, not VQA or grounding
    assert "textseg_mdice" in report.summary and "textseg_mdice" in report.val_summary
    assert all(0.0 <= r["dice"] <= 1.0 and r["seg_generated"] == 1.0 for r in report.rows)

    record = next(r for r in read_records(ctx.data_dir) if r.task == "textseg")
    question = next(t["value"] for t in record.conversations if t["from"] == "human")
    answer = predict(load_model(out), str(ctx.data_dir / record.image), question)
    assert answer["answer"] == "<SEG>" and len(answer["masks"]) == 1
    image = np.zeros((40, 30), np.uint8)
    write_png(tmp_path / "x.png", image)
    answer = predict(load_model(out), str(tmp_path / "x.png"), note_of(question))  # the note alone is a request
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(answer["masks"][0]))))
    assert mask.shape == (40, 30)
    with pytest.raises(PromptError, match="no pixel prompts"):
        predict(load_model(out), str(tmp_path / "x.png"), question, point="3,4")
    assert torch.is_grad_enabled()  # generate's no_grad does not leak


def test_the_comparison_table_measures_every_model_on_the_same_records(context: RunContext):
    from medplib.config.model import ModelConfig
    from medplib.eval.compare import compare_segmenters, comparison_markdown
    from medplib.model import MedPLIB, MedTokenizer
    from tests.model.conftest import TEXTS

    ctx = context
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    tiny_model = MedPLIB(cfg, MedTokenizer.train(TEXTS, cfg.llm.vocab_size, cfg.vision.num_patches))
    reclmis = RecLMIS.from_pretrained(
        RecLMISPlan().prepare(1, family_stage_spec(ctx.cfg, ctx.family, 1), ctx, None, "compare")["base"])
    rows = compare_segmenters({"reclmis": reclmis, "medplib <SEG>": tiny_model}, ctx.data_dir, "test")
    by = {r["model"]: r for r in rows}
    assert list(by) == ["reclmis", "medplib <SEG>", "all-foreground mask", "empty mask"]
    assert len({r["n"] for r in rows}) == 1 and rows[0]["n"] > 0  # the same records for every row
    assert by["empty mask"]["dice"] == 0.0 and 0 < by["all-foreground mask"]["dice"] < 1
    assert by["reclmis"]["inference_parameters"] < by["reclmis"]["parameters"]  # reconstruction heads only train
    assert by["medplib <SEG>"]["forward_gflops"] > 0 and by["reclmis"]["forward_gflops"] > 0
    print(comparison_markdown(rows, "test", "textseg"))
    assert "| empty mask | 0.0000 | 0.0000 | 0.0000 |" in comparison_markdown(rows, "test", "textseg")
    assert 0 <= by["reclmis"]["dice_other_note"] <= 1


def test_with_clips_text_encoder_stage_2_alone_starts_from_the_model_the_config_builds(context: RunContext,
                                                                                     tmp_path: Path):
    from medplib.config.base import merge
    from tests.model.test_reclmis import tiny_clip_folder

    clip = tiny_clip_folder(tmp_path / "clip")
    cfg = merge(context.cfg, {"families": {"reclmis": {"model": {"text": {"weights": str(clip), "max_length": 32}}}}})
    ctx = RunContext.resolve(config=cfg, home=context.home, project=context.project, model="reclmis")
    inputs = RecLMISPlan().prepare(2, family_stage_spec(ctx.cfg, ctx.family, 2), ctx, None, "clip")
    assert inputs == {"base": str(stage_dir(ctx.home, "init", "clip"))}  # no stage 1: CLIP needs no pretraining
    recipe = _recipe(ctx, 2, inputs)
    model = recipe.build_model()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    ds = recipe.train_dataset()
    _, parts = recipe.loss(model, recipe.collate([ds[i] for i in range(2)]))
    assert "seg_loss" in parts
