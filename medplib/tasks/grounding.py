"""Grounding: "Segment the X." answered with <SEG>, whose mask is scored by Dice and IoU (empty union = 0)."""
from __future__ import annotations

import numpy as np

from medplib.data.schema import SEG_TOKEN
from medplib.tasks import Task, register


class Grounding(Task):
    name = "grounding"
    groups = ("pixel",)  # the pixel-grounding expert's data
    family = "grounding"
    files = {"train": "train/MeCoVQA-Grounding.json", "test": "test/MeCoVQA_Grounding_test.json"}
    zeroshot = True
    summary = {"grounding_mdice": ("test", "dice"), "grounding_miou": ("test", "iou"),
               "zeroshot_grounding_mdice": ("zeroshot", "dice"), "zeroshot_grounding_miou": ("zeroshot", "iou")}
    demo = ("Segment a structure (<SEG>)", "Segment the {text}.")

    def check(self, turns, masks, regions):
        if not masks:
            answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
            return answer, f"a grounding record needs a {SEG_TOKEN} with a <mask>"
        return None

    def synth(self, scene):
        out = []
        for name, mask in scene.structures:
            rel = scene.write(f"masks_merged/{scene.stem}--{name.replace(' ', '-')}_merged.png", mask)
            answer = f"It is the {name}. {SEG_TOKEN} <mask>{rel}</mask>"
            out.append(scene.record("open", f"Segment the {name}.", answer))
        return out

    def from_labels(self, labelled):
        out = []
        for structure, mask in sorted(labelled.masks.items()):
            rel = labelled.write_mask(structure, mask)
            out.append(labelled.record("open", f"Segment the {structure}.",
                                       f"It is the {structure}. {SEG_TOKEN} <mask>{rel}</mask>"))
        return out

    def score(self, prediction, reference, pred_masks, target):
        return mask_scores(pred_masks, target)


def mask_scores(pred_masks, target: np.ndarray) -> dict:
    """Dice and IoU of the first predicted mask against the target (no `<SEG>` generated: an empty mask), and whether
    one was generated; what every `<SEG>` task scores."""
    from medplib.eval.metrics import dice_iou

    pred = pred_masks[0] if len(pred_masks) else np.zeros_like(target, dtype=bool)  # no <SEG> generated → empty
    dice, iou = dice_iou(pred, target)
    return {"dice": dice, "iou": iou, "seg_generated": float(len(pred_masks) > 0)}


register(Grounding())
