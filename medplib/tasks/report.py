"""Radiology report generation (R2Gen's IU X-Ray / MIMIC-CXR, REFERENCE §6–7): one or two views of a chest X-ray →
the findings as free text. Scored as report-generation papers score it, with pycocoevalcap's BLEU-1..4, METEOR,
ROUGE-L and CIDEr over the corpus (the refer tasks' `CaptionScores`: each modality's corpus, then the mean; reports
are all X-ray). BLEU-4 is the headline, as in R2Gen.

A record's query image is the first view; a second view (IU X-Ray's lateral) is its one context image. Generation
runs up to 60 tokens (R2Gen's IU X-Ray setting); the config's `eval.max_new_tokens: {report: 100}` gives MIMIC-CXR's.
The synthetic generator writes its records in R2Gen's own layout (`iuxray/`: `annotation.json` and
`images/<id>/0.png, 1.png`, the phantom and a flipped, shifted copy as the second view), one per X-ray phantom, so the
default pipeline reads them with the real reader (`medplib.data.readers.r2gen`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medplib.data.schema import SEG_TOKEN
from medplib.tasks import Task, register
from medplib.tasks.refer import CaptionScores

KIND = "iuxray"
# A structure covering at most this share of the image is "small": about the median (the phantoms give 0.02–0.07).
SMALL_AREA = 0.04
SECOND_VIEW_SHIFT = 3  # pixels: the second view is the phantom mirrored and moved by up to this much


class ReportGeneration(Task):
    name = "report"
    groups = ("vl", "reports")  # the visual-language stages (II and IV); TISR's refinement reads `reports`
    family = "r2gen_report"
    files = {"train": "train/R2Gen_report.json", "val": "val/R2Gen_report_val.json",
             "test": "test/R2Gen_report_test.json"}
    source_codes = {KIND: "report"}
    synth_source = KIND
    answer_type = "open"
    max_context = 1  # the second view
    max_new_tokens = 60  # R2Gen's max_seq_length for IU X-Ray
    question = "Write the findings of this chest X-ray."  # R2Gen's records have none; the reader asks this
    demo = ("Write a report", question)
    summary = {"report_bleu4": ("test", "bleu4"), "report_meteor": ("test", "meteor"),
               "report_rougeL": ("test", "rouge_l"), "report_cider": ("test", "cider")}
    ranges = {"report_cider": 10.0}  # CIDEr-D runs 0–10 (pycocoevalcap scales by 10)

    def check(self, turns: Sequence[dict], masks: Sequence[str], regions: Sequence[str]):
        answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), "")
        if not str(answer).strip():
            return answer, "empty report"
        if SEG_TOKEN in answer or masks or regions:
            return answer, f"a report is text: no {SEG_TOKEN}, <mask> or <region> in it"
        return None

    def synth(self, scene):
        """One R2Gen record per X-ray phantom: a sentence for each structure the modality can show, "No …" for the
        absent ones, in the catalogue's order."""
        if scene.modality != "x":
            return []
        present = dict(scene.structures)
        sentences = []
        for name, _, _ in scene.catalogue:
            mask = present.get(name)
            if mask is None:
                sentences.append(f"No {name} is seen.")
            else:
                size = "small" if mask.mean() <= SMALL_AREA else "large"
                sentences.append(f"There is a {size} {name} {scene.where(mask)}.")
        return [{"id": scene.stem, "report": " ".join(sentences),
                 "image_path": [f"{scene.stem}/0.png", f"{scene.stem}/1.png"], "split": scene.split}]

    def synth_images(self, scene) -> None:
        """The two views under `iuxray/images/<id>/`: the phantom, and a mirrored copy moved by a few pixels."""
        folder = f"{KIND}/images/{scene.stem}"
        scene.link(f"{folder}/0.png")
        shift = int(scene.rng.integers(-SECOND_VIEW_SHIFT, SECOND_VIEW_SHIFT + 1))
        scene.write(f"{folder}/1.png", np.roll(np.fliplr(scene.image), shift, axis=1))

    def synth_file(self, split: str, modality: str = "") -> str:
        """R2Gen keeps every split in one file (`annotation.json`; its reader's `write_synth` groups the records by
        their `split`)."""
        return "annotation.json"

    def score(self, prediction, reference, pred_masks, target):
        from medplib.eval.metrics import vqa_open_scores  # nltk takes seconds to import: only when scoring

        return vqa_open_scores(prediction, reference)

    def metric(self):
        return CaptionScores()


register(ReportGeneration())
