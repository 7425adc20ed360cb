"""The package layout is the architecture: imports run one way, the robust library stands alone,
and every file name of a run directory is spelled in one module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedgspo"

#: What each package may import of fedgspo besides itself. "top" is every module directly
#: under fedgspo/ except the two leaves; the leaves import nothing of fedgspo.
ALLOWED = {
    "runfiles": set(),
    "distributed": set(),
    "gspo": set(),
    "robust": {"distributed"},
    "entities": {"runfiles", "distributed"},
    "integrity": {"gspo", "distributed", "runfiles"},
    "telemetry": {"entities", "runfiles"},
    "federation": {"robust", "distributed"},
    "top": {"runfiles", "distributed", "gspo", "robust", "entities", "integrity", "telemetry", "federation"},
    "cli": {"runfiles", "distributed", "gspo", "robust", "entities", "integrity", "telemetry", "federation",
            "top"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _group(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return parts[1] if parts[1] in ("runfiles", "distributed") else "top"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fedgspo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedgspo"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    # ``from fedgspo import runfiles`` names the module; the package itself is not a target.
    return {name: {m for m in _imports(path) if m in modules and m not in (name, "fedgspo")}
            for name, path in modules.items()}


def test_imports_only_go_down():
    bad = []
    for module, targets in _graph().items():
        group = _group(module)
        for target in targets:
            other = _group(target)
            if other != group and other not in ALLOWED[group]:
                bad.append(f"{module} -> {target}")
    assert not bad, "upward or sideways imports: " + ", ".join(sorted(bad))


def test_no_import_cycle_between_packages():
    graph = _graph()
    edges = {(_group(a), _group(b)) for a, targets in graph.items() for b in targets if _group(a) != _group(b)}
    edges.discard(("top", "top"))
    groups = {g for e in edges for g in e}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for a, b in edges:
            if a != node:
                continue
            if state.get(b) == 1:
                pytest.fail("package import cycle: " + " -> ".join(path + [b]))
            if b not in state:
                visit(b, path + [b])
        state[node] = 2

    for g in sorted(groups):
        if g not in state:
            visit(g, [g])


def test_robust_library_stands_alone():
    code = ("import sys, fedgspo.robust; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('fedgspo', 'transformers', "
            "'sqlite3', '_sqlite3', 'tensorboard', 'opentelemetry', 'prometheus_client')))))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    forbidden = [m for m in loaded if not m.startswith(("fedgspo.robust", "fedgspo.distributed"))
                 and m not in ("fedgspo", "fedgspo.gspo", "fedgspo.gspo.loss")]
    assert not forbidden, f"importing fedgspo.robust loads {forbidden}"


RUN_FILE = re.compile(r"""["'](config\.yaml|summary\.json|metrics\.jsonl|events\.jsonl|registry\.sqlite|alerts\.jsonl|"""
                      r"""audit\.jsonl|audit\.head\.json|traces\.jsonl|hotswap\.json|checkpoints|requests|tensorboard)["']""")


def test_run_directory_names_have_one_owner():
    spelled = [f"{path.relative_to(PACKAGE)}:{i}" for path in PACKAGE.rglob("*.py") if path.name != "runfiles.py"
               for i, line in enumerate(path.read_text().splitlines(), 1) if RUN_FILE.search(line)]
    assert not spelled, f"run-directory file names outside fedgspo/runfiles.py: {spelled}"
