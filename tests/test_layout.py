"""The architecture the tree shows: core, then data, train, tools; no cycles; a light core.

The core (``functional``, ``nn``, ``compare`` and their private helpers) needs torch alone;
``manualbp.data`` may use the core, ``manualbp.train`` the core and data, ``manualbp.tools``
everything. No module imports from a wing above its own, and no two modules import each other,
directly or around a loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "manualbp"
WINGS = {"core": 0, "data": 1, "train": 2, "tools": 3, "entry": 4}
TRAIN_EXTRA = ("lightning", "torchvision", "tensorboard", "jsonargparse", "matplotlib", "yaml")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("data", "train", "tools"):
        return parts[1]
    return "entry" if module == "manualbp.__main__" else "core"


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Absolute names imported by the module at ``path`` (``from x import y`` gives ``x`` and
    ``x.y``, so that importing a submodule by ``from`` counts)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_wing_is_a_folder_and_the_core_sits_at_the_top() -> None:
    assert {"functional.py", "nn.py", "compare.py"} <= {p.name for p in PACKAGE.glob("*.py")}
    for folder in ("data", "train", "tools"):
        assert (PACKAGE / folder / "__init__.py").is_file()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_wing_above_its_own(module: str) -> None:
    rank = WINGS[wing(module)]
    for name in imports(MODULES[module], top_level_only=False):
        if name.split(".")[0] == "manualbp" and name in MODULES:
            assert WINGS[wing(name)] <= rank, f"{module} ({wing(module)}) imports {name}"
        if wing(module) == "core":
            assert name.split(".")[0] not in TRAIN_EXTRA, f"core module {module} imports {name}"


def test_no_import_cycles() -> None:
    graph = {
        module: {name for name in imports(path, top_level_only=True) if name in MODULES}
        for module, path in MODULES.items()
    }
    # A package imports its own submodules to re-export them; that is not a cycle.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if t != module and not t.startswith(module + ".")}
    visiting, done = set(), set()

    def visit(module: str, trail: list[str]) -> None:
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join([*trail, module])
        visiting.add(module)
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_core_imports_without_the_train_extra() -> None:
    """With Lightning, torchvision, TensorBoard, ... made unimportable, the core still imports
    and works, and ``manualbp --help`` still answers."""
    blocked = ", ".join(repr(name) for name in TRAIN_EXTRA)
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ({blocked}):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Block())
        import torch
        import manualbp
        from manualbp import compare, functional, nn

        model = nn.MLP([4, 3, 2])
        x = torch.randn(5, 4)
        y = torch.randint(0, 2, (5,))
        report = compare.compare_gradients(
            model, nn.autograd_twin(model), nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), x, y
        )
        report.assert_close()
        assert not any(name.split(".")[0] in ({blocked}) for name in sys.modules)
        from manualbp.__main__ import main
        try:
            main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0
        try:
            main(["fit"])
        except SystemExit as exit:
            assert "[train] extra" in str(exit.code), exit.code
        print("core ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core ok" in result.stdout


def test_functional_reads_formulas_first() -> None:
    """functional.py starts with a Function, not machinery: no signature rewriting, no classes
    built with type(), no private torch._C calls."""
    source = (PACKAGE / "functional.py").read_text()
    body = ast.parse(source).body[1:]  # after the module docstring
    first = next(node for node in body if not isinstance(node, (ast.Import, ast.ImportFrom)))
    assert isinstance(first, ast.ClassDef), f"after the imports comes line {first.lineno}"
    assert first.lineno <= 50, f"the first Function starts at line {first.lineno}"
    for machinery in ("__init_subclass__", "type(", "torch._C", "__signature__"):
        assert machinery not in source, f"functional.py contains {machinery}"
