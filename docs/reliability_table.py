"""Write docs/reliability.md: every bad-input, fault and security case the tests check, and its outcome.

    .venv/bin/python docs/reliability_table.py          # run the cases' tests, then write the table
    .venv/bin/python docs/reliability_table.py --check  # exit 1 if the table's cases differ from the tests' cases

Cases come from the tests themselves: parametrized ids, the ingest test's table of broken records, and the
docstrings of the fault and security tests. The outcome column is the result of running them (pytest's JUnit XML).
"""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
INGEST_TEST = "tests/data/test_ingest.py::test_mixed_good_and_broken_source"

# (test file or node prefix, area, what the case must produce)
SOURCES = [
    ("tests/data/test_expectations.py::test_gate_fails_naming_expectation_and_example", "bad input: dataset gate",
     "validation fails naming the expectation and an example"),
    ("tests/serve/test_serve.py::test_bad_requests_name_the_field_and_value", "bad input: predict request",
     "RequestError naming the row, field and value"),
    ("tests/serve/test_serve.py::test_bad_examples_name_the_field", "bad input: predict request",
     "RequestError naming the row, field and value"),
    ("tests/serve/test_serve.py::test_cli_predict_names_bad_inputs", "bad input: CLI arguments", None),
    ("tests/test_cli.py::test_bad_arguments_give_clear_errors", "bad input: CLI arguments", None),
    ("tests/data/test_config.py::test_bad_overrides_name_the_key", "bad input: config", "ConfigError naming the key"),
    ("tests/data/test_config.py::test_bad_yaml_and_missing_file", "bad input: config", None),
    ("tests/reliability/test_checksums.py", "fault: corruption", None),
    ("tests/reliability/test_mlflow_unreachable.py", "fault: MLflow unreachable", None),
    ("tests/reliability/test_promotion_kill.py", "fault: killed promotion", None),
    ("tests/reliability/test_worker_death.py", "fault: worker death", None),
    ("tests/reliability/test_concurrent_pipelines.py", "fault: concurrency", None),
    ("tests/reliability/test_security.py", "security", None),
    ("tests/cluster/test_infra_files.py::test_cluster_profile_turns_mlflow_auth_on_and_holds_no_secret", "security",
     None),
    ("tests/cluster/test_infra_files.py::test_compose_services_images_commands_and_loopback_ports", "security", None),
    ("tests/cluster/test_profiles.py::test_auth_needs_credentials_from_the_environment", "security", None),
]


@dataclass
class Case:
    area: str
    case: str
    expected: str
    node: str  # the pytest node that checks it

    @property
    def key(self) -> str:
        return f"{self.area} | {self.case}"


def _collect(targets: list[str]) -> list[str]:
    files = sorted({t.split("::")[0] for t in targets})
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                       cwd=REPO, capture_output=True, text=True)
    return [line for line in p.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def _doc(node: str) -> str:
    path, name = node.split("::", 1)
    module = importlib.import_module(path[:-3].replace("/", "."))
    fn = getattr(module, name.split("[", 1)[0])
    text = (fn.__doc__ or name.split("[", 1)[0].removeprefix("test_").replace("_", " ")).strip()
    return " ".join(text.split("\n\n", 1)[0].split())


def _param(node: str) -> str:
    m = re.search(r"\[(.*)\]$", node)
    return m.group(1).encode().decode("unicode_escape") if m else ""


def _ingest_cases() -> list[Case]:
    from medplib.data.synth import generate
    from tests.data.test_ingest import make_broken_source

    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "src", n=8, seed=3)
        fields = make_broken_source(Path(tmp) / "src", Path(tmp) / "broken")
    cases = [Case("bad input: record / image / mask", name, f"quarantined; field `{field}` named", INGEST_TEST)
             for name, field in fields.items()]
    cases += [Case("bad input: record / image / mask", "malformed JSON file", "quarantined; the file named",
                   INGEST_TEST),
              Case("bad input: record / image / mask", "unknown file name", "quarantined; the file named",
                   INGEST_TEST)]
    return cases


