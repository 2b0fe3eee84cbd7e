"""What the refer-and-ground tasks (BiRD's Med-GRIT-270k, REFERENCE §6–7) share: the box checks of a record and
BiRD's aggregation, each modality's score then the unweighted mean over the modalities.

Their task groups are "refer" and "vl": the visual-language stages (II and IV) train them beside the VQA tasks; visual
grounding's are "refer" and "pixel" (MedPLIB answers it through `<SEG>`: refer_vg.py), stages III and IV.
A record is one question/answer pair, the question starting with the `<image>` placeholder; every box in it must
parse (medplib.data.boxes), and each task says where boxes must be and whether they must be named by `<ref>`.
The synthetic generator writes their records in Med-GRIT's own layout (`medgrit/` in the synthetic source: one
combined training file whose pairs the reader recognises by their text, one test file per task, as BiRD ships
them), so the default pipeline reads them with the real Med-GRIT reader.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medplib.data import boxes
from medplib.data.schema import REGION_PLACEHOLDER, SEG_TOKEN
from medplib.tasks import Cumulative, Task


class ModalityMacro(Cumulative):
    """Each modality's values from its rows (`table`), then "all" = their unweighted mean over the modalities
    present: BiRD's final score, where every modality weighs the same however many samples it has. (BiRD's scripts
    divide by all 8 modalities, so a modality with no samples counts as 0 there; on its full test set all 8 are
    present and the two agree.)"""

    def table(self, rows: list[dict]) -> dict[str, float]:
        """One modality's values; the default is the per-sample mean of every metric."""
        from medplib.eval.metrics import aggregate_by_modality

        out = aggregate_by_modality(rows)["all"]
        out.pop("n")
        return out

    def tables(self, by_modality: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
        """Every modality's values: `table` of each one's rows, unless the modalities are best scored together."""
        return {m: self.table(rows) for m, rows in by_modality.items()}

    def aggregate(self) -> dict[str, dict[str, float]]:
        by_modality: dict[str, list[dict]] = {}
        for row in self.rows:
            by_modality.setdefault(str(row["modality"]), []).append(row)
        by_modality = dict(sorted(by_modality.items()))
        scores = self.tables(by_modality)
        out: dict[str, dict[str, float]] = {m: {**scores[m], "n": len(rows)} for m, rows in by_modality.items()}
        metrics = sorted({k for values in out.values() for k in values if k != "n"})
        out["all"] = {k: float(np.mean([v[k] for v in out.values() if k in v])) for k in metrics}
        out["all"]["n"] = len(self.rows)
        return out


class CaptionScores(ModalityMacro):
    """BiRD's GC/MII scores of each modality's corpus: pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L and CIDEr
    (`caption_scores`, all modalities tokenized in one Java call), plus the per-sample means of the token recall /
    precision / F1."""

    def tables(self, by_modality: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
        from medplib.eval.metrics import caption_scores

        rows = [r for rs in by_modality.values() for r in rs]
        scores = caption_scores([str(r["prediction"]).replace(SEG_TOKEN, "").strip() for r in rows],
                                [str(r["reference"]) for r in rows], [str(r["modality"]) for r in rows])
        return {m: {**{k: float(np.mean([r[k] for r in rs])) for k in ("recall", "precision", "f1")}, **scores[m]}
                for m, rs in by_modality.items()}


class ReferTask(Task):
    """A Med-GRIT task: groups "refer" and "vl", open answers; its `source_codes` say what Med-GRIT calls it."""

    groups = ("refer", "vl")
    # How MedPLIB takes the task's boxes (`pixel_form`): a question's as box prompts (`<region>`), an answer's runs of
    # boxes as `<SEG>`s whose targets are their union (then `answer` writes the boxes of the predicted masks back).
    box_prompts: bool = False
    box_masks: bool = False
    synth_source = "medgrit"
    answer_box: str = "any"  # "required": the answer needs a box; "none": it may carry none
    question_box: str = "any"  # "required": the question needs a box
    paired: bool = False  # every box of the answer must be named by the <ref> just before it

    def pixel_form(self, turns, regions, targets, height, width):
        if not (self.box_prompts or self.box_masks):
            return None
        existing = {"human": iter(regions), "gpt": iter(targets)}
        out, formed, changed = [], {"human": [], "gpt": []}, False
        for turn in turns:
            side = "human" if turn["from"] == "human" else "gpt"
            wanted = self.box_prompts if side == "human" else self.box_masks
            token = REGION_PLACEHOLDER if side == "human" else SEG_TOKEN
            converted = boxes.as_masks(turn["value"], width, height, token, runs=side == "gpt",
                                       existing=existing[side]) if wanted else None
            if converted is None:  # as it is: its own prompts or targets, in order
                n = turn["value"].count(token)
                formed[side] += [next(existing[side]) for _ in range(n)]
                out.append(dict(turn))
            else:
                out.append({**turn, "value": converted[0]})
                formed[side] += converted[1]
                changed = True
        return (out, formed["human"], formed["gpt"]) if changed else None

    def answer(self, text, masks):
        return boxes.from_masks(text, list(masks), SEG_TOKEN) if self.box_masks else text

    def check(self, turns: Sequence[dict], masks: Sequence[str], regions: Sequence[str]):
        question = next((t.get("value") for t in turns if t.get("from") == "human"), "")
        answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), "")
        try:
            in_question = boxes.parse(question)
            in_answer = boxes.parse(answer, paired=self.paired)
        except boxes.BoxTextError as e:
            return e.value, e.reason
        if self.question_box == "required" and not in_question:
            return question, f"a {self.name} question needs a <box> to ask about"
        if self.answer_box == "required" and not in_answer:
            return answer, f"a {self.name} answer needs a <box>"
        if self.answer_box == "none" and in_answer:
            return answer, f"a {self.name} answer names the object, without a <box>"
        if not boxes.strip(answer).strip() and self.answer_box != "required":
            return answer, f"a {self.name} answer needs text"
        return None

    def synth_file(self, split: str, modality: str = "") -> str:
        """Med-GRIT's file names: one combined training file, a test file per task (its code in the name)."""
        if split == "train":
            return "MedGRIT_train1_chatlm_img_coord2.json"
        return f"MedGRIT_{split}_chatlm_{self.source_codes['medgrit']}_img_coord_OneConv.json"

    @staticmethod
    def pair(scene, question: str, answer: str) -> dict:
        """One Med-GRIT record about the scene's image: `{"id", "conversations": [[user, assistant]]}`."""
        return {"id": scene.stem, "conversations": [[f"Picture 1: <img>{scene.stem}.png</img>\n{question}", answer]]}

    @staticmethod
    def pick(scene, options: Sequence):
        return options[int(scene.rng.integers(len(options)))]


class ReferTextTask(ReferTask):
    """A refer task answered in free text (GC, MII): BiRD's caption scores per modality on the text as written (box
    markup included), then their mean. SPICE, which BiRD's COCOEvalCap also computes, is left out: it downloads
    Stanford CoreNLP models at run time."""

    def score(self, prediction, reference, pred_masks, target):
        from medplib.eval.metrics import vqa_open_scores  # nltk takes seconds to import: only when scoring

        return vqa_open_scores(prediction, reference)

    def metric(self):
        return CaptionScores()
