"""Read docstrings out of the Python standard library's source files without importing them."""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Third-party code installed next to the stdlib is not part of the corpus, and
# __pycache__ holds no sources.
SKIPPED_DIRECTORY_NAMES = frozenset({"site-packages", "dist-packages", "__pycache__"})

_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Statement fields that hold nested statements. Walking only these (instead of
# ast.walk over every expression node) roughly halves extraction time, and no
# docstring can live inside an expression.
_NESTED_STATEMENT_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def stdlib_directory() -> Path:
    """The folder that holds the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path) -> list[Path]:
    """All .py files under `root`, sorted so the corpus never depends on filesystem order."""
    found: list[Path] = []
    for directory, subdirectories, file_names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in SKIPPED_DIRECTORY_NAMES]
        found.extend(Path(directory) / name for name in file_names if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _docstring_owners(tree: ast.Module) -> Iterator[ast.AST]:
    """Module, class and function nodes of `tree`, in source order."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCSTRING_OWNERS):
            yield node
        children: list[ast.AST] = []
        for field in _NESTED_STATEMENT_FIELDS:
            value = getattr(node, field, None)
            if isinstance(value, list):
                children.extend(child for child in value if isinstance(child, ast.AST))
        stack.extend(reversed(children))


def file_docstrings(path: Path) -> list[str]:
    """Cleaned docstrings of one source file; [] if the file cannot be read or parsed.

    The stdlib test suite deliberately ships broken files (bad syntax, bad coding
    cookies), so parse failures are expected and skipped silently.
    """
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            # Old escape sequences in some files trigger Deprecation/SyntaxWarnings.
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return []
    docstrings = []
    for node in _docstring_owners(tree):
        docstring = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if docstring:
            docstrings.append(docstring)
    return docstrings


def stdlib_docstrings(root: Path) -> Iterator[str]:
    """Every module/class/function docstring under `root`, files in sorted order."""
    for path in stdlib_source_files(root):
        yield from file_docstrings(path)
