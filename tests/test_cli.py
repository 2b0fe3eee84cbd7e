"""The command line, called as a user would (subprocess on the installed console script)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MEDPLIB = [str(Path(sys.executable).with_name("medplib"))]


def run(args: list[str], cwd: Path, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDPLIB_HOME": str(home)}
    p = subprocess.run(MEDPLIB + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"medplib {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_bad_arguments_give_clear_errors(tmp_path: Path):
    p = run(["data", "ingest", "--source", "mecovqa:/definitely/missing"], tmp_path, tmp_path / "h", check=False)
    assert p.returncode == 2 and "/definitely/missing" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  synth_n: -4\n")
    p = run(["data", "synth", "--out", str(tmp_path / "o"), "--config", str(bad)], tmp_path, tmp_path / "h", check=False)
    assert p.returncode == 2 and "data.synth_n" in p.stderr and "Traceback" not in p.stderr
    p = run(["data", "validate"], tmp_path, tmp_path / "h", check=False)
    assert p.returncode == 2 and "medplib data ingest" in p.stderr


@pytest.mark.integration
def test_ingest_validate_status_and_corruption_fails_gate(tmp_path: Path):
    home, proj = tmp_path / "home", tmp_path / "proj"
    proj.mkdir()
    cfg = tmp_path / "small.yaml"
    cfg.write_text("data:\n  synth_n: 40\n")
    out = json.loads(run(["data", "ingest", "--source", "synth", "--config", str(cfg), "--json"], proj, home).stdout)
    assert out["total"] == out["valid"] + out["quarantined"] and out["valid"] > 0
    assert out["version"].endswith(".dir")
    st = json.loads(run(["data", "status", "--json"], proj, home).stdout)
    assert st == {**st, "version": out["version"], "in_sync": True, "pushed": True}
    v = json.loads(run(["data", "validate", "--json"], proj, home).stdout)
    assert v["success"] is True
    assert Path(v["data_docs"]).is_file() and Path(v["data_docs"]).is_relative_to(home)
    # corrupt the data after ingest: the gate fails with a non-zero exit naming what failed
    records = (proj / "data/records.jsonl").read_text().splitlines()
    first = json.loads(records[0])
    img = proj / "data" / first["image"]
    img.write_bytes(img.read_bytes()[:40])
    first["modality"] = "xray"
    (proj / "data/records.jsonl").write_text("\n".join([json.dumps(first)] + records[1:]) + "\n")
    p = run(["data", "validate"], proj, home, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    # each failure names the expectation, the field, the bad value and the record or file it sits in
    lines = p.stdout.splitlines()
    modality = lines.index(next(line for line in lines if "expect_column_values_to_be_in_set on records.modality:" in line))
    assert "1 unexpected" in lines[modality]
    bad = json.loads(lines[modality + 1].split("e.g. ", 1)[1])
    assert (bad["modality"], bad["id"], bad["image"]) == ("xray", first["id"], first["image"])
    readable = lines.index(next(line for line in lines if "on images.readable" in line))
    bad = json.loads(lines[readable + 1].split("e.g. ", 1)[1])
    assert bad["path"] == first["image"] and bad["readable"] is False and "not a readable image" in bad["error"]
    st = json.loads(run(["data", "status", "--json"], proj, home).stdout)
    assert st["in_sync"] is False


def test_the_profile_goes_before_or_after_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """`medplib --profile NAME COMMAND` (as docs/scaling-out.md writes it) and `medplib COMMAND --profile NAME`; the
    command's own flag wins."""
    from medplib_cli.main import main

    monkeypatch.setenv("MEDPLIB_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("MEDPLIB_PROFILE", raising=False)
    assert main(["--profile", "nowhere", "data", "status", "--project", str(tmp_path)]) == 2
    assert "Profile 'nowhere' does not exist" in capsys.readouterr().err
    assert main(["--profile", "nowhere", "data", "status", "--project", str(tmp_path), "--profile", "elsewhere"]) == 2
    assert "Profile 'elsewhere' does not exist" in capsys.readouterr().err
    assert main(["--profile", "local", "data", "status", "--project", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] is None  # nothing ingested in this project


def test_device_is_a_flag_of_the_commands_that_run_a_model(capsys: pytest.CaptureFixture):
    """--device (default auto) on evaluate, predict, pipeline, schedule and reproduce; its spelling is checked as the
    command line is read, and `medplib evaluate --help` shows it."""
    from medplib_cli.main import build_parser, main

    parser = build_parser()
    model = ["--model", "models:/medplib@champion"]
    commands = {"evaluate": model, "predict": [*model, "--image", "x.png", "--question", "q"], "pipeline": [],
                "schedule": ["--cron", "0 3 * * *"], "reproduce": ["models:/medplib/1"]}
    for command, required in commands.items():
        assert parser.parse_args([command, *required]).device == "auto", command
        assert parser.parse_args([command, *required, "--device", "cuda:1"]).device == "cuda:1", command
    assert not hasattr(parser.parse_args(["data", "status"]), "device")
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--device DEVICE" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", *model, "--device", "gpu0"])
    assert exit_.value.code == 2 and "argument --device: device 'gpu0': use auto, cpu, cuda or cuda:N" in \
        capsys.readouterr().err
