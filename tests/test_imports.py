"""The house's plumbing: no import cycles in ``genctr_rec/`` or ``benchmarks/`` (imports inside
functions count), and no module imports a layer above its own. Read from the source with
``ast``: nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("genctr_rec", "benchmarks")

# bottom to top: a module may import its own layer and the ones below
LAYERS = {
    "ground": 0,  # storage, process groups, checkpoints, metrics, logging, progress, config
    "data": 1,  # the dataset format, readers, recipes
    "models": 2,  # tables, decoder, backbones, stage models
    "training": 3,  # loops, checkpoints, stages, evaluation
    "serving": 3,  # export, artifacts, predictor, service (never training's loops)
    "cli": 4,  # the command line, the pipeline
    "benchmarks": 5,
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "benchmarks":
        return "benchmarks"
    sub = parts[1] if len(parts) > 1 else ""
    if sub in ("data", "models", "training", "serving"):
        return sub
    if sub in ("embeddings", "factory"):
        return "models"
    if sub in ("cli", "pipeline"):
        return "cli"
    return "ground"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in it (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(path, name, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [
        f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if LAYERS[layer_of(target)] > LAYERS[layer_of(name)]
        or (layer_of(name), layer_of(target)) in (("serving", "training"), ("training", "serving"))
    ]
    assert upward == []


def test_benchmarks_do_not_import_the_tests() -> None:
    for path in (ROOT / "benchmarks").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            assert not any(n == "tests" or n.startswith("tests.") for n in names), path


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks themselves: a made-up cycle and a made-up upward import are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("genctr_rec.storage") == "ground"
    assert LAYERS[layer_of("genctr_rec.serving.predictor")] > LAYERS[layer_of("genctr_rec.data")]
