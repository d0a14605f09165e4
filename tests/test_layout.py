"""The house rules of the package layout (docs/design.md §1), checked on the source tree.

Every import counts here, type-only and function-level ones included: a unit (a package
of hypervisor/, a top-level module, or emulator/) may import only units below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests import ROOT

# What each unit may import (besides itself and emulator/, which every unit may use).
ALLOWED = {
    "emulator": set(),
    "hypervisor.lib": set(),
    "hypervisor.stream": {"hypervisor.lib"},
    "hypervisor.mm": {"hypervisor.lib"},
    "hypervisor.core": {"hypervisor.lib", "hypervisor.mm", "hypervisor.stream"},
    "hypervisor.pv": {"hypervisor.lib", "hypervisor.mm", "hypervisor.stream", "hypervisor.core"},
    "hypervisor.hvm": {"hypervisor.lib", "hypervisor.mm", "hypervisor.stream", "hypervisor.core"},
    "hypervisor.liveupdate": {"hypervisor.lib", "hypervisor.mm", "hypervisor.stream",
                              "hypervisor.core", "hypervisor.pv", "hypervisor.hvm"},
}
TOOLS_BELOW = {"hypervisor.lib", "hypervisor.mm", "hypervisor.stream", "hypervisor.core",
               "hypervisor.pv", "hypervisor.hvm", "hypervisor.liveupdate"}


def unit_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[0] == "emulator":
        return "emulator"
    return "hypervisor" if parts[1] == "__init__" else f"hypervisor.{parts[1]}"


def import_graph(root: Path) -> dict[str, dict[str, set[str]]]:
    """unit -> imported unit -> files importing it, for every import statement."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted([*root.glob("emulator/**/*.py"), *root.glob("hypervisor/**/*.py")]):
        src = unit_of(path, root)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "emulator":
                    dst = "emulator"
                elif parts[0] == "hypervisor" and len(parts) > 1:
                    dst = f"hypervisor.{parts[1]}"
                else:
                    continue
                if dst != src:
                    graph.setdefault(src, {}).setdefault(dst, set()).add(
                        str(path.relative_to(root)))
    return graph


def problems(root: Path) -> list[str]:
    found = []
    graph = import_graph(root)
    for src, targets in sorted(graph.items()):
        allowed = ALLOWED.get(src)
        for dst, files in sorted(targets.items()):
            if dst == "emulator" and src != "emulator":
                continue
            if allowed is None:  # a tool on top: anything below, other tools without a cycle
                if dst not in TOOLS_BELOW and src in graph.get(dst, {}):
                    found.append(f"{src} and {dst} import each other ({sorted(files)[0]})")
            elif dst not in allowed:
                found.append(f"{src} imports {dst} ({sorted(files)[0]})")
    return found


def test_no_unit_imports_upward_and_no_two_units_import_each_other():
    assert problems(ROOT) == []


def test_a_handful_of_modules_at_the_top_of_hypervisor():
    assert len([p for p in (ROOT / "hypervisor").glob("*.py") if p.name != "__init__.py"]) <= 6


def test_the_check_sees_an_upward_import_and_a_cycle(tmp_path):
    """The checker itself, on a planted tree: core importing hvm, two tools in a cycle."""
    for name, text in {
        "emulator/engine.py": "",
        "hypervisor/__init__.py": "",
        "hypervisor/core/vm.py": "def f():\n    from hypervisor.hvm.x import y\n",
        "hypervisor/hvm/x.py": "from hypervisor.core.vm import f\ny = 1\n",
        "hypervisor/runner.py": "from hypervisor.cli import main\n",
        "hypervisor/cli.py": "from hypervisor.runner import run\n",
        "hypervisor/mm/typerefs.py": "import emulator.engine\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert problems(tmp_path) == [
        "hypervisor.cli and hypervisor.runner import each other (hypervisor/cli.py)",
        "hypervisor.core imports hypervisor.hvm (hypervisor/core/vm.py)",
        "hypervisor.runner and hypervisor.cli import each other (hypervisor/runner.py)",
    ]
