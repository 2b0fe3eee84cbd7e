"""Prompts that show context images (in-context examples, a second view) before the query image: the dataset gives
the images the task shows, collate batches them with their counts, the model fills each sample's `<image>`
placeholders with its context images then its query, and generation takes them too. A batch without context is
what it was before."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medplib import tasks
from medplib.data.images import write_png
from medplib.data.schema import Record, RecordError
from medplib.data.torch_dataset import MedDataset
from medplib.model import MedPLIB
from medplib.model.prompts import PromptError

SIZE = 64


class ShowsMasks(tasks.Task):
    """Each example pair shown as two images: the image, then its mask as an image."""

    name = "ctx_test"
    groups = ("ctx_test",)
    family = "ctx"
    max_context = 3

    def show_context(self, pairs):
        return [im for image, mask in pairs for im in (image, (mask * 255).astype(np.uint8))]


@pytest.fixture
def shows_masks():
    task = tasks.register(ShowsMasks())
    yield task
    tasks.unregister(task.name)


def _files(root, k: int) -> tuple[str, str]:
    image, mask = f"images/ct_00--ctx--case{k}.png", f"masks/ct_00--ctx--case{k}--m.png"
    write_png(root / image, np.random.default_rng(k).integers(0, 255, (SIZE, SIZE), dtype=np.uint8))
    m = np.zeros((SIZE, SIZE), bool)
    m[10:30 + k, 20:40] = True
    write_png(root / mask, m)
    return image, mask


def _record(root, k: int, n_examples: int, placeholders: int) -> Record:
    image, mask = _files(root, k)
    context = [dict(zip(("image", "mask"), _files(root, 10 + k + j))) for j in range(n_examples)]
    question = "Example: <image> " * (placeholders - 1) + "<image>\nSegment the same structure."
    return Record(id=f"r{k}", image=image, modality="ct", split="train", task="ctx_test", masks=[mask],
                  conversations=[{"from": "human", "value": question},
                                 {"from": "gpt", "value": f"It is here. <SEG> <mask>{mask}</mask>"}],
                  context=context)


def test_the_dataset_shows_what_the_task_shows_and_collate_batches_it(shows_masks, tokenizer, tmp_path):
    two = _record(tmp_path, 0, n_examples=1, placeholders=3)  # image + mask shown for one example, then the query
    none = _record(tmp_path, 1, n_examples=1, placeholders=1)  # context kept, prompt shows none
    ds = MedDataset(tmp_path, tokenizer, SIZE, SIZE, records=[two, none])
    a, b = ds[0], ds[1]
    assert a.shown_context.shape == (2, 3, SIZE, SIZE) and b.shown_context is None
    assert a.record.context == two.context and b.record.context == none.context  # the pairs stay on the record
    batch = ds.collate([a, b])
    assert batch["context_pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["context_counts"].tolist() == [2, 0]
    assert "context_pixel_values" not in ds.collate([b])  # no prompt shows any: the batch as before

    wrong = _record(tmp_path, 2, n_examples=1, placeholders=2)  # the task shows 2 images, the prompt has room for 1
    with pytest.raises(RecordError, match="2 <image> placeholders, but task 'ctx_test' shows 2 image"):
        MedDataset(tmp_path, tokenizer, SIZE, SIZE, records=[wrong])[0]


def test_context_images_fill_the_placeholders_before_the_query(shows_masks, tiny_model: MedPLIB, tokenizer,
                                                               tmp_path):
    model = tiny_model.eval()
    ds = MedDataset(tmp_path, tokenizer, SIZE, SIZE,
                    records=[_record(tmp_path, 0, 1, 3), _record(tmp_path, 1, 0, 1)])
    batch = ds.collate([ds[0], ds[1]])
    p = model.config.vision.num_patches
    with torch.no_grad():
        query = model.vision_tower(batch["pixel_values"])
        context = model.vision_tower(batch["context_pixel_values"])
        embeds = model.embed_inputs(batch["input_ids"], query, context_features=context,
                                    context_counts=batch["context_counts"])
        at = batch["input_ids"][0] == tokenizer.image_token_id
        shown = embeds[0][at].reshape(3, p, -1)
        projected = model.projector(torch.cat([context, query[:1]]))
        assert torch.allclose(shown, projected.to(shown.dtype), atol=1e-6)  # example image, its mask, then query
        alone = model.embed_inputs(batch["input_ids"][1:], query[1:])  # the sample without context: as before
        assert torch.equal(embeds[1], alone[0])
        with pytest.raises(ValueError, match=r"context images per sample \[1, 0\], then the query"):
            model.embed_inputs(batch["input_ids"], query, context_features=context[:1],
                               context_counts=torch.tensor([1, 0]))

    inputs = {k: v for k, v in batch.items() if k != "records"}
    with torch.no_grad():
        loss = model(**inputs).loss
        other = model(**inputs | {"context_pixel_values": -inputs["context_pixel_values"]}).loss
    assert torch.isfinite(loss) and loss != other  # the answer's loss reads the context images


def test_generate_takes_context_images(tiny_model: MedPLIB):
    model = tiny_model.eval()
    image = np.zeros((SIZE, SIZE), np.uint8)
    example = np.full((SIZE, SIZE), 200, np.uint8)
    [with_context, plain] = model.generate([image, image], ["Example: <image> <image>\nSegment it.", "Segment it."],
                                           contexts=[[example], []], max_new_tokens=3)
    assert isinstance(with_context.text, str) and isinstance(plain.text, str)
    [alone] = model.generate([image], ["Segment it."], max_new_tokens=3)
    assert alone.text == plain.text  # a sample without context generates as it did
    with pytest.raises(PromptError, match="1 <image> placeholder\\(s\\) for 1 context image\\(s\\) and the query"):
        model.generate([image], ["<image>\nSegment it."], contexts=[[example]], max_new_tokens=1)
