"""Model families: one loader dispatches on what a saved folder says it is; a family is registered by its module."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medplib.model import MedPLIB, ModelFamily, get_family, load_pretrained, register_family
from medplib.model.family import family_names, family_of, unregister_family


class _Echo(torch.nn.Module):
    """A second family for the test: one weight, its own folder format."""

    def __init__(self, w: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([w]))

    def save_pretrained(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"format": "echo", "w": float(self.w)}))
        return folder

    @classmethod
    def from_pretrained(cls, folder: Path) -> "_Echo":
        return cls(json.loads((Path(folder) / "config.json").read_text())["w"])


@pytest.fixture
def echo_family():
    family = register_family(ModelFamily(name="echo", model_class=_Echo, format="echo", stages=(1,),
                                         recipe="tests.model.test_family:_Echo", registered_model="echo",
                                         gate_metric="accuracy"))
    yield family
    unregister_family("echo")


def test_medplib_is_the_first_family():
    family = get_family("medplib")
    assert family.model_class is MedPLIB and family.stages == (1, 2, 3, 4) and family.format == "medplib"
    assert "medplib" in family_names()
    with pytest.raises(ValueError, match="Unknown model family 'nope'; known: .*medplib"):
        get_family("nope")


def test_load_pretrained_dispatches_on_the_folder_format(tiny_model: MedPLIB, echo_family, tmp_path: Path):
    medplib_dir = tiny_model.save_pretrained(tmp_path / "m")
    echo_dir = _Echo(0.5).save_pretrained(tmp_path / "e")
    assert isinstance(load_pretrained(medplib_dir), MedPLIB) and family_of(medplib_dir).name == "medplib"
    loaded = load_pretrained(echo_dir)
    assert isinstance(loaded, _Echo) and float(loaded.w) == 0.5 and family_of(echo_dir) is echo_family
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"format": "llava"}')
    with pytest.raises(ValueError, match="format 'llava' belongs to no model family"):
        load_pretrained(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a saved model folder"):
        load_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="declares format 'echo', already that of 'echo'"):
        register_family(ModelFamily("echo2", _Echo, "echo", (1,), "x:y", "echo2", "accuracy"))


def test_a_family_has_its_own_stage_plan(echo_family):
    from flows.train import check_training

    check_training([1], "tiny", None, workers=1, model="echo")
    with pytest.raises(ValueError, match="Stage 2 does not exist; model family 'echo' has stages \\[1\\]"):
        check_training([1, 2], "tiny", None, workers=1, model="echo")
    with pytest.raises(ValueError, match="Unknown model family 'nope'"):
        check_training([1], "tiny", None, workers=1, model="nope")
