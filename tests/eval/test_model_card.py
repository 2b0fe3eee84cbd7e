"""The model card (medplib/eval/card.py): a registered version's description, generated from its lineage."""
from __future__ import annotations

from medplib.eval.card import MAX_DESCRIPTION, chance_of, model_card

STAGES = [{"stage": "1", "name": "align", "first_loss": 6.8, "last_loss": 2.1, "steps": 206},
          {"stage": "4", "name": "moe", "first_loss": 1.2, "last_loss": 0.4, "steps": 436}]
VAL = {"grounding_mdice": 0.84, "refer_vg_recall": 0.038, "refer_vg_chance": 0.05, "refer_ro_accuracy": 0.52,
       "refer_ro_chance": 0.333}
TEST = {**VAL, "grounding_mdice": 0.87, "zeroshot_grounding_mdice": 0.19}
DECISION = {"decision": "promoted", "reason": "better on grounding_mdice", "primary_metric": "grounding_mdice",
            "interval": (0.012, 0.031), "confidence": 0.9}


def test_the_card_says_what_trained_it_how_good_it_is_and_its_limits():
    card = model_card(name="medplib", version="3", preset="tiny", data_version="abc.dir", stages=STAGES, val=VAL,
                      test=TEST, per_modality={"grounding_mdice": {"ct": 0.9, "mri": 0.8}}, decision=DECISION)
    assert card.startswith("**medplib version 3** (tiny preset), trained and evaluated on data version `abc.dir`.")
    assert "- 1 align: loss 6.800 → 2.100 in 206 steps" in card and "- 4 moe: loss 1.200 → 0.400" in card
    assert "| grounding_mdice (gate) | 0.840 | 0.870 | – |" in card
    assert "| refer_ro_accuracy | 0.520 | 0.520 | 0.333 |" in card
    assert "| zeroshot_grounding_mdice | – | 0.190 | – |" in card
    assert "refer_vg_chance" not in card.split("Test, per modality")[0].split("| metric |")[1]  # beside, not a row
    assert "| metric | ct | mri |" in card and "| grounding_mdice | 0.900 | 0.800 |" in card
    assert "Gate: **promoted**: better on grounding_mdice; 90% interval of the grounding_mdice delta " \
           "[+0.0120, +0.0310]." in card
    limits = card.split("Known limits:")[1]
    assert "tiny preset" in limits and "refer_vg_recall 0.038 (chance 0.050)" in limits
    assert "refer_ro_accuracy" not in limits  # above its chance level


def test_chance_pairs_a_metric_with_its_task_and_long_cards_are_cut():
    assert chance_of("refer_vg_recall", TEST) == 0.05 and chance_of("grounding_mdice", TEST) is None
    many = {f"metric_{i:03d}": 0.5 for i in range(300)}
    card = model_card(name="m", version="1", preset="full", data_version="v", stages=[], val=many, test=many,
                      per_modality={}, decision={"decision": "rejected", "reason": "below the floor"})
    assert len(card) <= MAX_DESCRIPTION and card.endswith("every table)\n") and "Known limits" not in card
