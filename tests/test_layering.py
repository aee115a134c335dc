"""The package's shape, checked from its source: imports go down the layers, never in a
cycle, only the command line talks to a terminal, and docs/layout.md lists every module.

Every module under gputech_bench is parsed with ``ast``; nothing is imported, so these
tests take milliseconds and need no torch.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gputech_bench"

#: The layers, lowest first: the one source of truth for which way imports go. A module may
#: import from its own layer's package and from the layers below it, never from above.
#: Each entry names a top-level module or package of gputech_bench ("" is the package's
#: own __init__, which holds the version).
LAYERS: tuple[tuple[str, ...], ...] = (
    # Foundation: import-light, so that the worker's failure path and the runner never
    # pull in torch through them.
    ("",),
    ("errors",),
    ("units",),
    ("files",),
    ("stats",),
    # The catalogue of metrics and memory categories: every layer from measure up reads it.
    ("metrics",),
    ("config",),
    # How memory and time are read: CUDA, NVML, MemTracker, clocks. Knows no model.
    ("measure",),
    # The model built from the config, and its task (masked-LM or causal LM) read from the
    # checkpoint's config.json: below data, which picks the objective and tokenizer by it.
    ("modeling",),
    # Corpus, tokenizer, masking, cached tokens, the eval set and the seeded streams.
    ("data",),
    # The hooks, the registry, the plan; and the process group, which a sharded strategy
    # (FSDP) needs before the training loop exists.
    ("strategies",),
    # The loop, its batches and the evaluation: a plan and data in, figures out.
    ("training",),
    # The contract between the two halves: what a worker writes and every reader reads.
    ("results",),
    # One cell in one process.
    ("worker",),
    # A matrix of cells, each in a worker process.
    ("run",),
    # Fake-tensor traces, prediction, fit: below report, which draws the estimate beside
    # the measurements.
    ("estimator",),
    # A run folder rendered for people: frame, text, markdown, CSV, JSON, HTML, plots.
    ("report",),
    # The Python API: run_matrix, load_run, estimate, fit, compare as objects for notebooks and
    # scripts. Above run, estimate and report (it composes them) and below the command line,
    # which is a thin layer over it: so it never imports cli. Like the command line it is a
    # front end (a notebook's progress display and messages go through rich), never typer.
    ("api",),
    # The command line: the only layer that knows typer.
    ("cli", "__main__"),
)

#: Libraries of the terminal: only the front ends may import them (typer: the command line alone).
PRESENTATION_LIBRARIES = ("typer", "rich")
FRONT_ENDS = {"rich": (("api",), ("cli", "__main__")), "typer": (("cli", "__main__"),)}

#: Libraries slow enough to import (seconds on 2 cores) that a module may import a
#: gputech_bench module inside a function to keep them off a command's start-up path.
HEAVY_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "tokenizers", "pandas", "matplotlib")


@dataclass(frozen=True)
class Import:
    source: str  # dotted module name
    target: str  # dotted name: a gputech_bench module, or an outside library's top-level name
    line: int
    lazy: bool  # inside a function: runs when called, not when the module loads
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs

    @property
    def internal(self) -> bool:
        return self.target == "gputech_bench" or self.target.startswith("gputech_bench.")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, lazy: bool, type_only: bool):
    """Every import statement under ``node``, with whether it runs lazily or never."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, lazy, type_only
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, True, type_only)
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for statement in child.body:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), lazy, True)
            for statement in child.orelse:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), lazy, type_only)
        else:
            yield from _walk(child, lazy, type_only)


def _resolve(source: str, node: ast.ImportFrom) -> str:
    is_package = modules()[source].name == "__init__.py"
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports_of(source: str) -> tuple[Import, ...]:
    tree = ast.parse(modules()[source].read_text(encoding="utf-8"))
    found = []
    for node, lazy, type_only in _walk(tree, False, False):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            origin = _resolve(source, node) if node.level else str(node.module)
            # ``from pkg import sub`` imports the module pkg.sub when there is one.
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules() else origin for a in node.names]
        for target in dict.fromkeys(targets):
            if not (target == "gputech_bench" or target.startswith("gputech_bench.")):
                target = target.split(".")[0]
            found.append(Import(source, target, node.lineno, lazy, type_only))
    return tuple(found)


def all_imports() -> list[Import]:
    return [entry for source in modules() for entry in imports_of(source)]


