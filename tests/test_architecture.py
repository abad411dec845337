"""The package's shape: data flows one way between its subpackages; torch-free parts stay so.

The import graph is read from the source (every ``import`` statement, including those inside
functions, which run as surely as top-level ones) and checked against the layers below, lowest
first. A module may import its own layer or a lower one; subpackages on the same layer are
independent of each other. Across subpackages only public names are imported. The runtime graph
(imports under ``if TYPE_CHECKING:`` left out) has no cycle between modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cluster_tracking"

#: The layers, lowest first; each entry names subpackages or modules (prefixes of dotted names
#: under ``cluster_tracking``) that may import one another only as the layer order allows.
LAYERS: list[list[str]] = [
    ["errors", "version"],
    ["config", "report", "resources"],
    ["parallel"],
    ["graph"],
    ["spectral"],
    ["nulls"],
    ["measure"],
    ["viz", "promote"],
    ["tracking"],
    ["audit"],
    ["integrations"],
    ["cli", "__main__"],
]
#: Parts that may import each other although they share a layer (a lower one first).
SAME_LAYER_ORDER = {
    ("resources", "config"),
    ("report", "config"),
    ("resources", "report"),
    ("cli", "__main__"),
}
#: The package facade (``cluster_tracking/__init__.py``) re-exports the core's public names: it
#: may import any layer below the integrations, and nothing may import it.
FACADE_MAX_LAYER = "tracking"

#: Modules that must load without torch: what the tracker's child process, the CLI's start-up,
#: plots and the platform adapters import before they know they need a model.
TORCH_FREE = [
    "cluster_tracking.errors",
    "cluster_tracking.report",
    "cluster_tracking.graph.types",
    "cluster_tracking.spectral",
    "cluster_tracking.viz.plots",
    "cluster_tracking.viz.html_report",
    "cluster_tracking.parallel.child",
    "cluster_tracking.integrations.mlflow",
    "cluster_tracking.integrations.wandb",
]


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen in module ``source`` at ``line``."""

    source: str
    target: str
    names: tuple[str, ...]
    line: int
    type_only: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "integrations":
        parts = [PACKAGE, *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> Iterator[Path]:
    yield from sorted((ROOT / PACKAGE).rglob("*.py"))
    yield from sorted((ROOT / "integrations").rglob("*.py"))


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, known: set[str]) -> list[Import]:
    """The package-internal imports of one file, resolved to the modules they load."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    type_only = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE):
                    found.append(
                        Import(source, alias.name, (), node.lineno, node.lineno in type_only)
                    )
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE):
                continue
            names = tuple(alias.name for alias in node.names)
            for name in names:  # `from package import submodule` loads the submodule
                if f"{target}.{name}" in known:
                    loaded = f"{target}.{name}"
                    found.append(Import(source, loaded, (), node.lineno, node.lineno in type_only))
                    names = tuple(n for n in names if n != name)
            if names or not node.names:  # names left that are not submodules
                found.append(Import(source, target, names, node.lineno, node.lineno in type_only))
    return found


def import_graph() -> list[Import]:
    files = list(source_files())
    known = {module_name(path) for path in files}
    return [item for path in files for item in imports_of(path, known)]


def part_of(module: str) -> str:
    """The layer entry a module belongs to (``cluster_tracking.graph.types`` -> ``graph``)."""
    rest = module.removeprefix(PACKAGE).lstrip(".")
    return rest.split(".")[0] if rest else ""


def layer_of(part: str) -> int:
    for index, layer in enumerate(LAYERS):
        if part in layer:
            return index
    raise AssertionError(
        f"{PACKAGE}.{part} is in no layer of tests/test_architecture.py: add it to LAYERS where "
        "it belongs in the data flow."
    )


def layer_violations(edges: list[Import]) -> list[str]:
    problems = []
    facade_max = layer_of(FACADE_MAX_LAYER)
    for edge in edges:
        source, target = part_of(edge.source), part_of(edge.target)
        where = f"{edge.source} (line {edge.line}) imports {edge.target}"
        if target == "":
            if edge.names and set(edge.names) <= {"__version__"} and source == "":
                continue
            problems.append(f"{where}: only users import the package facade; import the module")
            continue
        if source == "":
            if layer_of(target) > facade_max:
                problems.append(f"{where}: the facade re-exports the core only")
            continue
        if source == target:
            continue
        low, high = layer_of(target), layer_of(source)
        if low > high:
            problems.append(f"{where}: a lower layer imports a higher one")
        elif low == high and (target, source) not in SAME_LAYER_ORDER:
            problems.append(f"{where}: {source} and {target} share a layer and must not meet")
    return problems


def private_imports(edges: list[Import]) -> list[str]:
    return [
        f"{edge.source} (line {edge.line}) imports private {name} from {edge.target}"
        for edge in edges
        if part_of(edge.source) != part_of(edge.target)
        for name in edge.names
        if name.startswith("_") and not name.startswith("__")
    ]


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), runtime imports only."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if not edge.type_only and edge.source != edge.target:
            graph.setdefault(edge.source, set()).add(edge.target)
            graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _report(problems: list[str]) -> str:
    return "\n".join(problems)


def test_every_module_has_a_layer() -> None:
    for path in source_files():
        part = part_of(module_name(path))
        if part:
            layer_of(part)


def test_data_flows_one_way_between_layers() -> None:
    problems = layer_violations(import_graph())
    assert not problems, _report(problems)


def test_no_private_name_is_imported_across_subpackages() -> None:
    problems = private_imports(import_graph())
    assert not problems, _report(problems)


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "\n".join(" <-> ".join(component) for component in found)


def test_the_core_never_imports_a_tracking_platform() -> None:
    platforms = ("mlflow", "wandb")  # model libraries (transformers) are not platforms
    problems = []
    for path in (ROOT / PACKAGE).rglob("*.py"):
        if part_of(module_name(path)) in {"cli", "__main__"}:
            continue  # the application layer wires the integrations in
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            problems += [
                f"{module_name(path)} (line {node.lineno}) imports {name}"
                for name in names
                if name.split(".")[0] in platforms
            ]
    assert not problems, _report(problems)


# The checks above must be able to fail: each is run on a graph with one known violation.


def _edge(source: str, target: str, *names: str, type_only: bool = False) -> Import:
    return Import(f"{PACKAGE}.{source}", f"{PACKAGE}.{target}", names, 1, type_only)


def test_the_checks_catch_a_deliberate_violation() -> None:
    assert layer_violations([_edge("graph.types", "spectral.ncut", "ncut")])
    assert layer_violations([_edge("viz.plots", "promote.regularizer", "SpectralRegularizer")])
    assert layer_violations([_edge("measure", "", "baselines")])
    assert not layer_violations([_edge("spectral.ncut", "graph.types", "WeightGraph")])
    assert private_imports([_edge("measure", "parallel.child", "_WorkerProcess")])
    assert not private_imports([_edge("graph.api", "graph.build", "_Builder")])
    assert cycles([_edge("measure", "parallel.child"), _edge("parallel.child", "measure")])
    assert not cycles(
        [_edge("measure", "parallel.child"), _edge("parallel.child", "measure", type_only=True)]
    )
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("utils")


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_import_no_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert not {'mlflow', 'wandb'} & set(sys.modules), 'a platform was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
