"""BiRD's scoring of the refer-and-ground tasks on hand-made predictions: per modality, then the unweighted mean."""
from __future__ import annotations

import pytest

from medplib import tasks
from medplib.eval.runner import aggregate, summarise

LIVER = "<ref>liver</ref><box>(100,100),(300,300)</box>"
TWO = LIVER + "<ref>spleen</ref><box>(600,100),(800,300)</box>"


def _rows(task: str, cases: list[tuple[str, str, str]]) -> list[dict]:
    """Rows as the evaluator writes them: (modality, prediction, reference) scored by the task."""
    return [{"id": f"{task}{i}", "split": "test", "task": task, "modality": m, "prediction": p, "reference": r,
             **tasks.get(task).score(p, r, [], None)} for i, (m, p, r) in enumerate(cases)]


def test_vg_recall_counts_boxes_found_at_iou_above_one_half():
    vg = tasks.get("refer_vg")
    assert vg.score(LIVER, LIVER, [], None) == {"recall": 1.0, "hits": 1, "boxes": 1}
    # IoU exactly 0.5 is not a hit (strict); just above is
    assert vg.score("<box>(100,100),(300,200)</box>", LIVER, [], None)["hits"] == 0
    assert vg.score("<box>(100,100),(300,201)</box>", LIVER, [], None)["hits"] == 1
    assert vg.score("The liver is at (100,100),(300,300).", LIVER, [], None)["hits"] == 1  # bare corners
    assert vg.score("I cannot tell.", TWO, [], None) == {"recall": 0.0, "hits": 0, "boxes": 2}
    # one predicted box may find several ground-truth boxes (BiRD matches each truth box on its own)
    assert vg.score("<box>(100,100),(300,300)</box>", LIVER + LIVER, [], None)["hits"] == 2


def test_vg_headline_is_the_mean_over_modalities_of_the_per_modality_box_recall():
    rows = _rows("refer_vg", [("ct", TWO, TWO), ("ct", LIVER, TWO), ("ct", "nothing", LIVER),  # ct: 3 of 5 boxes
                              ("mr", LIVER, LIVER)])  # mr: 1 of 1
    table = aggregate(rows, ["test"])["test/refer_vg"]
    assert (table["ct"]["recall"], table["ct"]["n"]) == (0.6, 3) and (table["mr"]["recall"], table["mr"]["n"]) == (1.0, 1)
    assert table["all"]["recall"] == pytest.approx(0.8) and table["all"]["n"] == 4  # not 4 / 6 boxes pooled
    assert summarise({"test/refer_vg": table})["refer_vg_recall"] == pytest.approx(0.8)


def test_ro_accuracy_is_word_containment_averaged_over_modalities():
    ro = tasks.get("refer_ro")
    assert ro.score("This is the Left Kidney.", "left kidney", [], None) == {"accuracy": 1.0}
    assert ro.score("the kidney", "left kidney", [], None) == {"accuracy": 0.0}
    assert ro.score("kidneys", "kidney", [], None) == {"accuracy": 1.0}  # substring, as BiRD checks
    rows = _rows("refer_ro", [("ct", "liver", "liver"), ("ct", "spleen", "liver"), ("ct", "liver", "liver"),
                              ("ct", "aorta", "liver"), ("x", "left lung", "left lung")])
    table = aggregate(rows, ["test"])["test/refer_ro"]
    assert table["ct"]["accuracy"] == 0.5 and table["x"]["accuracy"] == 1.0
    assert summarise({"test/refer_ro": table})["refer_ro_accuracy"] == pytest.approx(0.75)  # not 3 / 5


