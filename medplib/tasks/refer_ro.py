"""Referring object classification (BiRD's RO): a box in the question, the object's name in the answer; correct when
every lower-cased word of the reference occurs in the lower-cased response (BiRD's substring containment)."""
from __future__ import annotations

from medplib.tasks import register
from medplib.tasks.refer import ModalityMacro, ReferTask


def words_contained(prediction: str, reference: str) -> float:
    """1.0 when each whitespace-separated word of the reference is a substring of the prediction (lower-cased)."""
    said = prediction.lower()
    return float(all(word in said for word in reference.lower().split()))


class ReferringObject(ReferTask):
    name = "refer_ro"
    family = "medgrit_ro"
    files = {"train": "train/MedGRIT_RO.json", "test": "test/MedGRIT_RO_test.json"}
    source_codes = {"medgrit": "RO"}
    question_box = "required"
    answer_box = "none"
    max_new_tokens = 16
    summary = {"refer_ro_accuracy": ("test", "accuracy")}

    def score(self, prediction, reference, pred_masks, target):
        return {"accuracy": words_contained(prediction, reference)}

    def metric(self):
        return ModalityMacro()


register(ReferringObject())