def cases(collected: list[str] | None = None) -> list[Case]:
    """Every case; `collected`: node ids a running pytest session has already collected (else a subprocess collects
    the files the cases come from)."""
    sys.path.insert(0, str(REPO))
    out = _ingest_cases()
    if collected is None:
        collected = _collect([t for t, _, _ in SOURCES])
    for target, area, expected in SOURCES:
        nodes = [n for n in collected if n == target or n.startswith(target + ("[" if "::" in target else "::"))]
        if not nodes:
            raise SystemExit(f"no tests collected for {target}")
        for node in nodes:
            param = re.sub(r"^row\d+-", "", _param(node))
            # parametrized data-driven cases: the id is the case; otherwise the test's docstring says it
            if param and expected:
                out.append(Case(area, param.split("-", 1)[-1] if area.endswith("config") else param,
                                expected, node))
            else:
                out.append(Case(area, _doc(node) + (f" ({param})" if param else ""), "as stated", node))
    return out


def run(nodes: list[str]) -> dict[str, str]:
    """Run the nodes once; {node: passed|failed|skipped}."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        *sorted(set(nodes))], cwd=REPO)
        results = {}
        for tc in ET.parse(xml).getroot().iter("testcase"):
            node = tc.get("classname").replace(".", "/") + ".py::" + tc.get("name")
            failed = tc.find("failure") is not None or tc.find("error") is not None
            results[node] = "failed" if failed else "skipped" if tc.find("skipped") is not None else "passed"
    return results


def _row(c: Case, outcome: str) -> str:
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return f"| {esc(c.area)} | {esc(c.case)} | {esc(c.expected)} | {outcome} | `{esc(c.node.split('[')[0])}` |"


def write(all_cases: list[Case], results: dict[str, str]) -> None:
    def outcome(c: Case) -> str:
        # pytest's JUnit names drop the file path's folders differently per version: match on the test's name
        hits = [v for k, v in results.items() if k.endswith(c.node.split("::", 1)[1])]
        return hits[0] if hits else "not run"

    counts = {}
    for c in all_cases:
        counts[c.area] = counts.get(c.area, 0) + 1
    lines = ["# Reliability and security cases", "",
             "Generated by `docs/reliability_table.py` from the tests (do not edit by hand): every case, what it",
             "must produce, and the outcome of its test in the run that wrote this page. `make test` runs them all;",
             "`tests/reliability/test_reliability_doc.py` fails when this table and the tests' cases drift apart.",
             "", "| area | cases |", "|---|---|", *(f"| {a} | {n} |" for a, n in counts.items()),
             f"| **all** | **{len(all_cases)}** |", "",
             "| area | case | expected | outcome | test |", "|---|---|---|---|---|",
             *(_row(c, outcome(c)) for c in all_cases), ""]
    DOC.write_text("\n".join(lines), encoding="utf-8")


def documented_keys() -> list[str]:
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| ") and "` |" in line]
    return [" | ".join(c.strip().replace("\\|", "|") for c in r.strip("|").split(" | ")[:2]) for r in rows]


def drift(all_cases: list[Case]) -> str | None:
    """What differs between the table and the cases, or None when it is up to date."""
    want, have = [c.key for c in all_cases], documented_keys() if DOC.exists() else []
    if want == have:
        return None
    return ("docs/reliability.md is out of date; run docs/reliability_table.py\n"
            f"missing: {sorted(set(want) - set(have))}\nstale: {sorted(set(have) - set(want))}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare the table's cases with the tests' cases only")
    args = ap.parse_args()
    all_cases = cases()
    if args.check:
        problem = drift(all_cases)
        if problem:
            print(problem)
        return 1 if problem else 0
    write(all_cases, run([c.node for c in all_cases]))
    print(f"wrote {DOC} ({len(all_cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
