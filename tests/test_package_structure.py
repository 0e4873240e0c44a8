"""The package's shape: sparsity/ stands below the components, no import cycle, one class per name."""

import ast
from collections import defaultdict
from pathlib import Path

import sparrow_megatron

ROOT = Path(sparrow_megatron.__file__).parent
PKG = "sparrow_megatron"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module `name` imports, at any depth of the file (lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    # A package's __init__ is imported with its submodules but is not a dependency of its own.
    return {t for t in out if not name.startswith(t + ".")}


def test_sparsity_imports_nothing_from_the_layers_above():
    modules = _modules()
    above = ("rollout", "trainer", "loop", "data", "cli", "plots", "calibration", "config")
    for name, path in modules.items():
        if name.startswith(f"{PKG}.sparsity"):
            bad = [t for t in _imports(name, path, modules) if t.split(".")[1] in above]
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_class_name_is_defined_twice():
    where = defaultdict(list)
    for name, path in _modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                where[node.name].append(name)
    twice = {cls: mods for cls, mods in where.items() if len(mods) > 1}
    assert not twice, twice


def test_no_reference_to_files_outside_the_repository():
    repo = ROOT.parent
    files = [
        *ROOT.rglob("*.py"),
        *(repo / "docs").rglob("*.md"),
        repo / "README.md",
        *(repo / "recipes").glob("*"),
    ]
    for path in files:
        text = path.read_text()
        for word in ("DESIGN.md", "NOTES.md", "DESIGN section"):
            assert word not in text, f"{path} cites {word}"