def layer_of(module: str) -> int:
    top = module.removeprefix("gputech_bench").removeprefix(".").split(".")[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add '{top}' to LAYERS in {Path(__file__).name}")


def where(entry: Import) -> str:
    return f"{modules()[entry.source].relative_to(ROOT)}:{entry.line}"


# --------------------------------------------------------------------------- the rules


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_imports_only_go_down_the_layers():
    upward = [
        f"{where(entry)} {entry.source} imports {entry.target} (layer {LAYERS[layer_of(entry.target)]} is above "
        f"{LAYERS[layer_of(entry.source)]})"
        for entry in all_imports()
        if entry.internal and layer_of(entry.target) > layer_of(entry.source)
    ]
    assert upward == [], "\n".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_even_through_function_level_imports():
    # Lazy and TYPE_CHECKING imports count: a cycle that only a function-level import
    # keeps from failing is still a cycle.
    edges: dict[str, set[str]] = {}
    for entry in all_imports():
        if entry.internal and entry.target != entry.source:
            edges.setdefault(entry.source, set()).add(entry.target)
    assert _cycles(edges) == []


def test_only_the_front_ends_import_typer_or_rich():
    # The library layers return data and text; the front ends decide how a terminal or a
    # notebook shows them (cli.tables builds the rich tables, cli.common prints them; the
    # API's progress display in a notebook). typer belongs to the command line alone.
    found = [
        f"{where(entry)} {entry.source} imports {entry.target}"
        for entry in all_imports()
        if entry.target in PRESENTATION_LIBRARIES and LAYERS[layer_of(entry.source)] not in FRONT_ENDS[entry.target]
    ]
    assert found == [], "\n".join(found)


@cache
def loads(module: str) -> frozenset[str]:
    """What importing ``module`` loads: gputech_bench modules (with their parent packages,
    which Python runs first) and outside libraries, through module-level imports only."""
    loaded: set[str] = set()
    pending = [module]
    while pending:
        current = pending.pop()
        if current in loaded:
            continue
        loaded.add(current)
        parts = current.split(".")
        pending += [".".join(parts[:end]) for end in range(1, len(parts)) if ".".join(parts[:end]) in modules()]
        for entry in imports_of(current) if current in modules() else ():
            if not entry.lazy and not entry.type_only:
                pending.append(entry.target)
    return frozenset(loaded)


def test_function_level_imports_only_keep_heavy_libraries_off_the_start_up_path():
    # A function-level import of a gputech_bench module is there for start-up time only:
    # it must defer a heavy library that the importing module does not load anyway.
    # One that defers nothing heavy is either a habit or hides a cycle; import it at the top.
    wrong = []
    for entry in all_imports():
        if not entry.internal or not entry.lazy or entry.target == entry.source:
            continue
        at_top = {other.target for other in imports_of(entry.source) if not other.lazy and not other.type_only}
        deferred = (loads(entry.target) - loads(entry.source)) & set(HEAVY_LIBRARIES)
        if entry.target in at_top:
            wrong.append(f"{where(entry)} imports {entry.target} again; the module already imports it at the top")
        elif not deferred:
            wrong.append(f"{where(entry)} imports {entry.target} in a function, which loads no heavy library: "
                         "import it at the top")
    assert wrong == [], "\n".join(wrong)


# --------------------------------------------------------------------------- the layout page

LAYOUT_PAGE = ROOT / "docs" / "layout.md"


def documented_layout() -> set[str]:
    """Paths under gputech_bench/ that docs/layout.md's listing (its first code block) names,
    one per line, indented two spaces per level; a folder's line stands for its __init__.py."""
    text = LAYOUT_PAGE.read_text(encoding="utf-8")
    block = re.search(r"^```\n(.*?)^```", text, re.S | re.M)
    assert block, "docs/layout.md has no code block listing the modules"
    listed: set[str] = set()
    folders: list[str] = []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
            listed.add("/".join(folders) + "/__init__.py")
        elif name.endswith(".py"):
            listed.add("/".join([*folders, name]))
    return {path for path in listed if path.startswith("gputech_bench/")}


def test_the_layout_page_lists_every_module_and_no_other():
    actual = {str(path.relative_to(ROOT)) for path in modules().values()}
    listed = documented_layout()
    assert sorted(actual - listed) == [], "modules missing from docs/layout.md"
    assert sorted(listed - actual) == [], "docs/layout.md lists modules that do not exist"


@pytest.mark.parametrize("layer", [names for names in LAYERS if names != ("",)], ids=lambda names: names[0])
def test_every_layer_exists(layer):
    assert any((PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir() for name in layer), layer
