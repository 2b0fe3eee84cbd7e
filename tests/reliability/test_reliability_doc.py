"""docs/reliability.md lists exactly the cases the tests check (it is generated from them) and all passed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from medplib.config.home import REPO_ROOT


@pytest.mark.integration  # collects the suite in a subprocess: ~20 s
def test_the_table_matches_the_tests_and_every_case_passed():
    p = subprocess.run([sys.executable, str(REPO_ROOT / "docs" / "reliability_table.py"), "--check"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [r for r in (REPO_ROOT / "docs" / "reliability.md").read_text().splitlines() if r.endswith("` |")]
    assert len(rows) >= 60
    outcomes = [r.split(" | ")[-2] for r in rows]
    assert set(outcomes) == {"passed"}, [r for r in rows if " | passed | " not in r]
