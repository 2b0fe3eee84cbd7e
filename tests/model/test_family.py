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
        (folder / "config.json").write_text(json.dumps({"format": "echo", "w": self.w.detach().item()}))
        return folder

    @classmethod
    def from_pretrained(cls, folder: Path) -> "_Echo":
        return cls(json.loads((Path(folder) / "config.json").read_text())["w"])


@pytest.fixture
def echo_family():
    family = register_family(ModelFamily(name="echo", model_class=_Echo, format="echo", stages=(1,),
                                         recipe="tests.model.test_family:_Echo", registered_model="echo-model",
                                         gate_metric="closed_vqa_accuracy"))
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
    assert isinstance(loaded, _Echo) and float(loaded.w.detach()) == 0.5 and family_of(echo_dir) is echo_family
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


def test_a_family_resolves_to_its_own_registered_model_and_gate_metric(echo_family, tmp_path: Path):
    from medplib.config import ConfigError, RunContext

    echo = RunContext.resolve(home=tmp_path / "home", model="echo")
    assert echo.family is echo_family
    assert echo.tracking.registered_model == "echo-model" and echo.tracking.gate.primary_metric == "closed_vqa_accuracy"
    medplib = RunContext.resolve(home=tmp_path / "home")
    assert medplib.tracking.registered_model == "medplib" and medplib.tracking.gate.primary_metric == "grounding_mdice"
    assert echo.tracking.aliases == medplib.tracking.aliases  # the rest is mlflow.yaml's, shared

    # what mlflow.yaml sets explicitly wins over every family's default
    shared = tmp_path / "mlflow.yaml"
    shared.write_text("registered_model: shared\ngate:\n  primary_metric: open_vqa_f1\n")
    echo = RunContext.resolve(home=tmp_path / "home", model="echo", tracking_file=shared)
    assert echo.tracking.registered_model == "shared" and echo.tracking.gate.primary_metric == "open_vqa_f1"

    bad = register_family(ModelFamily("echo3", _Echo, "echo3", (1,), "x:y", "echo3", "accuracy"))
    try:
        with pytest.raises(ConfigError, match="Model family 'echo3': gate_metric 'accuracy' cannot be the gate's "
                                              "primary metric .*closed_vqa_accuracy"):
            RunContext.resolve(home=tmp_path / "home", model="echo3").tracking
    finally:
        unregister_family(bad.name)


def test_evaluate_and_predict_model_selects_the_family_and_checks_the_folder(echo_family, tiny_model: MedPLIB,
                                                                            tmp_path: Path):
    from medplib.config.profile import load_profile
    from medplib.serve import load_model
    from medplib_cli.main import _model_to_load

    local = load_profile("local")
    echo_dir = _Echo(0.25).save_pretrained(tmp_path / "e")
    medplib_dir = tiny_model.save_pretrained(tmp_path / "m")
    assert _model_to_load("echo", local) == ("echo", None, "echo")  # a family: its champion
    assert _model_to_load(str(echo_dir), local) == ("echo", str(echo_dir), None)  # a folder: its format's family
    assert _model_to_load("models:/echo-model/3", local) == ("echo", "models:/echo-model/3", "echo")
    assert _model_to_load("models:/medplib@champion", local) == ("medplib", "models:/medplib@champion", "medplib")
    assert _model_to_load("runs:/abc/medplib", local) == ("medplib", "runs:/abc/medplib", None)
    assert float(load_model(echo_dir, family="echo").w.detach()) == 0.25
    with pytest.raises(ValueError, match=r"holds a model of family 'echo' \(format 'echo'\), not of 'medplib': "
                                         r"pass --model echo"):
        load_model(echo_dir, family="medplib")
    with pytest.raises(ValueError, match="holds a model of family 'medplib'"):
        load_pretrained(medplib_dir, family="echo")
