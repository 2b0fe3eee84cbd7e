"""Open VQA: modality, count and position questions; token recall / F1 and BLEU against the reference."""
from __future__ import annotations

from medplib.tasks import Task, register

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


class OpenVQA(Task):
    name = "vqa_open"
    groups = ("vl", "vqa")
    family = "complex"
    files = {"train": "train/MeCoVQA-Complex.json", "test": "test/MeCoVQA_Complex_VQA_test.json"}
    answer_type = "open"
    summary = {"open_vqa_recall": ("test", "recall"), "open_vqa_f1": ("test", "f1"),
               "open_vqa_bleu1": ("test", "bleu1")}
    headline = "open_vqa_f1"

    def synth(self, scene):
        out = [scene.record("open", "What modality is this image?", f"This is a {scene.mod_name} image.")]
        if not scene.structures:
            return out
        name, mask = scene.focus  # the structure region VQA asks about too
        return out + [scene.record("open", "How many structures are visible?", f"{COUNT_WORDS[len(scene.names)]}."),
                      scene.record("open", f"Where is the {name}?", f"The {name} is {scene.where(mask)}.")]

    def from_labels(self, labelled):
        return [labelled.record("open", "What modality is this image?", f"This is a {labelled.mod_name} image.")]

    def score(self, prediction, reference, pred_masks, target):
        from medplib.eval.metrics import vqa_open_scores

        return vqa_open_scores(prediction, reference)


register(OpenVQA())