def test_a_constant_answer_scores_chance_on_ro_and_chance_is_reported_beside_it():
    names = ["liver", "spleen", "kidney", "aorta"] * 3
    rows = _rows("refer_ro", [("ct", "liver", n) for n in names])
    table = aggregate(rows, ["test"])["test/refer_ro"]
    assert table["all"]["accuracy"] == pytest.approx(0.25) and table["all"]["chance"] == pytest.approx(0.25)
    # chance: a uniform guess among each modality's names, by the same word rule, then the mean over modalities;
    # "left kidney" is right for a reference "kidney" too (its words contain it), so x's chance is (2/3 + 1/3) / 2
    rows += _rows("refer_ro", [("x", "?", "kidney"), ("x", "?", "left kidney"), ("x", "?", "heart")])
    table = aggregate(rows, ["test"])["test/refer_ro"]
    assert table["x"]["chance"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert table["all"]["chance"] == pytest.approx((0.25 + 4 / 9) / 2)
    summary = summarise({"test/refer_ro": table})
    assert summary["refer_ro_chance"] == pytest.approx((0.25 + 4 / 9) / 2)
    assert tasks.get("refer_ro").headline_metric() == "refer_ro_accuracy"


def test_vg_chance_is_a_random_box_of_the_mean_size():
    # two truth boxes of 300 x 999 (full height): a random box of that size hits one when |dx| < 100 of 699 places
    tall = ["<box>(350,0),(650,999)</box>", "<box>(100,0),(400,999)</box>"]
    rows = _rows("refer_vg", [("ct", "nothing", t) for t in tall])
    table = aggregate(rows, ["test"])["test/refer_vg"]
    inside = 200 / 699  # the placements whose overlap is above 2/3 of the width, for a box away from the edges
    assert table["ct"]["chance"] == pytest.approx(inside, abs=0.02) and table["ct"]["recall"] == 0.0
    assert summarise({"test/refer_vg": table})["refer_vg_chance"] == pytest.approx(inside, abs=0.02)
    assert tasks.get("refer_vg").headline_metric() == "refer_vg_recall"


@pytest.mark.parametrize("task", ["refer_gc", "refer_mii"])
def test_captions_get_birds_scores_per_modality_then_their_mean(task: str, monkeypatch):
    from medplib.eval import metrics

    ref_ct = ["An abdominal CT slice showing the " + LIVER + " and a small cyst.",
              "An axial CT slice with the " + TWO + " of normal size."]
    ref_mr = ["A brain MRI slice with a large tumour in the left hemisphere.", "A knee MRI with a torn meniscus."]
    cases = [("ct", r, r) for r in ref_ct] + [("mr", r, r) for r in ref_mr]
    perfect = aggregate(_rows(task, cases), ["test"])[f"test/{task}"]
    assert perfect["all"]["bleu4"] == pytest.approx(1.0) and perfect["all"]["rouge_l"] == pytest.approx(1.0)
    assert perfect["all"]["cider"] == pytest.approx(10.0) and perfect["all"]["meteor"] > 0.99
    calls: list[list[str]] = []
    real = metrics._run_ptb_tokenizer
    monkeypatch.setattr(metrics, "_run_ptb_tokenizer", lambda lines: calls.append(lines) or real(lines))
    # texts not tokenized before in both modalities (PTB lower-cases, so the upper-cased ct ones are still perfect)
    cases = [("ct", r.upper(), r) for r in ref_ct] + [("mr", f"Nothing here ({task}).", r) for r in ref_mr]
    half = aggregate(_rows(task, cases), ["test"])[f"test/{task}"]
    assert len(calls) == 1  # both modalities' new texts in one Java call
    for name in ("bleu1", "bleu4", "meteor", "rouge_l", "cider", "f1"):
        assert half["all"][name] == pytest.approx((half["ct"][name] + half["mr"][name]) / 2), name
    assert half["ct"]["cider"] == pytest.approx(10.0) and half["mr"]["cider"] == pytest.approx(0.0, abs=1e-9)
    assert half["ct"]["n"] == 2 and half["all"]["n"] == 4
    summary = summarise({f"test/{task}": half})
    assert set(summary) == {f"{task}_{m}" for m in ("bleu4", "cider", "meteor", "rouge_l")}
    assert summary[f"{task}_rouge_l"] == pytest.approx(0.5)
    assert tasks.get(task).headline_metric() == {"refer_gc": "refer_gc_cider", "refer_mii": "refer_mii_bleu4"}[task]


def test_record_checks_of_the_refer_tasks():
    def turns(q: str, a: str) -> list[dict]:
        return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]

    gc, vg, mii = tasks.get("refer_gc"), tasks.get("refer_vg"), tasks.get("refer_mii")
    assert gc.check(turns("Describe.", "A slice with the " + TWO + "."), [], []) is None
    assert gc.check(turns("Describe.", "A slice with the <box>(1,2),(3,4)</box>."), [], [])[1].startswith(
        "<ref>/<box> counts disagree: 0 <ref> but 1 <box>")
    assert vg.check(turns("Find the tumour.", "<box>(1,2),(3,4)</box>"), [], []) is None  # bare box allowed
    assert vg.check(turns("Find the tumour.", "It is not visible."), [], [])[1] == "a refer_vg answer needs a <box>"
    assert mii.check(turns("What is shown?", "<box>(1,2),(3,4)</box>"), [], [])[1] == "a refer_mii answer needs text"
    assert mii.check(turns("What is in <box>(9,9),(1,1)</box>?", "A cyst."), [], [])[1].startswith(
        "box corners reversed")
