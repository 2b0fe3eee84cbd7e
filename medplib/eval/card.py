"""A registered version's model card: what it is for and how good it is, generated from its lineage and set as the
version's MLflow description, so the registry's model-version page answers it without opening tag after tag.

It says: the data version, the stages that trained it and their losses, the headline metrics on validation (what the
gate read) and test with the chance level beside them where the evaluation measured one, the test headline of each
task per modality, the gate's decision with its interval, and the known limits (the metrics at or below their chance
level; for the tiny preset, what it is).
"""
from __future__ import annotations

from typing import Mapping, Sequence

MAX_DESCRIPTION = 5000  # MLflow's model-version description column
TINY_LIMITS = ("tiny preset: a CPU-sized model trained from random initialisation on synthetic phantoms; it shows the "
               "platform working, it is not a medical model")


def chance_of(metric: str, summary: Mapping[str, float]) -> float | None:
    """The chance level the evaluation measured for `metric` (`refer_vg_chance` for `refer_vg_recall`), if any."""
    parts = metric.split("_")
    for k in range(len(parts) - 1, 0, -1):
        value = summary.get("_".join(parts[:k]) + "_chance")
        if value is not None:
            return value
    return None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def model_card(*, name: str, version: str, preset: str, data_version: str, stages: Sequence[Mapping],
               val: Mapping[str, float], test: Mapping[str, float], per_modality: Mapping[str, Mapping[str, float]],
               decision: Mapping) -> str:
    """The card as markdown. `stages`: {stage, name, first_loss, last_loss, steps}; `per_modality`: task headline →
    {modality: test value}; `decision`: publish's summary keys (decision, reason, primary_metric, interval,
    confidence)."""
    lines = [f"**{name} version {version}** ({preset} preset), trained and evaluated on data version "
             f"`{data_version}`.", "", "Stages:"]
    lines += [f"- {s['stage']} {s['name']}: loss {s['first_loss']:.3f} → {s['last_loss']:.3f} in {s['steps']} steps"
              for s in stages] or ["- (none recorded)"]
    primary = decision.get("primary_metric")
    lines += ["", "| metric | validation | test | chance |", "|---|---|---|---|"]
    headline = sorted(k for k in set(val) | set(test) if not k.endswith("_chance"))
    for k in headline:
        label = f"{k} (gate)" if k == primary else k
        lines.append(f"| {label} | {_fmt(val.get(k))} | {_fmt(test.get(k))} | "
                     f"{_fmt(chance_of(k, test) if k in test else chance_of(k, val))} |")
    if per_modality:
        modalities = sorted({m for row in per_modality.values() for m in row})
        lines += ["", "Test, per modality:", "", "| metric | " + " | ".join(modalities) + " |",
                  "|---|" + "---|" * len(modalities)]
        lines += [f"| {k} | " + " | ".join(_fmt(row.get(m)) for m in modalities) + " |"
                  for k, row in sorted(per_modality.items())]
    interval = decision.get("interval")
    where = (f"; {decision['confidence']:.0%} interval of the {primary} delta [{interval[0]:+.4f}, {interval[1]:+.4f}]"
             if interval else "")
    lines += ["", f"Gate: **{decision.get('decision')}**: {decision.get('reason')}{where}."]
    low = [f"{k} {_fmt(val[k])} (chance {_fmt(chance_of(k, val))})" for k in headline
           if k in val and chance_of(k, val) is not None and val[k] <= chance_of(k, val)]
    limits = ([TINY_LIMITS] if preset == "tiny" else []) + ([f"at or below chance on validation: {', '.join(low)}"]
                                                            if low else [])
    if limits:
        lines += ["", "Known limits:"] + [f"- {x}" for x in limits]
    card = "\n".join(lines) + "\n"
    if len(card) > MAX_DESCRIPTION:
        note = "\n… (cut at MLflow's description limit; the evaluation run holds every table)\n"
        card = card[:MAX_DESCRIPTION - len(note)] + note
    return card
