"""Dependencies are declared as imported: every third-party package the project's code imports is a dependency or in
an extra of pyproject.toml, and what a module imports when it is loaded is a core dependency -- an extra's package
(diffusers, transformers, datasets, s3fs, ...) is imported only inside the function that needs it, so the main job
runs without the extras."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"synthvit", "generate", "pretrain", "finetune"}
PACKAGES = ["synthvit", "generate", "pretrain", "finetune"]
NOT_RUNTIME = {"test", "bench"}  # extras the package code never needs
# declared without being imported: torchvision is timm's dependency, given a range that matches torch's
PINNED_FOR_OTHERS = {"torchvision"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(reqs: list[str]) -> set[str]:
    return {norm(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in reqs}


def declared() -> tuple[set[str], set[str]]:
    """(core dependencies, packages of the runtime extras), normalised distribution names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    return requirement_names(project["dependencies"]), set().union(*(v for k, v in extras.items()
                                                                     if k not in NOT_RUNTIME))


def third_party_imports() -> dict[str, list[tuple[str, bool]]]:
    """import name -> [(file:line, imported when the module loads)] over the package code."""
    found: dict[str, list[tuple[str, bool]]] = {}

    def visit(node: ast.AST, where: str, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = True
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top not in FIRST_PARTY and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, []).append((f"{where}:{child.lineno}", not inner))
            visit(child, where, inner)

    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            visit(ast.parse(path.read_text(), str(path)), path.relative_to(ROOT).as_posix(), False)
    return found


@cache
def installed() -> dict[str, list[str]]:
    return packages_distributions()


def distributions_of(import_name: str) -> set[str]:
    return {norm(d) for d in installed().get(import_name, [])}


def test_every_import_is_declared():
    core, extras = declared()
    undeclared = {name: [w for w, _ in uses][:3] for name, uses in third_party_imports().items()
                  if not distributions_of(name) & (core | extras)}
    assert not undeclared, (f"imported but not declared in pyproject.toml (dependencies or an extra): {undeclared} "
                            f"(installed by {({n: sorted(distributions_of(n)) for n in undeclared})})")


def test_extras_are_imported_lazily():
    core, extras = declared()
    eager = {name: [w for w, at_load in uses if at_load] for name, uses in third_party_imports().items()
             if not distributions_of(name) & core}
    eager = {k: v for k, v in eager.items() if v}
    assert not eager, (f"an extra's package imported when a module loads (import it inside the function that needs "
                       f"it, with an error naming the extra): {eager}")


def test_core_dependencies_are_imported():
    """A core dependency the code never imports belongs in an extra, or nowhere."""
    core, _ = declared()
    imported = set().union(*(distributions_of(n) for n in third_party_imports()))
    assert PINNED_FOR_OTHERS <= core, "timm imports torchvision: keep a range that matches torch's"
    core -= PINNED_FOR_OTHERS
    assert core <= imported, f"declared but never imported by the package code: {sorted(core - imported)}"
