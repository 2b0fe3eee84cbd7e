"""The report task scored as report-generation papers score it (pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr on
the corpus, through the refer tasks' shared caption scores), on hand-made reports; its record check and its
generation length."""
from __future__ import annotations

import pytest

from medplib import tasks
from medplib.config.model import TISRConfig
from medplib.eval.runner import aggregate, summarise

REPORTS = ["The heart size is normal. The lungs are clear. No pneumothorax or pleural effusion.",
           "Cardiomegaly is present. There is a small left pleural effusion. No focal consolidation.",
           "Low lung volumes. No acute cardiopulmonary abnormality.",
           "There is a small nodule in the upper left. No heart is seen. No fracture is seen."]
KEYS = {"report_bleu4", "report_meteor", "report_rougeL", "report_cider"}


def _rows(cases: list[tuple[str, str]], split: str = "test") -> list[dict]:
    """Rows as the evaluator writes them: (prediction, reference) of X-ray reports scored by the task."""
    report = tasks.get("report")
    return [{"id": f"r{i}", "split": split, "task": "report", "modality": "x", "prediction": p, "reference": r,
             **report.score(p, r, [], None)} for i, (p, r) in enumerate(cases)]


def test_reports_get_bleu_meteor_rouge_l_and_cider_with_the_four_summary_keys():
    perfect = aggregate(_rows([(r, r) for r in REPORTS]), ["test"])["test/report"]
    assert perfect["x"]["n"] == 4 and perfect["all"]["n"] == 4
    for n in (1, 2, 3, 4):
        assert perfect["all"][f"bleu{n}"] == pytest.approx(1.0)
    assert perfect["all"]["rouge_l"] == pytest.approx(1.0) and perfect["all"]["meteor"] > 0.99
    assert perfect["all"]["cider"] == pytest.approx(10.0)
    assert summarise({"test/report": perfect}) == pytest.approx(
        {"report_bleu4": 1.0, "report_meteor": perfect["all"]["meteor"], "report_rougeL": 1.0, "report_cider": 10.0})

    # half the reports right word for word, half nothing alike: every score strictly between the two ends (texts no
    # other test of the METEOR group tokenizes: the PTB cache is shared by the process, and test_caption_metrics
    # counts the texts it sends to Java)
    half = aggregate(_rows([(REPORTS[0], REPORTS[0]), (REPORTS[1], REPORTS[1]),
                            ("purple giraffes dancing", REPORTS[2]), ("Quokkas (report test).", REPORTS[3])]),
                     ["test"])["test/report"]
    assert half["all"]["rouge_l"] == pytest.approx(0.5)  # ROUGE-L is pycocoevalcap's per-sample mean
    for metric, top in (("bleu1", 1.0), ("bleu4", 1.0), ("meteor", 1.0), ("cider", 10.0)):
        assert 0.0 < half["all"][metric] < top, metric
    summary = summarise({"test/report": half, "val/report": perfect}, "val")
    assert set(summary) == KEYS and summary["report_bleu4"] == pytest.approx(1.0)  # validation reads val's table


def test_report_is_a_vl_task_with_its_headline_and_cider_range():
    report = tasks.get("report")
    assert report.groups == ("vl", "reports") and "report" in tasks.groups()["vl"]  # `reports`: TISR's refinement
    assert tasks.resolve(TISRConfig().refine_tasks) == ("report",)
    assert set(report.summary) == KEYS and report.headline_metric() == "report_bleu4"
    assert tasks.metric_range("report_cider") == 10.0 and tasks.metric_range("report_bleu4") == 1.0
    assert "report_bleu4" in tasks.headline_metrics()  # guarded by the promotion gate like every task's headline
    assert report.max_new_tokens == 60 and report.max_context == 1


def test_the_report_records_check():
    def turns(answer: str) -> list[dict]:
        return [{"from": "human", "value": "<image>\nWrite the findings of this chest X-ray."},
                {"from": "gpt", "value": answer}]

    report = tasks.get("report")
    assert report.check(turns(REPORTS[0]), [], []) is None
    assert report.check(turns("  "), [], []) == ("  ", "empty report")
    assert report.check(turns("The lungs <SEG>"), ["masks/a.png"], [])[1].startswith("a report is text")
    assert report.check_context([{"image": "images/x_1.png", "mask": None}]) is None
    too_many = report.check_context([{"image": "images/x_1.png", "mask": None}] * 2)
    assert too_many[1] == "task 'report' takes at most 1 context image(s) but the record has 2"
