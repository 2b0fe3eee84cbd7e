"""Medical image interpretation (BiRD's MII): free text about the image; BiRD's caption scores per modality
(pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L, CIDEr), then their mean. BLEU-4 is the headline.

SPICE, in BiRD's COCOEvalCap too, is left out (it downloads CoreNLP models at run time; BiRD's MII mean skips it).
"""
from __future__ import annotations

from medplib.tasks import register
from medplib.tasks.refer import ReferTextTask

QUESTIONS = ("Interpret this medical image.", "What can you tell about this image?")


class ImageInterpretation(ReferTextTask):
    name = "refer_mii"
    family = "medgrit_mii"
    files = {"train": "train/MedGRIT_MII.json", "test": "test/MedGRIT_MII_test.json"}
    source_codes = {"medgrit": "MII"}
    max_new_tokens = 96
    demo = ("Interpret the image (refer)", QUESTIONS[0])
    ranges = {"refer_mii_cider": 10.0}  # CIDEr-D runs 0–10
    summary = {"refer_mii_bleu4": ("test", "bleu4"), "refer_mii_cider": ("test", "cider"),
               "refer_mii_meteor": ("test", "meteor"), "refer_mii_rouge_l": ("test", "rouge_l")}

    def synth(self, scene):
        found = " ".join(f"The {name} is {scene.where(mask)}." for name, mask in scene.structures)
        text = f"This is a {scene.mod_name} image. " + (found or "No structure is visible.")
        return [self.pair(scene, self.pick(scene, QUESTIONS), text)]


register(ImageInterpretation())
