"""docs/reliability.md lists exactly the cases the tests check (it is generated from them) and all passed."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from medplib.config.home import REPO_ROOT


def _table_module():
    spec = importlib.util.spec_from_file_location("reliability_table", REPO_ROOT / "docs" / "reliability_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_the_table_matches_the_tests_and_every_case_passed(request):
    table = _table_module()
    files = {t.split("::")[0] for t, _, _ in table.SOURCES}
    collected = [item.nodeid for item in request.session.items]
    if files <= {n.split("::")[0] for n in collected}:  # the session collected them all: no second collection
        problem = table.drift(table.cases(collected))
        assert problem is None, problem
    else:  # run alone: the script collects the files itself (~20 s)
        p = subprocess.run([sys.executable, str(REPO_ROOT / "docs" / "reliability_table.py"), "--check"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
    rows = [r for r in (REPO_ROOT / "docs" / "reliability.md").read_text().splitlines() if r.endswith("` |")]
    assert len(rows) >= 60
    outcomes = [r.split(" | ")[-2] for r in rows]
    assert set(outcomes) == {"passed"}, [r for r in rows if " | passed | " not in r]
