"""Full-preset loaders on small checkpoints built here and saved in the CLIP, LLaVA and SAM formats."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig, CLIPModel, CLIPTextConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
    PreTrainedTokenizerFast, SamModel,
)

from medplib.config.base import merge
from medplib.config.model import VICUNA_SYSTEM, ModelConfig
from medplib.model import MedPLIB
from medplib.model.loaders import build_model, load_clip_vision, load_llava, load_sam, load_tokenizer
from medplib.model.model import clip_vision_config, llama_config, sam_config

VOCAB = 300


def _save_llama_tokenizer(folder: Path) -> None:
    """A LLaMA-like tokenizer folder: <unk>, <s>, </s> and no pad token (as LLaVA-1.5 ships)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Segment the liver.", "It is the liver.", "USER: ASSISTANT:"] * 5,
                            trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([f"filler{i}" for i in range(VOCAB - tok.get_vocab_size())])  # vocabulary = embedding rows
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        str(folder))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2).to_dict(),
                                vision_config=clip_vision_config(cfg).to_dict(), projection_dim=16))
    clip.save_pretrained(root / "clip")

    text_cfg = llama_config(cfg, VOCAB)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=clip_vision_config(cfg).to_dict(),
                                                      text_config=text_cfg.to_dict(), image_token_index=VOCAB - 1,
                                                      image_seq_length=cfg.vision.num_patches))
    llava.save_pretrained(root / "llava-hf")
    _save_llama_tokenizer(root / "llava-hf")

    # Original LLaVA release layout: a LLaMA checkpoint with model.mm_projector.{0,2}.* and model_type llava_llama
    LlamaForCausalLM(text_cfg).save_pretrained(root / "llava-orig")
    weights = load_file(root / "llava-orig" / "model.safetensors")
    weights.update({"model.mm_projector.0.weight": torch.randn(64, 64), "model.mm_projector.0.bias": torch.randn(64),
                    "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64)})
    save_file(weights, root / "llava-orig" / "model.safetensors", metadata={"format": "pt"})
    meta = json.loads((root / "llava-orig" / "config.json").read_text())
    meta.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_projector_type="mlp2x_gelu")
    (root / "llava-orig" / "config.json").write_text(json.dumps(meta))
    _save_llama_tokenizer(root / "llava-orig")

    SamModel(sam_config(cfg)).save_pretrained(root / "sam")
    return {"clip": root / "clip", "llava-hf": root / "llava-hf", "llava-orig": root / "llava-orig",
            "sam": root / "sam"}


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_clip_vision_from_a_clipmodel_checkpoint(checkpoints):
    cfg = ModelConfig.tiny()
    loaded = load_clip_vision(checkpoints["clip"], cfg)
    _equal_state(loaded, CLIPModel.from_pretrained(str(checkpoints["clip"])).vision_model)
    with pytest.raises(ValueError, match="hidden_size = 64 but the model config says 128"):
        load_clip_vision(checkpoints["clip"], merge(cfg, {"vision": {"hidden_size": 128}}))


def test_llava_hf_checkpoint_gives_lm_projector_and_vision(checkpoints):
    cfg = ModelConfig.tiny()
    llm, projector, vision = load_llava(checkpoints["llava-hf"], cfg)
    ref = LlavaForConditionalGeneration.from_pretrained(str(checkpoints["llava-hf"]))
    ids = torch.tensor([[1, 5, 9, 20]])
    torch.testing.assert_close(llm(input_ids=ids).logits, ref.lm_head(ref.model.language_model(input_ids=ids)[0]))
    assert torch.equal(projector["2.weight"], ref.model.multi_modal_projector.linear_2.weight)
    _equal_state(vision, ref.model.vision_tower)


def test_original_llava_layout_reads_mm_projector(checkpoints):
    cfg = ModelConfig.tiny()
    llm, projector, vision = load_llava(checkpoints["llava-orig"], cfg)
    raw = load_file(checkpoints["llava-orig"] / "model.safetensors")
    assert vision is None and sorted(projector) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(projector["0.weight"], raw["model.mm_projector.0.weight"])
    assert torch.equal(llm.model.layers[1].mlp.up_proj.weight, raw["model.layers.1.mlp.up_proj.weight"])


def test_sam_checkpoint(checkpoints):
    cfg = ModelConfig.tiny()
    _equal_state(load_sam(checkpoints["sam"], cfg), SamModel.from_pretrained(str(checkpoints["sam"])))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_sam(checkpoints["sam"] / "nope", cfg)


def test_build_full_style_model_from_local_folders(checkpoints, tmp_path):
    cfg = merge(ModelConfig.tiny(), {"vision": {"weights": str(checkpoints["clip"])},
                                     "llm": {"weights": str(checkpoints["llava-orig"])},
                                     "sam": {"weights": str(checkpoints["sam"])}, "system_prompt": VICUNA_SYSTEM})
    tok = load_tokenizer(cfg)
    assert len(tok) == VOCAB + 12 and tok.pad_token_id == tok.hf.unk_token_id  # LLaVA pads with <unk>
    assert tok.encode_prompt("Segment the liver.")[0] == tok.bos_token_id
    model = build_model(cfg, tok)
    assert model.llm.get_input_embeddings().num_embeddings == VOCAB + 12  # resized for the special tokens
    raw = load_file(checkpoints["llava-orig"] / "model.safetensors")
    assert torch.equal(model.llm.get_input_embeddings().weight[:VOCAB], raw["model.embed_tokens.weight"])
    assert torch.equal(model.projector[2].bias, raw["model.mm_projector.2.bias"])
    _equal_state(model.vision_tower.clip, load_clip_vision(checkpoints["clip"], cfg))
    _equal_state(model.sam, SamModel.from_pretrained(str(checkpoints["sam"])))

    # the built model runs, saves and loads as a MedPLIB folder
    ids, labels = tok.encode_conversation([{"from": "human", "value": "<image>\nSegment the liver."},
                                           {"from": "gpt", "value": "It is the liver. <SEG>"}])
    out = model(torch.tensor([ids]), torch.randn(1, 3, 64, 64), labels=torch.tensor([labels]),
                sam_pixel_values=torch.randn(1, 3, 64, 64), seg_masks=torch.zeros(1, 64, 64))
    assert torch.isfinite(out.loss)
    loaded = MedPLIB.from_pretrained(model.save_pretrained(tmp_path / "full-style"))
    assert loaded.tokenizer.system_prompt == VICUNA_SYSTEM
    _equal_state(loaded, model)


def test_llava_hf_vision_tower_is_used_without_a_clip_folder(checkpoints):
    cfg = merge(ModelConfig.tiny(), {"llm": {"weights": str(checkpoints["llava-hf"])}})
    model = build_model(cfg, load_tokenizer(cfg))
    ref = LlavaForConditionalGeneration.from_pretrained(str(checkpoints["llava-hf"]))
    _equal_state(model.vision_tower.clip, ref.model.vision_tower)
    assert torch.equal(model.projector[0].weight, ref.model.multi_modal_projector.linear_1.weight)


def test_stage_one_is_skipped_on_data_without_alignment_records_when_llava_brings_its_projector(checkpoints,
                                                                                                  tmp_path):
    """A real MeCoVQA download has no caption files, so stage I (alignment; the full preset's mix) has no records:
    with LLaVA-1.5's trained projector it is skipped, saying why in the result and the stage's MLflow run, and its
    folder holds the initial model stage II starts from. Without a pretrained projector it cannot be skipped."""
    from mlflow import MlflowClient

    from medplib.config import RunContext
    from medplib.data.schema import Record
    from medplib.model.loaders import has_aligned_projector
    from medplib.train.runner import TAG_SKIPPED, stage_dir, stage_inputs, train_stage

    plain = tmp_path / "llama"  # a LLaMA folder without mm_projector tensors
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"model.norm.weight": torch.ones(4)}, plain / "model.safetensors")
    assert has_aligned_projector(checkpoints["llava-hf"]) and has_aligned_projector(checkpoints["llava-orig"])
    assert not has_aligned_projector(plain)

    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    turns = [{"from": "human", "value": "<image>\nIs this a CT image?"}, {"from": "gpt", "value": "Yes."}]
    caption = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": "A CT."}]
    records = [Record("q1", "images/a.png", "ct", "train", "vqa_closed", turns),
               Record("c1", "images/a.png", "ct", "test", "caption", caption)]  # a caption, but not to train on
    (data / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    (data / "manifest.json").write_text('{"files": {}}')
    align_only = {"train": {"stage1": {"tasks": ["alignment"]}}}  # the full preset's stage I data

    def context(llava: Path) -> RunContext:  # CLIP from its folder (pre-trained: no captions needed to pretrain it)
        model = {"llm": {"weights": str(llava)}, "vision": {"weights": str(checkpoints["clip"])}}
        return RunContext.resolve("tiny", {**align_only, "model": model},
                                  home=tmp_path / "home", project=data.parent)

    ctx = context(checkpoints["llava-orig"])
    result = train_stage(1, ctx, workers=1)  # no Ray job: the stage is skipped before one starts
    assert result.skipped.startswith("no train records of tasks ['alignment'] in the data (a MeCoVQA download ships "
                                     "no caption files), and LLaVA-1.5's projector")
    assert result.history == [] and result.to_dict()["skipped"] == result.skipped
    assert stage_inputs(2, ctx.home, None)[0] == stage_dir(ctx.home, 1)  # stage II starts from the initial model
    assert torch.equal(MedPLIB.from_pretrained(result.out_dir).projector[2].bias,
                       load_file(checkpoints["llava-orig"] / "model.safetensors")["model.mm_projector.2.bias"])
    run = MlflowClient(ctx.tracking.tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.tags[TAG_SKIPPED] == result.skipped and run.info.status == "FINISHED"
    assert "loss" not in run.data.metrics

    with pytest.raises(ValueError, match=r"Stage 1 \(align\) has no train records of tasks \['alignment'\] .* cannot "
                                         r"be skipped: .*model.llm.weights .*llama has no projector"):
        train_stage(1, context(plain), workers=1, track=False)


def test_sam_med2d_adapters_compute_its_block_and_load_when_present(checkpoints, tokenizer, tmp_path):
    """SAM-Med2D's adapter beside each image-encoder MLP: the block computes x + mlp(y) + adapter(y); a SAM folder whose
    weights carry adapters loads them (transformers alone drops them), the built MedPLIB records it in its config and
    reloads them from its own folder; SAM-Med2D's key names map onto them; mismatched adapter weights are refused."""
    from medplib.model.sam_adapter import ADAPTER_KEY, SamMed2DMLP, adapters_from_sam_med2d, attach_adapters

    cfg = ModelConfig.tiny()
    torch.manual_seed(1)
    sam = attach_adapters(SamModel.from_pretrained(str(checkpoints["sam"])))
    layer = sam.vision_encoder.layers[0]
    assert isinstance(layer.mlp, SamMed2DMLP)
    y = torch.randn(2, 8, 8, cfg.sam.vision_hidden_size)
    plain = layer.mlp.lin2(layer.mlp.act(layer.mlp.lin1(y)))
    a = layer.mlp.adapter
    x = y.permute(0, 3, 1, 2)
    x = x + a.spatial(torch.sigmoid(a.channel[2](torch.relu(a.channel[0](x.mean(dim=(2, 3))))))[:, :, None, None] * x)
    expected = plain + torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), a.norm.weight, a.norm.bias)
    assert torch.allclose(layer.mlp(y), expected, atol=1e-5)
    with torch.no_grad():  # a trained adapter: not its initial values
        for name, p in sam.named_parameters():
            if ".adapter." in name:
                p.add_(torch.randn_like(p) * 0.1)
    sam.save_pretrained(tmp_path / "sam-med2d")
    assert any(ADAPTER_KEY.search(k) for k in load_file(tmp_path / "sam-med2d" / "model.safetensors"))
    assert not any(ADAPTER_KEY.search(k) for k in SamModel.from_pretrained(str(tmp_path / "sam-med2d")).state_dict())

    _equal_state(load_sam(tmp_path / "sam-med2d", cfg), sam)
    built = build_model(merge(cfg, {"sam": {"weights": str(tmp_path / "sam-med2d")}}), tokenizer)
    assert built.config.sam.adapters is True
    _equal_state(built.sam, sam)
    _equal_state(MedPLIB.from_pretrained(built.save_pretrained(tmp_path / "medplib")).sam, sam)
    assert not ModelConfig.tiny().sam.adapters  # a plain SAM folder builds a plain model (test above)

    ours = {k: v for k, v in sam.state_dict().items() if ".adapter." in k}
    theirs = {k.replace("vision_encoder.layers.", "image_encoder.blocks.").replace(".mlp.adapter.", ".Adapter."): v
              for k, v in ours.items()}
    assert adapters_from_sam_med2d({**theirs, "image_encoder.blocks.0.mlp.lin1.weight": torch.zeros(1)}) == ours

    weights = load_file(tmp_path / "sam-med2d" / "model.safetensors")
    broken = {k: v for k, v in weights.items() if "layers.1.mlp.adapter.norm" not in k}
    save_file(broken, tmp_path / "sam-med2d" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="adapter weights do not match.*missing.*layers.1.mlp.adapter.norm"):
        load_sam(tmp_path / "sam-med2d", cfg)
