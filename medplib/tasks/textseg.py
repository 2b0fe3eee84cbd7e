"""Text-guided segmentation (RecLMIS / LViT, REFERENCE §6–7): "Segment: <clinical note>" answered with `<SEG>`, whose
mask is scored by Dice and IoU as grounding's is (empty union = 0).

The note says how many findings, which and where ("Two findings: liver in the upper left and kidney in the lower
right."); the target is the union mask of what it names. Group "pixel": stages III and IV train it beside grounding.
Its records come from LViT's sheets (`--source lvit:DIR`, each row through `turns`); the synthetic generator writes
them in the LViT layout (`lvit/` in the synthetic source, one dataset folder per modality with `img/`, `labelcol/`
and its sheets; X-ray's named as QaTa-COV19's, the others as MosMedData+'s), so the default pipeline reads them with
the real LViT reader.
"""
from __future__ import annotations

import numpy as np

from medplib.data.schema import IMAGE_TOKEN, SEG_TOKEN
from medplib.tasks import Task, register
from medplib.tasks.grounding import mask_scores

QUESTION = "Segment: "
COUNTS = {1: "One finding", 2: "Two findings", 3: "Three findings"}


def note(findings: list[tuple[str, str]]) -> str:
    """A clinical-style note from (name, where) pairs: "Two findings: liver in the upper left and kidney in …"."""
    parts = [f"{name} {where}" for name, where in findings]
    listed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return f"{COUNTS.get(len(parts), f'{len(parts)} findings')}: {listed}."


class TextSegmentation(Task):
    name = "textseg"
    groups = ("pixel",)  # with grounding: the pixel-grounding expert's data (stages III and IV)
    family = "textseg"
    files = {"train": "train/MeCoVQA-TextSeg.json", "val": "val/MeCoVQA_TextSeg_val.json",
             "test": "test/MeCoVQA_TextSeg_test.json"}
    summary = {"textseg_mdice": ("test", "dice"), "textseg_miou": ("test", "iou")}
    source_codes = {"lvit": "text"}
    synth_source = "lvit"
    demo = ("Segment from a clinical note", QUESTION + "{text}")

    def turns(self, note: str, mask: str) -> list[dict]:
        """The conversation of one note about an image whose target is the mask at `mask` (the LViT reader's rows)."""
        return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}{note}"},
                {"from": "gpt", "value": f"It is here. {SEG_TOKEN} <mask>{mask}</mask>"}]

    def check(self, turns, masks, regions):
        question = next((t.get("value") for t in turns if t.get("from") == "human"), "")
        if not question.replace(IMAGE_TOKEN, "").replace(QUESTION.strip(), "").strip():
            return question, "a textseg question needs a note to segment by"
        if len(masks) != 1:
            answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
            return answer, f"a textseg answer needs one {SEG_TOKEN} with a <mask>, not {len(masks)}"
        return None

    def synth_file(self, split: str, modality: str = "") -> str:
        """One LViT dataset folder per modality; X-ray's sheets as QaTa-COV19's (one `Train_Val_text.xlsx`), the
        others' as MosMedData+'s (one sheet per split folder)."""
        folder = f"{modality}/{split.capitalize()}_Folder"
        if modality == "x" and split == "train":
            return f"{folder}/Train_Val_text.xlsx"
        return f"{folder}/{split.capitalize()}_text.xlsx"

    def synth(self, scene):
        """One LViT row per phantom: a random non-empty subset of its structures, named with where they are."""
        if not scene.structures:
            return []
        k = int(scene.rng.integers(1, len(scene.structures) + 1))
        chosen = sorted(scene.rng.choice(len(scene.structures), size=k, replace=False).tolist())
        named = [scene.structures[i] for i in chosen]
        union = np.logical_or.reduce([mask for _, mask in named])
        mask_rel = scene.write(f"masks_merged/{scene.stem}--note_merged.png", union)
        image = f"{scene.stem}.png"
        # QaTa-COV19 names a row by its mask, `mask_<image>`; MosMedData+ by the image's stem
        cell, mask = (f"mask_{image}", f"mask_{image}") if scene.modality == "x" else (scene.stem, image)
        return [{"Image": cell, "Description": note([(name, scene.where(m)) for name, m in named]),
                 "files": {f"img/{image}": scene.image_rel, f"labelcol/{mask}": mask_rel}}]

    def score(self, prediction, reference, pred_masks, target):
        return mask_scores(pred_masks, target)


register(TextSegmentation())
