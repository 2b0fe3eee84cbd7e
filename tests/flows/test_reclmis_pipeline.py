"""`pipeline --model reclmis` end to end for real (Prefect test harness, the session's Ray, sqlite MLflow, DVC, GX):
48 synthetic images, RecLMIS's two stages as Ray Train jobs (one worker: the distributed loop is tested elsewhere),
evaluation on the textseg records only, registered as `reclmis`, gated on textseg mDice and promoted; the champion
answers a note with a mask through the pyfunc."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

SMALL = """data:
  synth_n: 48
families:
  reclmis:
    train:
      stage1: {epochs: 10}
      stage2: {epochs: 30}
"""


@pytest.mark.timeout(900)
def test_reclmis_pipeline_trains_registers_and_promotes_its_own_champion(prefect_harness, ray_home, tmp_path):
    import mlflow
    import pandas as pd

    from flows.pipeline import pipeline
    from medplib.config import RunContext
    from medplib.registry import Registry, use_tracking
    from medplib.serve import encode_png

    project = tmp_path / "project"
    project.mkdir()
    config = tmp_path / "small.yaml"
    config.write_text(SMALL)
    summary = pipeline(config=config, home=ray_home.root, project=project, retries=0, model="reclmis", workers=1)

    assert [s["stage"] for s in summary["stages"]] == [1, 2]
    assert [s["name"] for s in summary["stages"]] == ["text_pretrain", "segmentation"]
    assert all(s["last_loss"] < s["first_loss"] for s in summary["stages"])
    ev = summary["evaluation"]
    print({k: round(v, 3) for k, v in ev["metrics"].items()}, ev["reason"])
    assert summary["registered_model"] == "reclmis" and ev["primary_metric"] == "textseg_mdice"
    assert set(ev["metrics"]) == {"textseg_mdice", "textseg_miou"}  # textseg only: no VQA, no grounding
    assert ev["promoted"] is True and ev["champion_version"] == "1"

    registry = Registry(RunContext.resolve(home=ray_home.root, project=project, model="reclmis").tracking)
    assert registry.champion_version() == "1"
    with use_tracking(registry.cfg):
        served = mlflow.pyfunc.load_model("models:/reclmis@champion")
    image = np.zeros((64, 64), np.uint8)
    out = served.predict(pd.DataFrame([{"image": encode_png(image),
                                        "question": "Segment: One finding: liver in the upper left."}]))
    assert out[0]["answer"] == "<SEG>" and len(out[0]["masks"]) == 1
