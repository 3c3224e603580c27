"""The house's rule: imports run one way, down the table in README's "Layout" section.

Every ``import`` of a rankopt module (top-level or inside a function) is read with ``ast``; a
package may import only the packages below it. A new upward import fails here, naming the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rankopt

ROOT = Path(rankopt.__file__).parent
FOUNDATION = {"errors", "config", "devices", "distributed"}  # top-level modules every package may use
# package -> what it may import besides the foundation (and itself)
ALLOWED = {
    "adapters": set(),
    "controller": {"adapters"},
    "tasks": set(),
    "training": {"adapters", "controller", "tasks"},
    "figures": {"training"},
    "tracking": {"adapters", "figures", "training"},
    "search": {"adapters", "controller", "tasks", "training", "tracking"},
    "outputs": {"adapters", "figures", "search", "tasks", "tracking", "training"},
    "testing": set(),  # instruments that measure the rest from outside
}
LOWER = {"errors": set(), "devices": {"errors"}, "config": {"errors"}, "distributed": {"errors"}}


def rankopt_imports(path: Path) -> list[tuple[int, str]]:
    """(line, first component under rankopt) of every rankopt import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rankopt":
            parts = node.module.split(".")
            if len(parts) > 1:
                found.append((node.lineno, parts[1]))
            else:  # from rankopt import x
                found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "rankopt" and len(parts) > 1:
                    found.append((node.lineno, parts[1]))
    return found


def owner(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_down_the_layers(path):
    me = owner(path)
    if me in ALLOWED:
        allowed = ALLOWED[me] | FOUNDATION | {me}
    elif me in LOWER:
        allowed = LOWER[me] | {me}
    else:  # the public surface: api, cli, __init__ may use anything
        return
    upward = [f"{path.relative_to(ROOT)}:{line} imports rankopt.{target}"
              for line, target in rankopt_imports(path) if target not in allowed]
    assert not upward, "; ".join(upward)


def test_every_package_says_what_it_holds_and_may_import():
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == sorted(ALLOWED)
    for name in packages:
        doc = ast.get_docstring(ast.parse((ROOT / name / "__init__.py").read_text()))
        assert doc and "import" in doc, f"rankopt/{name}/__init__.py needs a docstring saying what it may import"


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rankopt.search.tuner import tune\n    from rankopt import tracking\n")
    assert rankopt_imports(bad) == [(2, "search"), (3, "tracking")]
