"""Grounded captioning (BiRD's GC): a caption whose objects carry `<ref>name</ref><box>…</box>`; BiRD's caption
scores per modality (pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L, CIDEr), then their mean. CIDEr is the headline.

Scored on the text with its box markup, as BiRD feeds it to pycocoevalcap: its PTB tokens keep the tags, the names
and the corner numbers. SPICE, in BiRD's COCOEvalCap too, is left out (it downloads CoreNLP models at run time).
"""
from __future__ import annotations

from medplib.data import boxes
from medplib.tasks import register
from medplib.tasks.refer import ReferTextTask

QUESTIONS = ("Describe the image and ground the objects in it.", "Caption this image with the boxes of its objects.")


class GroundedCaption(ReferTextTask):
    name = "refer_gc"
    family = "medgrit_gc"
    files = {"train": "train/MedGRIT_GC.json", "test": "test/MedGRIT_GC_test.json"}
    source_codes = {"medgrit": "GC"}
    answer_box = "required"
    paired = True
    max_new_tokens = 96
    ranges = {"refer_gc_cider": 10.0}  # CIDEr-D runs 0–10 (pycocoevalcap scales by 10)
    summary = {"refer_gc_cider": ("test", "cider"), "refer_gc_bleu4": ("test", "bleu4"),
               "refer_gc_meteor": ("test", "meteor"), "refer_gc_rouge_l": ("test", "rouge_l")}

    def synth(self, scene):
        if not scene.structures:
            return []
        grounded = " and ".join(f"the {boxes.write([(name, boxes.mask_box(mask))])}" for name, mask in scene.structures)
        return [self.pair(scene, self.pick(scene, QUESTIONS), f"A {scene.mod_name} image showing {grounded}.")]


register(GroundedCaption())
