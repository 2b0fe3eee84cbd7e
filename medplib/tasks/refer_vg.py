"""Visual grounding (BiRD's VG): name an object, answer its box(es); recall of the ground-truth boxes at IoU > 0.5."""
from __future__ import annotations

from medplib.data import boxes
from medplib.tasks import register
from medplib.tasks.refer import ModalityMacro, ReferTask

IOU_HIT = 0.5  # a ground-truth box is found by a predicted box with IoU strictly above this


class BoxRecall(ModalityMacro):
    """Per modality, found ground-truth boxes / all ground-truth boxes (BiRD's recall@0.5); "all" is their
    unweighted mean over the modalities."""

    def table(self, rows: list[dict]) -> dict[str, float]:
        total = sum(r["boxes"] for r in rows)
        return {"recall": sum(r["hits"] for r in rows) / total if total else 0.0}


class VisualGrounding(ReferTask):
    name = "refer_vg"
    family = "medgrit_vg"
    files = {"train": "train/MedGRIT_VG.json", "test": "test/MedGRIT_VG_test.json"}
    source_codes = {"medgrit": "VG"}
    answer_box = "required"
    max_new_tokens = 48
    summary = {"refer_vg_recall": ("test", "recall")}

    def score(self, prediction, reference, pred_masks, target):
        truth = [box for _, box in boxes.parse(reference)]
        found = boxes.find_boxes(prediction)
        # BiRD's rule: each ground-truth box is a hit when any predicted box overlaps it enough (no one-to-one match)
        hits = sum(any(boxes.iou(p, t) > IOU_HIT for p in found) for t in truth)
        return {"recall": hits / len(truth) if truth else 0.0, "hits": hits, "boxes": len(truth)}

    def metric(self):
        return BoxRecall()


register(VisualGrounding())
