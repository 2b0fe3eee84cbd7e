"""Closed VQA: yes/no questions about the modality and the structures; exact match of the normalised answer."""
from __future__ import annotations

from medplib.data.schema import MODALITIES, MODALITY_NAMES
from medplib.tasks import Task, register


class ClosedVQA(Task):
    name = "vqa_closed"
    groups = ("vl", "vqa")
    family = "complex"
    files = {"train": "train/MeCoVQA-Complex.json", "test": "test/MeCoVQA_Complex_VQA_test.json"}
    answer_type = "closed"
    summary = {"closed_vqa_accuracy": ("test", "accuracy")}

    def synth(self, scene):
        rng = scene.rng
        other = MODALITIES[(scene.index + 1 + int(rng.integers(len(MODALITIES) - 1))) % len(MODALITIES)]
        asked = scene.modality if rng.random() < 0.5 else other
        probe = scene.catalogue[int(rng.integers(3))][0]
        return [scene.record("closed", f"Is this a {MODALITY_NAMES[asked]} image?",
                             "yes" if asked == scene.modality else "no"),
                scene.record("closed", f"Is there a {probe} in this image?", "yes" if probe in scene.names else "no")]

    def from_labels(self, labelled):
        name, other = labelled.mod_name, MODALITY_NAMES[labelled.other_modality]
        out = [labelled.record("closed", f"Is this a {name} image?", "yes"),
               labelled.record("closed", f"Is this a {other} image?", "no")]
        for structure in sorted(set(labelled.masks) | set(labelled.absent)):
            out.append(labelled.record("closed", f"Is there a {structure} in this image?",
                                       "yes" if structure in labelled.masks else "no"))
        return out

    def score(self, prediction, reference, pred_masks, target):
        from medplib.eval.metrics import closed_vqa_correct

        return {"accuracy": closed_vqa_correct(prediction, reference)}


register(ClosedVQA())
