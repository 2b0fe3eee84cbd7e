"""The docs' commands, run as written (tests/test_docs.py parses every one; here they run): every `medplib …` line of
README.md and docs/*.md whose command finishes on its own (data synth, ingest, validate, status, config show, predict)
runs against the session pipeline's champion or a fresh state folder, with the docs' example paths swapped for files
`medplib data synth` writes. The commands that train, serve or wait (pipeline, ui, demo, schedule, …) are run by the
tests tests/test_docs.py names in ELSEWHERE."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from medplib.config import load_tracking_config
from medplib.registry import Registry
from tests.test_docs import DOCS, RUN_HERE, command_of, commands

pytestmark = pytest.mark.e2e
IMAGE = "images/ct_00--synth42--case00000--z_0000.png"  # one the quickstart names


def _swap(line: str, synth: Path, tmp: Path) -> str:
    """The docs' example paths → files this test has."""
    for placeholder in ("/path/to/MeCoVQA", "/data/MeCoVQA", "/srv/mecovqa"):
        line = line.replace(f"mecovqa:{placeholder}", f"mecovqa:{synth}")
    line = line.replace("medgrit:/data/Med-GRIT", f"medgrit:{synth / 'medgrit'}")
    line = line.replace("/tmp/phantoms", str(synth)).replace("/tmp/liver.png", str(tmp / "liver.png"))
    return line.replace("--image scan.png", f"--image {synth / IMAGE}")


def test_the_documented_commands_run_as_written(pipeline_runs, tmp_path: Path, capsys):
    from medplib_cli.main import main

    home, project, _, _ = pipeline_runs
    fresh_home, fresh_project = tmp_path / "home", tmp_path / "project"
    fresh_project.mkdir()
    synth = tmp_path / "phantoms"
    lines = [line for page in DOCS for line in commands(page) if command_of(line) in RUN_HERE]
    # each distinct command once, in the order a reader runs them: synth before what reads its files
    todo = list(dict.fromkeys(_swap(line, synth, tmp_path) for line in lines))
    todo.sort(key=lambda line: RUN_HERE.index(command_of(line)))
    assert [command_of(line) for line in todo[:1]] == ["data synth"], todo

    registry = Registry(load_tracking_config().resolved(home))
    champion = registry.champion_version()
    registry.client.set_registered_model_alias(registry.name, "champion", "1")  # the session has none: see below
    ran = []
    try:
        for line in todo:
            cmd = command_of(line)
            # ingest, validate and status on a fresh project; predict and config on the session's pipeline (its
            # version 1 made champion for this test alone: the session's versions stayed below the gate's floor)
            where = (["--home", str(fresh_home), "--project", str(fresh_project)]
                     if cmd.startswith("data ") and cmd != "data synth" else
                     ["--home", str(home.root), "--project", str(project)])
            code = main(shlex.split(line)[1:] + where)
            out = capsys.readouterr()
            assert code == 0, f"`{line}` exited {code}:\n{out.out[-2000:]}\n{out.err[-2000:]}"
            assert out.out.strip(), f"`{line}` printed nothing"
            ran.append(cmd)
    finally:
        if champion:
            registry.client.set_registered_model_alias(registry.name, "champion", champion)
        else:
            registry.client.delete_registered_model_alias(registry.name, "champion")
    assert set(ran) == set(RUN_HERE), ran
    # (the quickstart's --mask-out file is written when the answer has a <SEG>: the session's one-epoch models do
    # not emit it; tests/serve covers the mask file on a model that does)
