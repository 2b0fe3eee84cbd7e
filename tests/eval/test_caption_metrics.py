"""BiRD's caption scores (pycocoevalcap on Java) on small hand-made corpora. The tests share one METEOR process."""
from __future__ import annotations

import itertools

import pytest

from medplib.eval import metrics
from medplib.eval.metrics import CAPTION_METRICS, caption_scores, ptb_tokenize

CAPTIONS = ["An axial CT slice of the abdomen shows an enlarged liver.",
            "A T2 weighted brain MRI with a large tumour in the left hemisphere.",
            "Frontal chest x-ray: clear lungs and a normal heart size."]
_fresh = itertools.count()


def _tokenizer_calls(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = metrics._run_ptb_tokenizer
    monkeypatch.setattr(metrics, "_run_ptb_tokenizer", lambda lines: calls.append(lines) or real(lines))
    return calls


def test_ptb_tokens_are_pycocoevalcaps_in_one_java_call(monkeypatch):
    calls = _tokenizer_calls(monkeypatch)
    tag = f"case{next(_fresh)}"  # texts the cache has not seen
    texts = [f"The Liver, {tag}: ENLARGED.", f"one\rtwo {tag}", f"three\u2028four {tag}", "",
             f"A <ref>cyst</ref><box>(10,20),(30,40)</box> {tag}", f"The Liver, {tag}: ENLARGED."]
    assert ptb_tokenize(texts) == [
        f"the liver {tag} enlarged", f"one two {tag}", f"three four {tag}", "",  # line breaks shift nothing
        f"a <ref> cyst </ref> <box> -lrb- 10,20 -rrb- -lrb- 30,40 -rrb- </box> {tag}",  # -lowerCase keeps -lrb-
        f"the liver {tag} enlarged"]
    assert len(calls) == 1 and len(calls[0]) == 5  # one call, each distinct text once
    ptb_tokenize(texts[::-1])
    assert len(calls) == 1  # seen texts are not tokenized again (a bootstrap re-scores the same rows)


def test_a_perfect_corpus_scores_the_maximum_and_a_disjoint_one_zero():
    perfect = caption_scores(CAPTIONS, CAPTIONS, ["ct"] * 3)["ct"]
    assert set(perfect) == set(CAPTION_METRICS)
    assert perfect["bleu1"] == pytest.approx(1.0) and perfect["bleu4"] == pytest.approx(1.0)
    assert perfect["meteor"] > 0.99 and perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["cider"] == pytest.approx(10.0)  # CIDEr-D is ×10: identical captions reach 10, not 1
    disjoint = caption_scores(["purple giraffe dancing"] * 3, CAPTIONS, ["ct"] * 3)["ct"]
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in disjoint.values()), disjoint
    near = caption_scores(["An axial CT slice of the abdomen shows a normal liver."] + CAPTIONS[1:], CAPTIONS,
                          ["ct"] * 3)["ct"]
    for name in CAPTION_METRICS:
        assert disjoint[name] < near[name] < perfect[name], name


def test_an_empty_or_odd_prediction_scores_zero_without_breaking_the_corpus():
    preds = ["", CAPTIONS[1], "|||\n", "."]
    refs = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[2], "A normal fundus photograph."]
    scores = caption_scores(preds, refs, ["x"] * 4)["x"]
    assert scores["rouge_l"] == pytest.approx(0.25)  # per-sample mean: 1 of 4 right
    assert 0.0 < scores["meteor"] < 0.5 and 0.0 < scores["cider"] < 10.0 / 4 + 1e-9


def test_each_group_is_its_own_corpus():
    preds = [CAPTIONS[0], "purple giraffe", CAPTIONS[1], CAPTIONS[2]]
    by_group = caption_scores(preds, CAPTIONS[:1] + CAPTIONS, ["ct", "ct", "mr", "mr"])
    assert set(by_group) == {"ct", "mr"}
    assert by_group["mr"]["rouge_l"] == pytest.approx(1.0) and by_group["ct"]["rouge_l"] == pytest.approx(0.5)
    pooled = caption_scores(preds, CAPTIONS[:1] + CAPTIONS, ["all"] * 4)["all"]
    # CIDEr's document frequencies come from the group's own references, as BiRD runs COCOEvalCap per modality
    assert pooled["cider"] != pytest.approx((by_group["ct"]["cider"] + by_group["mr"]["cider"]) / 2, abs=0.01)
    with pytest.raises(ValueError, match="4 captions but 3 group labels"):
        caption_scores(preds, CAPTIONS[:1] + CAPTIONS, ["ct"] * 3)


def test_the_scores_are_pycocoevalcaps_own():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds = ["the liver is enlarged.", "A small cyst, in the left kidney!", "No abnormality seen", "a liver lesion"]
    refs = ["The liver is enlarged.", "a cyst in the right kidney", "no abnormality is seen.", "a mass in the spleen"]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r}] for i, r in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    ours = caption_scores(preds, refs, ["x"] * 4)["x"]
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [ours[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)


def test_without_java_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no `java` on PATH: `make setup` installs it .*default-jre-headless"):
        ptb_tokenize([f"never tokenized before {next(_fresh)}"])
