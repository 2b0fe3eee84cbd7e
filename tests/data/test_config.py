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


# ---- stage specs are part of the config (train.stage1 … train.stage4) ----------------------------------------------

def test_a_config_file_overrides_any_stage_key(tmp_path: Path):
    from medplib.config import stage_spec

    f = tmp_path / "s.yaml"
    f.write_text("train:\n  stage3:\n    lr: 0.0005\n    zero_stage: 3\n    lora:\n      r: 4\n")
    cfg = load_config("tiny", f)
    spec = stage_spec(cfg, 3)
    assert (spec.lr, spec.zero_stage, spec.lora.r, spec.lora.alpha) == (0.0005, 3, 4, 16)  # the rest kept
    assert stage_spec(cfg, 2) == stage_spec(load_config("tiny"), 2)
    assert stage_spec(cfg, 3, {"epochs": 2}).epochs == 2 and stage_spec(cfg, 3, {"epochs": 2}).lr == 0.0005
    assert load_config("full").train.stage2.lora.r == 16 and load_config("tiny").train.stage3.epochs == 14


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  stage3:\n    lrr: 1\n", "Unknown config key 'train.stage3.lrr'"),
    ("train:\n  stage5:\n    lr: 1\n", "Unknown config key 'train.stage5'"),
    ("train:\n  stage2:\n    stage: 3\n", "'train.stage2.stage' = 3 must be 2"),
    ("train:\n  stage1:\n    max_steps: -1\n", "'train.stage1.max_steps' = -1"),
    ("train:\n  stage2:\n    max_len: 0\n", "'train.stage2.max_len' = 0 must be >= 1"),
    ("train:\n  stage3:\n    loss:\n      focal: -1\n", "'train.stage3.loss.focal' = -1.0 must be >= 0"),
    ("train:\n  stage4:\n    lora:\n      targets: [mlp]\n", "'train.stage4.lora.targets' has 'mlp'"),
    ("eval:\n  max_new_tokens: {reports: 100}\n", "'eval.max_new_tokens' names 'reports', not a registered task"),
    ("eval:\n  max_new_tokens: {report: 0}\n", "'eval.max_new_tokens.report' = 0 must be an integer >= 1"),
    ("eval:\n  max_new_tokens: {report: many}\n", "'eval.max_new_tokens.report' = 'many' must be an integer"),
])
def test_bad_stage_keys_name_the_key(tmp_path: Path, yaml_text: str, message: str):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("tiny", f)


def test_config_show_prints_the_resolved_config_with_stage_specs(tmp_path: Path, capsys: pytest.CaptureFixture):
    import json

    import yaml

    from medplib_cli.main import main

    f = tmp_path / "s.yaml"
    f.write_text("train: {stage3: {lr: 0.0005}}\n")
    home = tmp_path / "home"
    assert main(["config", "show", "--config", str(f), "--json", "--home", str(home)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["stage3"]["lr"] == 0.0005 and shown["train"]["stage1"]["name"] == "align"
    assert shown == to_dict(load_config("tiny", f))
    assert main(["config", "show", "--preset", "full", "--home", str(home)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# medplib config: preset full\n") and yaml.safe_load(text) == to_dict(load_config("full"))
    assert not home.exists()  # showing the config writes nothing


def test_lineage_digest_covers_stage_specs_and_overrides(tmp_path: Path):
    from medplib.config import with_stage_overrides
    from medplib.eval.publish import config_digest

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train: {stage3: {epochs: 2}}\n")
    b.write_text("train: {stage3: {epochs: 3}}\n")
    base = load_config("tiny")
    assert config_digest(load_config("tiny", a)) != config_digest(load_config("tiny", b)) != config_digest(base)
    # an override given on the command line (--epochs, flows' stage_overrides) is the same config as in a file
    assert config_digest(with_stage_overrides(base, {3: {"epochs": 2}})) == config_digest(load_config("tiny", a))
    assert with_stage_overrides(base, None) is base


def test_generation_lengths_are_the_tasks_own_unless_the_config_sets_them(tmp_path: Path):
    from medplib.eval.runner import generation_length

    f = tmp_path / "mimic.yaml"
    f.write_text("eval:\n  max_new_tokens: {report: 100}\n")  # R2Gen's MIMIC-CXR length
    lengths = load_config("tiny", f).eval.max_new_tokens
    assert lengths == {"report": 100} and load_config("tiny").eval.max_new_tokens == {}
    assert generation_length("report") == 60 and generation_length("report", lengths) == 100
    assert generation_length("refer_gc", lengths) == 96 and generation_length("report", 7) == 7
