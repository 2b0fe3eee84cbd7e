"""Referring object classification (BiRD's RO): a box in the question, the object's name in the answer; correct when
every lower-cased word of the reference occurs in the lower-cased response (BiRD's substring containment)."""
from __future__ import annotations

import numpy as np

from medplib.data import boxes
from medplib.tasks import register
from medplib.tasks.refer import ModalityMacro, ReferTask

QUESTIONS = ("What is the object in {box}?", "Name the structure in {box}.", "What does {box} show?")


def words_contained(prediction: str, reference: str) -> float:
    """1.0 when each whitespace-separated word of the reference is a substring of the prediction (lower-cased)."""
    said = prediction.lower()
    return float(all(word in said for word in reference.lower().split()))


class NameAccuracy(ModalityMacro):
    """Per modality, the share of answers that contain the reference's words; "all" is the unweighted mean over the
    modalities. Beside it, `chance`: the accuracy of a uniform guess among the modality's structure names (the
    distinct references of that modality in the table), scored by the same rule."""

    def table(self, rows: list[dict]) -> dict[str, float]:
        names = sorted({str(r["reference"]).strip().lower() for r in rows})
        chance = np.mean([np.mean([words_contained(n, str(r["reference"])) for n in names]) for r in rows])
        return {"accuracy": float(np.mean([r["accuracy"] for r in rows])), "chance": float(chance)}


class ReferringObject(ReferTask):
    name = "refer_ro"
    family = "medgrit_ro"
    files = {"train": "train/MedGRIT_RO.json", "test": "test/MedGRIT_RO_test.json"}
    source_codes = {"medgrit": "RO"}
    question_box = "required"
    answer_box = "none"
    box_prompts = True  # MedPLIB reads the box as a box prompt, the region VQA way
    max_new_tokens = 16
    demo = ("Name what is in the drawn box (refer)", QUESTIONS[0])
    summary = {"refer_ro_accuracy": ("test", "accuracy"), "refer_ro_chance": ("test", "chance")}
    headline = "refer_ro_accuracy"

    def synth(self, scene):
        if not scene.structures:
            return []
        name, mask = self.pick(scene, scene.structures)
        return [self.pair(scene, self.pick(scene, QUESTIONS).format(box=boxes.write([(None, boxes.mask_box(mask))])),
                          name)]

    def score(self, prediction, reference, pred_masks, target):
        return {"accuracy": words_contained(prediction, reference)}

    def metric(self):
        return NameAccuracy()


register(ReferringObject())
