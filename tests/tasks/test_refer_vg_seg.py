"""Boxes in text as MedPLIB takes them (issue 16, `Task.pixel_form`): visual grounding's answer boxes are learned as
one `<SEG>` mask and answered from the predicted mask, which BiRD's recall reads from the text; referring object
classification's question box is a box prompt."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from medplib import tasks
from medplib.data import boxes
from medplib.data.images import write_png
from medplib.data.schema import Record
from medplib.data.torch_dataset import MedDataset

SIZE = 40
LIVER = boxes.Box(100, 200, 475, 700)  # pixels x 4..19, y 8..28 of 40 (a pixel whose cell starts at x2 is in)


def _vg(root, k: int, split: str = "test") -> Record:
    image = f"images/ct_00--vg--case{k}.png"
    write_png(root / image, np.random.default_rng(k).integers(0, 200, (SIZE, SIZE), dtype=np.uint8))
    return Record(id=f"vg{k}", image=image, modality="ct", split=split, task="refer_vg", masks=[],
                  conversations=[{"from": "human", "value": "<image>\nPlease ground <ref>liver</ref> in this image."},
                                 {"from": "gpt", "value": boxes.write([("liver", LIVER)])}])


class Recorder:
    """A tokenizer stand-in that keeps the conversations it was given (one id per character)."""

    pad_token_id = 0

    def __init__(self):
        self.seen = []

    def encode_conversation(self, turns):
        self.seen.append([t["value"] for t in turns])
        ids = [ord(c) % 250 + 1 for t in turns for c in t["value"]]
        return ids, ids


def test_medplib_learns_the_answer_box_as_a_seg_mask(tmp_path):
    assert "pixel" in tasks.get("refer_vg").groups and "refer_vg" in tasks.resolve(["pixel"])
    tok = Recorder()
    ds = MedDataset(tmp_path, tok, image_size=SIZE, sam_image_size=SIZE, records=[_vg(tmp_path, 0)])
    sample = ds[0]
    assert tok.seen[-1][1] == "<ref>liver</ref><SEG>"
    target = np.zeros((SIZE, SIZE), bool)
    target[8:29, 4:20] = True
    assert sample.seg_masks.shape == (1, SIZE, SIZE) and np.array_equal(sample.seg_masks[0].numpy() > 0.5, target)


def test_an_evaluation_reads_the_boxes_of_the_predicted_masks(tmp_path):
    from medplib.eval.runner import evaluate
    from medplib.model.model import Generation

    recs = [_vg(tmp_path, k) for k in range(4)]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in recs))

    class PaintsTheBoxForEvenImages:
        def eval(self):
            return self

        def generate(self, images, questions, regions, max_new_tokens, contexts=None):
            out = []
            for k, image in enumerate(images):
                mask = np.zeros(image.shape[:2], bool)
                if k % 2 == 0:
                    mask[9:28, 4:18] = True  # near the liver's box: IoU above 0.5
                out.append(Generation("<ref>liver</ref><SEG>", [mask]))
            return out

    report = evaluate(PaintsTheBoxForEvenImages(), tmp_path, splits=("test",), tasks=("refer_vg",))
    rows = sorted(report.rows, key=lambda r: r["id"])
    assert rows[0]["prediction"] == "<ref>liver</ref>" + boxes.format_box(boxes.to_grid((4, 9, 17, 27), SIZE, SIZE))
    assert rows[1]["prediction"] == "<ref>liver</ref>"  # an empty mask answers no box
    assert [r["recall"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert report.summary["refer_vg_recall"] == 0.5


def test_the_box_of_a_referring_question_is_a_box_prompt(tmp_path):
    from medplib.eval.runner import evaluate
    from medplib.model.model import Generation

    rec = _vg(tmp_path, 0)
    rec.task = "refer_ro"
    rec.conversations = [{"from": "human", "value": "<image>\nWhat is the object in " + boxes.format_box(LIVER) + "?"},
                         {"from": "gpt", "value": "liver"}]
    tok = Recorder()
    sample = MedDataset(tmp_path, tok, image_size=SIZE, sam_image_size=SIZE, records=[rec])[0]
    assert tok.seen[-1] == ["<image>\nWhat is the object in <region></region>?", "liver"]
    target = np.zeros((SIZE, SIZE), bool)
    target[8:29, 4:20] = True
    assert sample.region_masks.shape == (1, SIZE, SIZE) and np.array_equal(sample.region_masks[0].numpy(), target)
    assert sample.seg_masks.shape[0] == 0
    (tmp_path / "records.jsonl").write_text(json.dumps(asdict(rec)) + "\n")
    asked = []

    class NamesWhatIsInTheBox:
        def eval(self):
            return self

        def generate(self, images, questions, regions, max_new_tokens, contexts=None):
            asked.extend(zip(questions, regions))
            return [Generation("liver" if r and np.array_equal(r[0], target) else "kidney") for r in regions]

    report = evaluate(NamesWhatIsInTheBox(), tmp_path, splits=("test",), tasks=("refer_ro",))
    assert [q for q, _ in asked] == ["<image>\nWhat is the object in <region></region>?"]
    assert report.summary["refer_ro_accuracy"] == 1.0
