"""Medical image interpretation (BiRD's MII): free text about the image; BLEU per modality, then their mean.

METEOR, ROUGE-L and CIDEr through pycocoevalcap, which BiRD also reports, are not computed yet.
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
    summary = {"refer_mii_bleu1": ("test", "bleu1"), "refer_mii_bleu4": ("test", "bleu4")}

    def synth(self, scene):
        found = " ".join(f"The {name} is {scene.where(mask)}." for name, mask in scene.structures)
        text = f"This is a {scene.mod_name} image. " + (found or "No structure is visible.")
        return [self.pair(scene, self.pick(scene, QUESTIONS), text)]


register(ImageInterpretation())
