"""A new source kind defined here alone: a reader registered by the test, ingested through `ingest("mykind:DIR")`."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medplib.config import load_config
from medplib.data import readers
from medplib.data.images import write_png
from medplib.data.ingest import ingest, parse_source


def stage_csv(path: Path, ctx: readers.StagingContext) -> readers.Staged:
    """A folder of PNGs plus answers.csv (image, question, yes|no) → MeCoVQA layout, closed VQA, all train."""
    out = ctx.fresh_dir("mykind", str(path))
    (out / "images").mkdir(parents=True)
    (out / "train").mkdir()
    items, errors = [], []
    with (path / "answers.csv").open(newline="") as fh:
        for i, (image, question, answer) in enumerate(csv.reader(fh)):
            if not (path / image).is_file():
                errors.append(readers.RecordError(f"answers.csv[{i}]", "image", image, "file does not exist"))
                continue
            (out / "images" / image).write_bytes((path / image).read_bytes())
            items.append({"image": f"images/{image}", "answer_type": "closed", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    (out / "train" / "MeCoVQA-Complex.json").write_text(json.dumps(items))
    return out, errors, "mykind"


@pytest.fixture
def mykind():
    reader = readers.register(readers.Reader("mykind", stage_csv, describe="PNGs with a CSV of yes/no answers"))
    yield reader
    readers.unregister("mykind")


def test_a_reader_registered_by_a_test_is_ingested(tmp_path: Path, home, project: Path, mykind):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("ct_a.png", "mr_b.png"):
        write_png(src / name, (rng.random((32, 32)) * 255).astype(np.uint8))
    (src / "answers.csv").write_text("ct_a.png,Is this a CT image?,yes\nmr_b.png,Is this a CT image?,no\n"
                                     "x_gone.png,Is this an X-ray image?,yes\n")
    assert parse_source(f"mykind:{src}") == ("mykind", src.resolve())
    result = ingest(f"mykind:{src}", project, home, load_config("tiny"))
    assert (result.source, result.total, result.valid, result.quarantined) == ("mykind", 3, 2, 1)
    assert result.by_task == {"vqa_closed": 2} and result.by_modality == {"ct": 1, "mr": 1}
    assert result.version.endswith(".dir") and result.quarantine_reasons == {"file does not exist": 1}
    assert "mykind" in readers.usage() and mykind.module == __name__
    assert Path(__file__).resolve() in [p.resolve() for p in readers.code_files()]


def test_the_reader_is_gone_after_the_fixture():
    assert "mykind" not in readers.kinds()
    with pytest.raises(ValueError, match="not understood"):
        parse_source("mykind:/tmp")
