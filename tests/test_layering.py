"""The package's modules import one way: each only from its own layer or those below, and never in a circle."""

import ast
from pathlib import Path

import diffusers_emcid

PACKAGE = Path(diffusers_emcid.__file__).parent
LAYERS = [
    {"errors", "cache", "families", "config", "requests", "testing", "version", "shapes.render"},
    {"encoders", "hooks", "tokens"},
    {"key_statistics", "conditioning", "images", "stage1", "stage1_cache", "stage2"},
    {"adapters", "serialization", "card", "kohya", "shared_statistics"},
    {"edits"},
    {"debias", "kinds"},
    {"editor"},
    {
        "loaders",
        "evaluation",
        "evaluation.drift",
        "evaluation.judges",
        "evaluation.metrics",
        "demo",
        "cli",
        "__main__",
        "shapes",
        "shapes.checks",
        "shapes.evaluate",
        "shapes.names",
        "",
    },
]
"""Modules by layer, relative to the package ("" is the package itself), lowest first."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The package modules a file imports anywhere in it (function-level and type-checking imports included)."""
    name = module_name(path)
    parts = name.split(".") if name else []
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "diffusers_emcid":
                target = node.module.removeprefix("diffusers_emcid").removeprefix(".")
            else:
                continue
            found.add(target)
            for alias in node.names:  # `from . import stage1` imports a module
                child = f"{target}.{alias.name}".lstrip(".")
                if (PACKAGE / child.replace(".", "/")).with_suffix(".py").exists():
                    found.add(child)
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("diffusers_emcid").removeprefix(".")
                for a in node.names
                if a.name.split(".")[0] == "diffusers_emcid"
            }
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    layered = set().union(*LAYERS)
    assert set(import_graph()) == layered, set(import_graph()) ^ layered


def test_modules_import_only_from_their_layer_or_below():
    layer = {name: index for index, names in enumerate(LAYERS) for name in names}
    upward = [
        (name, target) for name, targets in import_graph().items() for target in targets if layer[target] > layer[name]
    ]
    assert not upward, f"imports from a higher layer: {upward}"


def test_there_is_no_import_circle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError(f"import circle: {' -> '.join(path[path.index(target) :] + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
