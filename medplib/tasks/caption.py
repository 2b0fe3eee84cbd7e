"""Caption (alignment): describe the image; scored as open text (token recall/F1, BLEU), stage I's data."""
from __future__ import annotations

from medplib.tasks import Task, register


class Caption(Task):
    name = "caption"
    groups = ("alignment",)  # stage I's data (MedPLIB's alignment)
    family = "caption"
    file_words = ("alignment", "caption")
    files = {"train": "train/alignment.json", "test": "test/alignment_test.json"}
    summary = {"caption_bleu1": ("test", "bleu1")}

    def synth(self, scene):
        listing = " and ".join(scene.names) if scene.names else "no visible structure"
        return [scene.record("open", "Describe the image briefly.", f"A {scene.mod_name} image showing {listing}.")]

    def from_labels(self, labelled):
        name = labelled.mod_name
        article = "An" if name[0].lower() in "aeiou" or name in ("MRI", "X-ray") else "A"
        kind = "slice" if labelled.is_slice else "image"
        of = f" of the {labelled.subject}" if labelled.subject else ""
        showing = f" showing {' and '.join('the ' + s for s in sorted(labelled.masks))}" if labelled.masks else ""
        return [labelled.record("open", "Describe the image briefly.", f"{article} {name} {kind}{of}{showing}.")]

    def score(self, prediction, reference, pred_masks, target):
        from medplib.eval.metrics import vqa_open_scores  # nltk takes seconds to import: only when scoring

        return vqa_open_scores(prediction, reference)


register(Caption())
