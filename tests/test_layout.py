"""The floors of the house (README, Layout): synthvit/ is the ground, models/ stands on it, and a stage imports
only those two and the contract modules of the stages before it -- never another stage's loop or CLI module."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("synthvit", "models", "generate", "pretrain", "finetune", "compare")
# package -> the other packages' modules it may import (a package may always import itself)
ALLOWED = {
    "synthvit": set(),
    "models": {"synthvit"},
    # generate reads a user's real-data folder (procedural.backgrounds) with finetune's reader of user data, the
    # one contract of real-data layouts (in generate/backgrounds.py alone; see test below)
    "generate": {"synthvit", "finetune.datasets"},
    "pretrain": {"synthvit", "models", "generate.schema"},
    "finetune": {"synthvit", "models", "generate.schema"},
    "compare": {"synthvit", "models", "finetune.config", "finetune.datasets", "finetune.artifacts"},
}


def imports_of(package: str) -> set[tuple[str, str]]:
    """(file, imported module) for every import of a project package in ``package``'s files."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found |= {(str(path.relative_to(ROOT)), n) for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_floors_and_contracts_below_it(package):
    allowed = ALLOWED[package] | {package}
    bad = sorted((f, m) for f, m in imports_of(package)
                 if not any(m == a or m.startswith(a + ".") for a in allowed))
    assert not bad, f"{package} reaches into: {bad}"


def test_only_the_backgrounds_reader_of_generate_reads_real_data():
    assert {f for f, m in imports_of("generate") if m.startswith("finetune")} == {"generate/backgrounds.py"}


def test_the_rule_sees_imports():
    """The check above must be able to fail: compare does import finetune's contract modules."""
    assert ("compare/compose.py", "finetune.artifacts") in imports_of("compare")
