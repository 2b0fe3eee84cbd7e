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
    summary = {"closed_vqa_accuracy": ("test", "accuracy"), "closed_vqa_yes_accuracy": ("test", "yes_accuracy"),
               "closed_vqa_no_accuracy": ("test", "no_accuracy")}
    headline = "closed_vqa_accuracy"

    def synth(self, scene):
        rng = scene.rng
        other = MODALITIES[(scene.index + 1 + int(rng.integers(len(MODALITIES) - 1))) % len(MODALITIES)]
        asked = scene.modality if rng.random() < 0.5 else other
        out = [scene.record("closed", f"Is this a {MODALITY_NAMES[asked]} image?",
                            "yes" if asked == scene.modality else "no")]
        # Presence, balanced: one structure of the modality that is there and one that is not (an image showing
        # all or none of its modality's structures gets no presence question), so "yes" and "no" are equally
        # often right and every structure class is asked both ways: answering needs the image.
        present = [name for name, _, _ in scene.catalogue if name in scene.names]
        absent = [name for name, _, _ in scene.catalogue if name not in scene.names]
        if present and absent:
            pairs = [(present[int(rng.integers(len(present)))], "yes"), (absent[int(rng.integers(len(absent)))], "no")]
            for structure, answer in (pairs if rng.random() < 0.5 else pairs[::-1]):
                out.append(scene.record("closed", f"Is there a {structure} in this image?", answer))
        return out

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

        right = closed_vqa_correct(prediction, reference)
        answer = reference.strip().lower().rstrip(".")
        # accuracy on the questions whose right answer is "yes" and on those whose is "no" (None: not that kind)
        return {"accuracy": right, "yes_accuracy": right if answer == "yes" else None,
                "no_accuracy": right if answer == "no" else None}


register(ClosedVQA())
