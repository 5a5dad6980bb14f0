"""The page and the HTTP API speak to the cluster only through its public API (``cluster.api``; the
command-line flags from ``cluster.options``): no module under ``ui/`` imports ``model``, ``actors``,
``kernels`` or another part of ``cluster``, and nothing imports the ``cluster.cli`` entry point."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"cluster.api", "cluster.options"}
PROJECT = ("model", "actors", "kernels", "cluster")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_ui_uses_the_public_api_only():
    bad = {f"{p.name}: {m}" for p in (ROOT / "ui").glob("*.py") for m in _imports(p)
           if m.split(".")[0] in PROJECT and m not in ALLOWED}
    assert not bad, f"ui/ reaches past the cluster's public API: {sorted(bad)}"


def test_nothing_imports_the_entry_point():
    users = [str(p.relative_to(ROOT)) for folder in ("cluster", "actors", "model", "kernels", "ui")
             for p in (ROOT / folder).glob("*.py") if p.name != "cli.py" and "cluster.cli" in _imports(p)]
    assert not users, f"these import the command-line entry point: {users}"
