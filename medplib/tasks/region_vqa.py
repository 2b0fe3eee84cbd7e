"""Region VQA: "What is in <region>prompt</region>?" with a point, box or free-form prompt mask; open-text scores."""
from __future__ import annotations

from medplib.tasks import Task, register

PROMPT_KINDS = ("point", "box", "free-form")


class RegionVQA(Task):
    name = "region_vqa"
    groups = ("vl", "region")
    family = "region"
    files = {"train": "train/MeCoVQA-Region.json", "test": "test/MeCoVQA_Region_VQA_test.json"}
    summary = {"region_vqa_recall": ("test", "recall")}

    def check(self, turns, masks, regions):
        if not regions:
            question = next((t.get("value") for t in turns if t.get("from") == "human"), None)
            return question, "a region record needs a <region> prompt mask"
        return None

    def synth(self, scene):
        if not scene.structures:
            return []
        name, mask = scene.focus
        kind = PROMPT_KINDS[int(scene.rng.integers(3))]
        prompt_rel = scene.write(f"masks/{scene.stem}--{name.replace(' ', '-')}--{kind}.png",
                                 scene.prompt_mask(kind, mask))
        return [scene.record("open", f"What is in <region>{prompt_rel}</region>?", f"It is the {name}.")]

    def score(self, prediction, reference, pred_masks, target):
        from medplib.eval.metrics import vqa_open_scores

        return vqa_open_scores(prediction, reference)


register(RegionVQA())
