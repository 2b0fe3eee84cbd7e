from pathlib import Path

import pytest

from medplib.config import ConfigError, load_config, load_tracking_config, to_dict


def test_presets_load_and_differ():
    tiny, full = load_config("tiny"), load_config("full")
    assert tiny.model.llm.hidden_size <= 128 and tiny.data.image_size <= 128
    assert full.model.llm.hidden_size == 4096 and full.model.vision.image_size == 336


def test_yaml_override_applies(tmp_path: Path):
    f = tmp_path / "o.yaml"
    f.write_text("data:\n  synth_n: 12\n  zeroshot_modalities: [mr]\n")
    cfg = load_config("tiny", f)
    assert cfg.data.synth_n == 12 and cfg.data.zeroshot_modalities == ("mr",)


@pytest.mark.parametrize("yaml_text, key", [
    ("data:\n  synth_nn: 3\n", "data.synth_nn"),
    ("data:\n  synth_n: many\n", "data.synth_n"),
    ("data:\n  zeroshot_modalities: [xray]\n", "data.zeroshot_modalities"),
    ("data:\n  test_fraction: 1.5\n", "data.test_fraction"),
    ("model:\n  vision:\n    freeze: 'no'\n", "model.vision.freeze"),
    ("model:\n  vision:\n    image_size: 65\n", "model.vision.image_size"),
    ("bogus: 1\n", "bogus"),
])
def test_bad_overrides_name_the_key(tmp_path: Path, yaml_text: str, key: str):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config("tiny", f)
    assert f"'{key}'" in str(e.value) and str(f) in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path: Path):
    f = tmp_path / "broken.yaml"
    f.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("tiny", f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="Unknown preset"):
        load_config("huge")


def test_mlflow_yaml_is_read_and_resolved(tmp_path: Path):
    t = load_tracking_config()
    assert t.aliases.champion == "champion" and t.gate.primary_metric
    r = t.resolved(tmp_path)
    assert r.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    bad = tmp_path / "mlflow.yaml"
    bad.write_text("gate:\n  min_delta: -1\n")
    with pytest.raises(ConfigError, match="gate.min_delta"):
        load_tracking_config(bad)


def test_config_round_trips_through_dict():
    cfg = load_config("full")
    assert load_config("tiny", to_dict(cfg)) == cfg
