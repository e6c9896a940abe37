"""The package's layers only point down, its modules import no circle, and none outgrows one sitting.

Every ``import`` in ``ftserve/`` counts, including those inside functions: an import deferred to run time is
still a dependency. ``ftserve/__init__.py`` (the lazy public API) sits above everything and is not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ftserve"

# Lowest first. A module may import its own layer or any layer listed before it.
LAYERS = (
    ("version", "errors"),
    ("methods",),  # the registry: a FineTuningConfig asks it what a method name means
    ("config",),
    ("files",),
    ("model",),
    ("testing",),
    ("merge",),
    ("train",),  # ftserve train on transformers' Trainer; QLoRA loading
    ("engine",),
    ("server",),
    ("quickstart",),
    ("cli",),
)
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS in {__file__}")


def imports_of(module: str) -> set[str]:
    """The ftserve modules ``module`` imports (``from X import y`` counts X.y when that is a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        # A module's own packages are imported before it anyway: ``from . import x`` depends on x, not on them.
        found |= {name for name in names if name in MODULES and name != module
                  and (name == "ftserve" or not module.startswith(name + "."))}
    return found


GRAPH = {module: imports_of(module) for module in MODULES if module != "ftserve"}


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{module} (layer {LAYERS[layer_of(module)][0]}) imports {target} (layer "
              f"{LAYERS[layer_of(target)][0]})"
              for module, targets in GRAPH.items() for target in sorted(targets)
              if target != "ftserve" and layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_package_root():
    """The root re-exports everything lazily; importing it from inside would hide the real dependency."""
    assert not [module for module, targets in GRAPH.items() if "ftserve" in targets]


def test_the_imports_have_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_reads_in_one_sitting(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines; split it by concern"


def test_the_package_and_its_help_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, ftserve, finetuning_toolkit, ftserve.cli; from ftserve import __version__; "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
