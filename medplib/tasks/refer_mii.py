"""Medical image interpretation (BiRD's MII): free text about the image; BLEU per modality, then their mean.

METEOR, ROUGE-L and CIDEr through pycocoevalcap, which BiRD also reports, are not computed yet.
"""
from __future__ import annotations

from medplib.tasks import register
from medplib.tasks.refer import ReferTextTask


class ImageInterpretation(ReferTextTask):
    name = "refer_mii"
    family = "medgrit_mii"
    files = {"train": "train/MedGRIT_MII.json", "test": "test/MedGRIT_MII_test.json"}
    source_codes = {"medgrit": "MII"}
    max_new_tokens = 96
    summary = {"refer_mii_bleu1": ("test", "bleu1"), "refer_mii_bleu4": ("test", "bleu4")}


register(ImageInterpretation())
