"""The example prompt (`model.sam.example_prompt`, medplib/model/examples.py): in-context examples reach the mask
decoder as prototypes and similarity maps. It starts at zero (the masks are the model's without it), a sample without
examples is segmented as before, the dataset and `generate` hand the pairs over, and it is saved, loaded and carried
into stage IV."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medplib.config.model import ModelConfig
from medplib.data.images import write_png
from medplib.data.schema import Record
from medplib.data.torch_dataset import MedDataset
from medplib.model import MedPLIB
from medplib.model.examples import ExamplePrompt

SIZE = 64


def _scene(root, k: int, bright: int = 220) -> tuple[str, str]:
    """An image with one bright square and its mask."""
    rng = np.random.default_rng(k)
    image = rng.integers(0, 60, (SIZE, SIZE), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), bool)
    y, x = 8 + 4 * (k % 5), 12 + 3 * (k % 7)
    mask[y:y + 16, x:x + 20] = True
    image[mask] = bright
    paths = f"images/ct_00--ex--case{k}.png", f"masks/ct_00--ex--case{k}--m.png"
    write_png(root / paths[0], image)
    write_png(root / paths[1], mask)
    return paths


def _icl_record(root, k: int, n_examples: int) -> Record:
    from medplib.tasks.incontext import question

    image, mask = _scene(root, k)
    context = [dict(zip(("image", "mask"), _scene(root, 100 + 10 * k + j))) for j in range(n_examples)]
    return Record(id=f"q{k}", image=image, modality="ct", split="train", task="icl", masks=[mask],
                  conversations=[{"from": "human", "value": question(n_examples, "liver", "overlay")},
                                 {"from": "gpt", "value": f"It is the liver. <SEG> <mask>{mask}</mask>"}],
                  context=context)


def _with_prompt(model: MedPLIB, seed: int | None = None) -> MedPLIB:
    if model.example_prompt is None:  # the tiny preset's model has it already
        model.attach_example_prompt()
    if seed is not None:  # a trained-looking prompt: weights away from zero
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.example_prompt.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_prototypes_are_the_mask_weighted_means_inside_and_outside():
    emb = torch.zeros(1, 2, 4, 4)
    emb[0, 0, :2, :2] = 3.0  # channel 0 high where the mask is
    emb[0, 1] = 1.0
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :4] = True  # the top-left quarter, at twice the embedding's resolution
    protos = ExamplePrompt.prototypes(emb, mask)
    assert torch.allclose(protos[0, 0], torch.tensor([3.0, 1.0])) and torch.allclose(protos[0, 1],
                                                                                      torch.tensor([0.0, 1.0]))
    mean, has = ExamplePrompt.per_sample(torch.stack([protos[0], 3 * protos[0]]), torch.tensor([0, 2]))
    assert has.tolist() == [False, True] and torch.allclose(mean[1], 2 * protos[0]) and not mean[0].any()
    with pytest.raises(ValueError, match=r"Examples per sample \[1, 2\] do not add up to the 2 example masks"):
        ExamplePrompt.per_sample(torch.stack([protos[0], protos[0]]), torch.tensor([1, 2]))


def test_the_dataset_hands_the_examples_over_and_the_decoder_reads_them(tiny_model: MedPLIB, tokenizer, tmp_path):
    model = _with_prompt(tiny_model)
    records = [_icl_record(tmp_path, 0, 2), _icl_record(tmp_path, 1, 0), _icl_record(tmp_path, 2, 1)]
    ds = MedDataset(tmp_path, tokenizer, SIZE, SIZE, records=records)
    assert ds[0].example_pixel_values.shape == (2, 3, SIZE, SIZE) and ds[0].example_masks.shape == (2, SIZE, SIZE)
    assert ds[1].example_pixel_values is None
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch["example_counts"].tolist() == [2, 0, 1] and batch["example_masks"].shape == (3, SIZE, SIZE)
    inputs = {k: v for k, v in batch.items() if k != "records"}
    plain = {k: v for k, v in inputs.items() if not k.startswith("example_")}
    with torch.no_grad():
        zero = model(**inputs).mask_logits
        before = model(**plain).mask_logits
    assert torch.equal(zero, before)  # zero-initialised: the masks are the model's without the prompt

    with pytest.raises(ValueError, match="already has the example prompt"):
        model.attach_example_prompt()
    with torch.no_grad():
        for p in model.example_prompt.parameters():
            p.normal_(generator=torch.Generator().manual_seed(1))
        read = model(**inputs).mask_logits
        other = model(**inputs | {"example_masks": ~inputs["example_masks"]}).mask_logits
    assert torch.equal(read[1], before[1])  # the sample without examples: as before
    assert not torch.allclose(read[0], before[0]) and not torch.allclose(read[2], before[2])
    assert not torch.allclose(read[0], other[0])  # the masks, not only the images, matter

    model.train()
    out = model(**inputs)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.example_prompt.parameters())


def test_generate_gives_the_decoder_the_example_pairs(tiny_model: MedPLIB, tmp_path):
    from medplib.data.images import read_image, read_mask

    model = _with_prompt(tiny_model, seed=3)
    pairs = [(read_image(tmp_path / i), read_mask(tmp_path / m)) for i, m in (_scene(tmp_path, k) for k in (5, 6))]
    query = read_image(tmp_path / _scene(tmp_path, 7)[0])
    calls = []
    real = model.segment

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    model.segment = spy
    with torch.no_grad():  # a <SEG> as the first token, so the decoder runs
        model.llm.lm_head.bias = torch.nn.Parameter(torch.zeros(model.llm.lm_head.out_features))
        model.llm.lm_head.bias[model.tokenizer.seg_token_id] = 1e4
    outs = model.generate([query, query], ["Segment the liver.", "Segment the liver."], max_new_tokens=1,
                          examples=[pairs, []])
    pixels, masks, counts = calls[-1]
    assert counts.tolist() == [2, 0] and pixels.shape == (2, 3, SIZE, SIZE) and masks.shape == (2, SIZE, SIZE)
    assert len(outs[0].masks) == 1 and len(outs[1].masks) == 1
    [alone] = model.generate([query], ["Segment the liver."], max_new_tokens=1)
    # no examples: as without the prompt (batched alone: the same up to float order); with them, far from it
    noise = (alone.mask_logits[0] - outs[1].mask_logits[0]).abs().max()
    assert noise < 1e-6 and (alone.mask_logits[0] - outs[0].mask_logits[0]).abs().max() > 100 * noise + 1e-7
    with pytest.raises(ValueError, match="2 images but 1 example lists"):
        model.generate([query, query], ["Segment the liver."] * 2, max_new_tokens=1, examples=[pairs])


def test_the_prompt_is_saved_loaded_and_carried_into_stage_iv(tiny_model: MedPLIB, tokenizer, tmp_path):
    grounding = _with_prompt(tiny_model, seed=4)
    grounding.save_pretrained(tmp_path / "stage3")
    loaded = MedPLIB.from_pretrained(tmp_path / "stage3")
    assert loaded.config.sam.example_prompt
    for (name, a), b in zip(grounding.example_prompt.state_dict().items(), loaded.example_prompt.state_dict().values()):
        assert torch.equal(a, b), name

    torch.manual_seed(1)
    config = tiny_model.config.__class__.tiny()
    config.sam.example_prompt = False  # a stage II model without it (the full preset's, or one saved before it)
    vl = MedPLIB(config, tokenizer)
    assert vl.example_prompt is None
    vl.upcycle_from_saved(tmp_path / "stage3")
    assert vl.config.sam.example_prompt
    assert torch.equal(vl.example_prompt.dense.weight, grounding.example_prompt.dense.weight)


def test_attaching_the_prompt_leaves_the_random_stream_alone(tokenizer, tmp_path):
    """A stage's random stream is the same whether its model came with the prompt (loaded: no init draws) or had it
    attached (`train --stage 3` from a stage II saved without it): the attach forks the global generator."""
    config = ModelConfig.tiny()
    config.sam.example_prompt = False
    model = MedPLIB(config, tokenizer)
    torch.manual_seed(42)
    before = torch.rand(3)
    torch.manual_seed(42)
    model.attach_example_prompt()
    assert torch.equal(torch.rand(3), before)
    assert model.example_prompt is not None and not any(p.any() for p in model.example_prompt.parameters())
