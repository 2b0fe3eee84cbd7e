"""DESIGN's rule of direction: `flows` and the command line import `medplib`; `medplib` never imports `flows`."""
from __future__ import annotations

import ast

from medplib.config.home import REPO_ROOT


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("flows."):
            names.add(node.value)  # a dynamic import by name
    return names


def test_medplib_never_imports_flows_or_the_command_line():
    offenders = {}
    for path in sorted((REPO_ROOT / "medplib").rglob("*.py")):
        bad = {n for n in _imports(path) if n.split(".")[0] in ("flows", "medplib_cli")}
        if bad:
            offenders[str(path.relative_to(REPO_ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_family_registry_and_recipes_stay_inside_medplib():
    from medplib.model.family import FAMILY_MODULES, family_names, get_family

    assert all(m.startswith("medplib.") for m in FAMILY_MODULES.values())
    assert all(get_family(n).recipe.startswith("medplib.") for n in family_names())
