"""RecLMIS, the second model family (REFERENCE §6): shapes, the four weighted loss terms, the reconstruction switch,
save/load, loading CLIP's text encoder from a local folder, and learning on a tiny batch. Small shapes: seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medplib.config import ConfigError, RunContext, family_stage_spec, load_config
from medplib.config.base import merge
from medplib.config.reclmis import RecLMISConfig, RecLMISSettings
from medplib.model import load_pretrained
from medplib.model.family import family_of, family_of_model, get_family
from medplib.model.prompts import PromptError
from medplib.model.reclmis import RecLMIS, note_of, random_mask

NOTES = ["One finding: square in the upper left.", "One finding: disc in the lower right.",
         "Two findings: square in the upper left and disc in the lower right."]
SMALL = {"image_size": 32, "channels": [8, 16, 32], "interaction_dim": 32, "interaction_heads": 2,
         "text": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "max_length": 16,
                  "vocab_size": 300}}


def small_config(**over) -> RecLMISConfig:
    return merge(merge(RecLMISConfig.tiny(), SMALL), over)


@pytest.fixture(scope="module")
def notes_tokenizer():
    from medplib.model.reclmis import train_note_tokenizer

    return train_note_tokenizer(NOTES * 4, 300)


def small_model(tokenizer, **over) -> RecLMIS:
    torch.manual_seed(0)
    return RecLMIS(small_config(**over), tokenizer)


def scene(n: int = 6, size: int = 32) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images with a bright square (upper left) and a disc (lower right); each note names one or both, the target
    is the union of what it names."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    square = ((yy >= 4) & (yy < 12) & (xx >= 4) & (xx < 12)).float()
    disc = (((yy - 22) ** 2 + (xx - 22) ** 2) <= 25).float()
    image = (square + disc).clamp(max=1)[None].repeat(3, 1, 1) * 2 - 1
    picks = [k % 3 for k in range(n)]
    targets = [square, disc, (square + disc).clamp(max=1)]
    return image[None].repeat(n, 1, 1, 1), [NOTES[k] for k in picks], torch.stack([targets[k] for k in picks])


def test_forward_shapes_and_scores(notes_tokenizer):
    model = small_model(notes_tokenizer).eval()
    pixels, notes, masks = scene(3)
    ids, attn = model.encode_notes(notes)
    out = model(pixels, ids, attn)
    assert out.mask_logits.shape == (3, 32, 32) and out.loss is None
    assert out.patch_scores.shape == (3, 64)  # 32 px over 2 poolings: an 8×8 grid of patches of interest
    assert out.word_scores.shape == ids.shape
    assert (out.word_scores[attn == 0] == 0).all() and (out.word_scores[attn == 1] > 0).all()  # padding is no word
    assert ((out.patch_scores > 0) & (out.patch_scores < 1)).all()


def test_each_loss_term_is_present_and_weighted(notes_tokenizer):
    pixels, notes, masks = scene(4)
    for weights in ({}, {"seg": 2.0, "contrastive": 3.0, "text_rec": 0.5, "image_rec": 0.25}):
        model = small_model(notes_tokenizer, loss=weights).train()
        w = model.config.loss
        out = model(pixels, *model.encode_notes(notes), masks=masks)
        parts = out.parts()
        assert set(parts) == {"seg_loss", "contrastive_loss", "text_rec_loss", "image_rec_loss"}
        assert all(v > 0 for v in parts.values())
        expected = (w.seg * parts["seg_loss"] + w.contrastive * parts["contrastive_loss"]
                    + w.text_rec * parts["text_rec_loss"] + w.image_rec * parts["image_rec_loss"])
        assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert (RecLMISConfig().loss.seg, RecLMISConfig().loss.contrastive, RecLMISConfig().loss.text_rec,
            RecLMISConfig().loss.image_rec) == (5.0, 0.2, 1.0, 1.0)  # RecLMIS's weights by default
    # in eval mode only the segmentation term is computed (reconstruction and contrast only train)
    model = small_model(notes_tokenizer).eval()
    out = model(pixels, *model.encode_notes(notes), masks=masks)
    assert set(out.parts()) == {"seg_loss"} and float(out.loss.detach()) == pytest.approx(5 * out.parts()["seg_loss"])


def test_reconstruction_switch(notes_tokenizer):
    pixels, notes, masks = scene(4)
    with_rec = small_model(notes_tokenizer)
    without = small_model(notes_tokenizer, reconstruction=False).train()
    assert not hasattr(without, "image_rec") and not hasattr(without, "text_rec")
    out = without(pixels, *without.encode_notes(notes), masks=masks)
    parts = out.parts()
    assert set(parts) == {"seg_loss", "contrastive_loss"}
    assert float(out.loss.detach()) == pytest.approx(5 * parts["seg_loss"] + 0.2 * parts["contrastive_loss"], rel=1e-5)
    heads = sum(p.numel() for n, p in with_rec.named_parameters() if n.startswith(("image_rec", "text_rec")))
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert heads > 0 and total(with_rec) - total(without) == heads
    assert with_rec.inference_parameters() == without.inference_parameters()  # the heads only train
    # the switch applied to a built model (what stage 2 does with the config of its run)
    with_rec.configure_training(small_config(reconstruction=False))
    assert not hasattr(with_rec, "image_rec") and total(with_rec) == total(without)
    without.configure_training(small_config())
    assert hasattr(without, "text_rec") and set(without(pixels, *without.encode_notes(notes), masks=masks).parts()) \
        == {"seg_loss", "contrastive_loss", "text_rec_loss", "image_rec_loss"}
    with pytest.raises(ValueError, match="built with image_size = 32, the config says 64"):
        without.configure_training(small_config(image_size=64))


def test_random_mask_takes_the_ratio_of_valid_positions():
    torch.manual_seed(0)
    valid = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    m = random_mask(valid, 0.3)
    assert m.sum(1).tolist() == [3, 1] and not (m & ~valid).any()


def test_save_load_round_trip(notes_tokenizer, tmp_path: Path):
    model = small_model(notes_tokenizer).eval()
    folder = model.save_pretrained(tmp_path / "m")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "reclmis" and meta["model"]["image_size"] == 32
    files = {p.name for p in folder.rglob("*") if p.is_file()}
    assert "model.safetensors" in files and not files & {"pytorch_model.bin", "model.pt"}
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".pth")) for name in files)  # never pickles
    loaded = load_pretrained(folder)  # the family loader dispatches on the folder's format
    assert isinstance(loaded, RecLMIS) and family_of(folder).name == "reclmis"
    pixels, notes, _ = scene(3)
    a = model(pixels, *model.encode_notes(notes)).mask_logits
    b = loaded.eval()(pixels, *loaded.encode_notes(notes)).mask_logits
    assert torch.equal(a, b)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="corrupted"):
        RecLMIS.from_pretrained(folder)
    with pytest.raises(ValueError, match="holds a model of family 'reclmis'"):
        load_pretrained(model.save_pretrained(tmp_path / "n"), family="medplib")


def tiny_clip_folder(path: Path, hidden: int = 32, layers: int = 1) -> Path:
    """A CLIP text encoder and tokenizer saved as a CLIP checkpoint folder would be (built here, no download)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from medplib.model.reclmis import train_note_tokenizer

    tokenizer = train_note_tokenizer(NOTES * 4, 300)
    torch.manual_seed(1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=32,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_full_preset_path_loads_the_clip_text_encoder_from_a_local_folder(tmp_path: Path):
    from transformers import CLIPTextModel

    folder = tiny_clip_folder(tmp_path / "clip")
    cfg = small_config(text={"weights": str(folder)})
    model = RecLMIS.build(cfg)  # no notes: the tokenizer is CLIP's, from the folder
    reference = CLIPTextModel.from_pretrained(folder)
    ours = dict(model.text_encoder.clip.named_parameters())
    assert all(torch.equal(p, ours[n]) for n, p in reference.named_parameters())
    ids, attn = model.encode_notes(NOTES)
    assert torch.equal(model.text_encoder(ids, attn), reference(input_ids=ids, attention_mask=attn).last_hidden_state)
    # saved and loaded without the CLIP folder: the text encoder's config travels in config.json
    saved = model.save_pretrained(tmp_path / "saved")
    (folder / "model.safetensors").unlink()
    loaded = RecLMIS.from_pretrained(saved)
    assert torch.equal(loaded.text_encoder(ids, attn), model.text_encoder(ids, attn))
    with pytest.raises(ValueError, match=r"hidden_size = 48 but the model config says 32"):
        RecLMIS.build(small_config(text={"weights": str(tiny_clip_folder(tmp_path / "clip48", hidden=48))}))
    pickled = tmp_path / "pickled"  # a checkpoint with pickled weights only: refused, never unpickled
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    torch.save(reference.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no .safetensors weights"):
        RecLMIS.build(small_config(text={"weights": str(tmp_path / "pickled")}))
    assert RecLMISSettings.preset("full").model.text.hidden_size == 512  # CLIP ViT-B's text encoder


def test_loss_falls_on_a_tiny_overfit_batch(notes_tokenizer):
    pixels, notes, masks = scene(6)
    model = small_model(notes_tokenizer).train()
    ids, attn = model.encode_notes(notes)
    model.text_encoder.requires_grad_(False)  # stage 2: the text encoder is frozen
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(80):  # "both objects" first (a plateau near 0.18), then the note chooses (measured: step ~60)
        out = model(pixels, ids, attn, masks=masks)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.parts()["seg_loss"])
    print("seg losses", [round(x, 3) for x in losses[::10]])
    assert losses[-1] < 0.5 * losses[0]
    # the same notes, different targets: the note steers the mask (not one mask for every note)
    with torch.no_grad():
        logits = model.eval()(pixels, ids, attn).mask_logits
    p = torch.sigmoid(logits)
    in_square, in_disc = (p[:2, 4:12, 4:12].mean((1, 2)), p[:2, 18:26, 18:26].mean((1, 2)))
    print("square note: square %.2f disc %.2f; disc note: square %.2f disc %.2f" % (
        in_square[0], in_disc[0], in_square[1], in_disc[1]))
    assert in_square[0] > in_square[1] + 0.3 and in_disc[1] > in_disc[0] + 0.3

    # stage 1: next-token prediction on the notes trains the text encoder
    model.text_encoder.requires_grad_(True)
    opt = torch.optim.AdamW(model.text_encoder.parameters(), lr=3e-3)
    lm = []
    for _ in range(15):
        out = model(None, ids, attn, objective="text")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        lm.append(float(out.lm_loss.detach()))
    assert lm[-1] < 0.7 * lm[0]


def test_generate_answers_a_note_with_one_mask_at_the_image_size(notes_tokenizer):
    model = small_model(notes_tokenizer).eval()
    images = [np.zeros((40, 24), np.uint8), np.full((32, 32, 3), 200, np.uint8)]
    outs = model.generate(images, ["<image>\nSegment: " + NOTES[0], NOTES[1]])
    assert [o.text for o in outs] == ["<SEG>", "<SEG>"]
    assert [o.masks[0].shape for o in outs] == [(40, 24), (32, 32)] and outs[0].masks[0].dtype == bool
    assert note_of("<image>\nSegment: One finding.") == note_of("segment:One finding.") == "One finding."
    with pytest.raises(PromptError, match="no pixel prompts"):
        model.generate(images[:1], [NOTES[0]], [[np.ones((40, 24), bool)]])
    with pytest.raises(PromptError, match="Note 0 is empty"):
        model.generate(images[:1], ["Segment: "])


def test_reclmis_family_plugs_into_the_room(notes_tokenizer, tmp_path: Path):
    family = get_family("reclmis")
    assert family.stages == (1, 2) and family.format == "reclmis" and family.tasks == ("textseg",)
    assert family_of_model(small_model(notes_tokenizer)) is family
    ctx = RunContext.resolve(home=tmp_path / "home", model="reclmis")
    assert ctx.tracking.registered_model == "reclmis" and ctx.tracking.gate.primary_metric == "textseg_mdice"
    # mlflow.yaml's grounding floor is on a metric RecLMIS is never evaluated on; its own floor applies instead
    assert ctx.tracking.gate.floor == {"textseg_mdice": 0.3}
    shared = tmp_path / "mlflow.yaml"
    shared.write_text("gate:\n  floor:\n    textseg_mdice: 0.6\n    grounding_mdice: 0.5\n")
    assert RunContext.resolve(home=tmp_path / "home", model="reclmis", tracking_file=shared).tracking.gate.floor == \
        {"textseg_mdice": 0.6}  # the file's floor wins
    medplib = RunContext.resolve(home=tmp_path / "home")
    assert medplib.tracking.gate.floor == {"grounding_mdice": 0.5}

    cfg = load_config("tiny", {"families": {"reclmis": {"model": {"reconstruction": False},
                                                         "train": {"stage2": {"lr": 0.002}}}}})
    spec = family_stage_spec(cfg, family, 2, {"max_steps": 3})
    assert (spec.name, spec.lr, spec.max_steps, spec.tasks) == ("segmentation", 0.002, 3, ("textseg",))
    assert family_stage_spec(cfg, get_family("medplib"), 2).name == "vl_expert"  # MedPLIB's stages untouched
    bad = load_config("tiny", {"families": {"reclmis": {"model": {"recon": False}}}})
    with pytest.raises(ConfigError, match="Unknown config key 'families.reclmis.model.recon'"):
        family_stage_spec(bad, family, 1)
    with pytest.raises(ConfigError, match="Stage 3 does not exist; model family 'reclmis' has stages \\[1, 2\\]"):
        family_stage_spec(cfg, family, 3)
    folded = RunContext.resolve(config=cfg, home=tmp_path / "home", model="reclmis").with_stage_overrides(
        {2: {"epochs": 1}}).cfg
    assert folded.families["reclmis"]["train"]["stage2"] == {"lr": 0.002, "epochs": 1} and folded.train == cfg.train

    from flows.train import check_training

    check_training([1, 2], cfg, {2: {"epochs": 1}}, workers=1, model="reclmis")
    with pytest.raises(ValueError, match="Stage 3 does not exist; model family 'reclmis' has stages \\[1, 2\\]"):
        check_training([1, 2, 3], cfg, None, workers=1, model="reclmis")


def test_full_preset_parameter_counts_on_meta():
    """The full preset's shapes, on the meta device (no weights): CLIP ViT-B's text encoder (63.2M, frozen, over
    CLIP's 49408-token vocabulary) beside a U-Net branch and interaction of about 11M."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    end = "<|endoftext|>"
    vocab = {end: 0, "<|startoftext|>": 1, **{f"w{i}": i for i in range(2, 49408)}}
    clip_sized = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=end)),
                                         unk_token=end, bos_token="<|startoftext|>", eos_token=end, pad_token=end)
    with torch.device("meta"):
        model = RecLMIS(RecLMISSettings.preset("full").model, clip_sized)
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    print(parts)
    assert 63.1e6 < parts["text_encoder"] < 63.2e6  # CLIP ViT-B text transformer: 12 layers, hidden 512, 77 positions
    branch = model.inference_parameters() - parts["text_encoder"]
    assert 10e6 < branch < 13e6 and parts["image_rec"] + parts["text_rec"] > 3e6
