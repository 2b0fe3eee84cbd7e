"""The docs cannot drift from the code: every `medplib …` command in README.md and docs/*.md parses with the CLI as
written, the quickstart's example files exist after its own commands, and the architecture page names real paths."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medplib_cli.main import build_parser

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_RE = re.compile(r"```(?:bash|sh)\n(.*?)```", re.S)


def commands(path: Path) -> list[str]:
    """The `medplib …` lines of a page's bash blocks, continuations joined, comments and a trailing `&` dropped."""
    out = []
    for block in BLOCK_RE.findall(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().rstrip("&").strip()
            if line.startswith("medplib "):
                out.append(line)
    return out


# The documented commands that finish on their own run in tests/flows/test_docs_commands.py; the others (they train,
# serve or wait) are run by these tests.
RUN_HERE = ("data synth", "data ingest", "data validate", "data status", "config show", "predict")
ELSEWHERE = {
    "pipeline": "tests/flows/test_pipeline_flow.py", "reproduce": "tests/flows/test_pipeline_flow.py",
    "ui": "tests/flows/test_ui_browser.py", "demo": "tests/serve/test_serve.py",
    "schedule": "tests/flows/test_schedule.py", "retrain": "tests/flows/test_schedule.py",
    "promote": "tests/eval/test_publish.py", "rollback": "tests/eval/test_publish.py",
    "evaluate": "tests/eval/test_publish.py", "data pull": "tests/cluster/test_two_node_ray.py",
}


def command_of(line: str) -> str:
    """`medplib data ingest --source …` → "data ingest"; `medplib predict …` → "predict"."""
    words = shlex.split(line)[1:]
    while words and words[0] == "--profile":  # a global option before the command
        words = words[2:]
    return " ".join(words[:2]) if words[0] in ("data", "config") else words[0]


def test_every_documented_command_is_run_by_a_test():
    for page in DOCS:
        for line in commands(page):
            cmd = command_of(line)
            test = "tests/flows/test_docs_commands.py" if cmd in RUN_HERE else ELSEWHERE.get(cmd)
            assert test, f"{page.name}: `{line}` is run by no test: add it to RUN_HERE or ELSEWHERE"
            text = (ROOT / test).read_text(encoding="utf-8")
            called = (f'"{cmd}"', f"{cmd}(", ", ".join(f'"{w}"' for w in cmd.split()))
            assert cmd in RUN_HERE or any(c in text for c in called), f"{test} does not run `{cmd}`"


def test_the_docs_pages_are_there():
    names = {p.name for p in DOCS}
    assert {"architecture.md", "quickstart.md", "scaling-out.md", "reliability.md", "data.md", "pipeline.md",
            "benchmarks.md"} <= names
    assert len(commands(ROOT / "docs/quickstart.md")) >= 12


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_documented_command_parses(page: Path):
    parser = build_parser()
    for line in commands(page):
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit as e:
            raise AssertionError(f"{page.name}: `{line}` does not parse (exit {e.code})") from None


def test_the_quickstart_predicts_on_an_image_its_synth_line_writes(tmp_path: Path):
    from medplib.data.synth import generate

    lines = commands(ROOT / "docs/quickstart.md")
    synth = next(shlex.split(line) for line in lines if line.startswith("medplib data synth"))
    predict = next(shlex.split(line) for line in lines if line.startswith("medplib predict"))
    out = Path(synth[synth.index("--out") + 1])
    image = Path(predict[predict.index("--image") + 1])
    generate(tmp_path, n=int(synth[synth.index("--n") + 1]))
    assert (tmp_path / image.relative_to(out)).is_file(), image


def test_the_architecture_page_names_real_files():
    text = (ROOT / "docs/architecture.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`((?:medplib|flows|tests|infra|profiles|benchmarks)[\w/.]*)`", text))
    assert len(paths) >= 15
    def exists(p: str) -> bool:  # a path, or a dotted module name (`medplib.model`)
        dotted = p.replace(".", "/") if "/" not in p else p
        return (ROOT / p).exists() or (ROOT / dotted).is_dir() or (ROOT / f"{dotted}.py").is_file()

    missing = sorted(p for p in paths if not exists(p))
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_benchmarks_page_is_the_rendering_of_a_run_of_every_benchmark():
    """docs/benchmarks.md is what benchmarks/table.py renders from its recorded runs; every script in benchmarks/ has a
    row; every benchmark that runs alone ran and exited 0."""
    import importlib.util
    import json
    import sys

    spec = importlib.util.spec_from_file_location("benchmarks_table", ROOT / "benchmarks" / "table.py")
    table = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = table  # its dataclasses look their module up there
    spec.loader.exec_module(table)
    assert table.main(["--check"]) == 0, "docs/benchmarks.md differs from its results: run benchmarks/table.py"
    results = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for bench in table.BENCHES:
        assert f"| `{bench.name}` |" in page
        if not bench.needs:  # runs alone
            assert results.get(bench.name, {}).get("exit_code") == 0, f"{bench.name} has no successful run recorded"
