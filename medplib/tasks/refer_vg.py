"""Visual grounding (BiRD's VG): name an object, answer its box(es); recall of the ground-truth boxes at IoU > 0.5.

MedPLIB grounds through `<SEG>`, and so it answers this task: it learns each run of answer boxes as one `<SEG>` whose
target is the boxes' union (`pixel_form`), and its answer's boxes are the bounding boxes of that mask's parts
(`answer`), written in box text that the metric reads as BiRD's evaluator does. So the task is in the pixel group
(stages III and IV), where the mask decoder learns; the text-box answer (stage II, from BiRD's records as they are)
stayed at chance level on the tiny model (recall 0.031-0.043 against 0.021, 2026-12-04).
"""
from __future__ import annotations

import numpy as np

from medplib.data import boxes
from medplib.tasks import register
from medplib.tasks.refer import ModalityMacro, ReferTask

IOU_HIT = 0.5  # a ground-truth box is found by a predicted box with IoU strictly above this


QUESTIONS = ("Please ground {ref} in this image.", "Find {ref} and give its box.", "Output the bounding box of {ref}.")


class BoxRecall(ModalityMacro):
    """Per modality, found ground-truth boxes / all ground-truth boxes (BiRD's recall@0.5); "all" is their
    unweighted mean over the modalities. Beside it, `chance`: the recall of a box of the modality's mean
    ground-truth size placed uniformly at random, the same way (per box, per modality, then the mean)."""

    def table(self, rows: list[dict]) -> dict[str, float]:
        total = sum(r["boxes"] for r in rows)
        truths = [box for r in rows for _, box in boxes.parse(str(r["reference"]))]
        chance = 0.0
        if truths:
            width = float(np.mean([b.x2 - b.x1 for b in truths]))
            height = float(np.mean([b.y2 - b.y1 for b in truths]))
            chance = float(np.mean([boxes.random_box_hit_rate(width, height, t, IOU_HIT) for t in truths]))
        return {"recall": sum(r["hits"] for r in rows) / total if total else 0.0, "chance": chance}


class VisualGrounding(ReferTask):
    name = "refer_vg"
    groups = ("refer", "pixel")
    box_masks = True
    family = "medgrit_vg"
    files = {"train": "train/MedGRIT_VG.json", "test": "test/MedGRIT_VG_test.json"}
    source_codes = {"medgrit": "VG"}
    answer_box = "required"
    max_new_tokens = 48
    demo = ("Ground a name as a box (refer)", QUESTIONS[0].format(ref="<ref>{text}</ref>"))
    summary = {"refer_vg_recall": ("test", "recall"), "refer_vg_chance": ("test", "chance")}
    headline = "refer_vg_recall"

    def synth(self, scene):
        if not scene.structures:
            return []
        name, mask = self.pick(scene, scene.structures)
        question = self.pick(scene, QUESTIONS).format(ref=f"<ref>{name}</ref>")
        return [self.pair(scene, question, boxes.write([(name, boxes.mask_box(mask))]))]

    def score(self, prediction, reference, pred_masks, target):
        truth = [box for _, box in boxes.parse(reference)]
        found = boxes.find_boxes(prediction)
        # BiRD's rule: each ground-truth box is a hit when any predicted box overlaps it enough (no one-to-one match)
        hits = sum(any(boxes.iou(p, t) > IOU_HIT for p in found) for t in truth)
        return {"recall": hits / len(truth) if truth else 0.0, "hits": hits, "boxes": len(truth)}

    def metric(self):
        return BoxRecall()


register(VisualGrounding())
