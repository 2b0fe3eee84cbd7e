"""Faults (issue 9): the process is killed (SIGKILL) in the middle of a promotion. The `champion` alias is then
unchanged or fully moved, never missing or half set, and promoting again finishes the job."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medplib.config import load_tracking_config
from medplib.registry import TAG_DECISION, EvalMetrics, Registry
from tests.stand_in_model import register_stand_in

DATA = "d" * 32 + ".dir"


def _register(registry: Registry, dice: float) -> str:
    v = register_stand_in(registry, DATA)
    registry.record_eval(v, EvalMetrics(DATA, {"all": {"grounding_mdice": dice}}))
    return v


# The child promotes version 2 and SIGKILLs itself just before the N-th call of one MLflow client method: a crash
# at that exact point, with no chance to clean up.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from mlflow import MlflowClient
    from medplib.registry import Registry
    method, n = sys.argv[1], int(sys.argv[2])
    original, calls = getattr(MlflowClient, method), []
    def dying(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    setattr(MlflowClient, method, dying)
    Registry.from_home(sys.argv[3]).promote_if_better("2")
    print("promotion finished")
""")

# (method, call number): before previous-champion is set, before champion is set, while the decision tags are
# written (champion already moved)
KILL_POINTS = [("set_registered_model_alias", 1), ("set_registered_model_alias", 2), ("set_model_version_tag", 2)]


@pytest.mark.integration  # a subprocess per kill point, each with its own MLflow store
@pytest.mark.parametrize("method, n", KILL_POINTS, ids=["before-fallback-alias", "before-champion-alias",
                                                        "during-decision-tags"])
def test_killed_promotion_leaves_champion_whole(home, method, n):
    registry = Registry(load_tracking_config().resolved(home))
    v1 = _register(registry, 0.5)
    assert registry.promote_if_better(v1).promote
    v2 = _register(registry, 0.7)

    p = subprocess.run([sys.executable, "-c", CHILD, method, str(n), str(home.root)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "MEDPLIB_HOME": str(home.root)})
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert "promotion finished" not in p.stdout

    champion = registry.aliases().get("champion")
    assert champion in (v1, v2)  # never missing, never another version
    if champion == v1:
        assert registry.version_tags(v2).get(TAG_DECISION) is None  # nothing claims v2 was promoted
    # promoting again finishes the job from whatever state the crash left
    decision = registry.promote_if_better(v2)
    assert registry.aliases()["champion"] == v2
    assert decision.promote or "already the champion" in decision.reason
    assert registry.aliases()["previous-champion"] == v1 or champion == v2
