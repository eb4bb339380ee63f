"""The floors of the house (docs/layout.md): the ground (synthvit's own modules), then real data and models, then
generate, pretrain, finetune and compare. A room imports only the rooms below it and the *contract module* of a
stage below it -- never another stage's loop or CLI entry module -- and no room lists an exception."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
GROUND = "synthvit"
# room -> its folder; the ground is synthvit/ less the rooms inside it
ROOMS = {"synthvit.data": "synthvit/data", "synthvit.models": "synthvit/models", "generate": "generate",
         "pretrain": "pretrain", "finetune": "finetune", "synthvit.compare": "synthvit/compare", GROUND: "synthvit"}
# room -> the rooms (or contract modules) it may import; a room may always import itself
ALLOWED = {
    GROUND: set(),
    "synthvit.data": {GROUND},
    "synthvit.models": {GROUND},
    "generate": {GROUND, "synthvit.data"},
    "pretrain": {GROUND, "synthvit.data", "synthvit.models", "generate.schema"},
    "finetune": {GROUND, "synthvit.data", "synthvit.models", "generate.schema"},
    "synthvit.compare": {GROUND, "synthvit.data", "synthvit.models", "generate.schema", "finetune.config",
                         "finetune.artifacts"},
}


def room_of(module: str) -> str | None:
    """The room a dotted module name belongs to (the longest room prefix), None outside the project."""
    found = [r for r in ROOMS if module == r or module.startswith(r + ".")]
    return max(found, key=len) if found else None


def room_of_file(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
    return room_of(rel)


def imports_of(room: str, root: Path = ROOT) -> set[tuple[str, str]]:
    """(file, imported module) for every import of a project module in ``room``'s files, function-level included."""
    found = set()
    for path in (root / ROOMS[room]).rglob("*.py"):
        if room_of_file(path, root) != room:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found |= {(path.relative_to(root).as_posix(), n) for n in names if room_of(n)}
    return found


def allowed(room: str, module: str) -> bool:
    """Whether ``room`` may import ``module``: its own room, a room it stands on, or a contract module it may read."""
    may = ALLOWED[room] | {room}
    return room_of(module) in may or any(module == c or module.startswith(c + ".") for c in may if c not in ROOMS)


def violations(room: str, root: Path = ROOT) -> list[tuple[str, str]]:
    return sorted((f, m) for f, m in imports_of(room, root) if not allowed(room, m))


@pytest.mark.parametrize("room", list(ALLOWED))
def test_each_room_imports_only_the_floors_and_contracts_below_it(room):
    bad = violations(room)
    assert not bad, f"{room} reaches into: {bad}"


def test_the_rule_can_fail(tmp_path):
    """The check must flag an upward arrow (here generate -> finetune's loop, inside a function) and a reach from
    the ground into a room: copies of two real files, each with one import added."""
    for rel, line in [("generate/backgrounds.py", "    from finetune.train import train\n"),
                      ("synthvit/io.py", "    import synthvit.models.export\n")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text() + "\n\ndef _planted():\n" + line)
    assert violations("generate", tmp_path) == [("generate/backgrounds.py", "finetune.train")]
    assert violations(GROUND, tmp_path) == [("synthvit/io.py", "synthvit.models.export")]
    assert violations("generate") == [] and violations(GROUND) == []


def test_the_wheel_installs_only_synthvit_and_the_three_stages():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"])
    assert {p.split(".")[0] for p in packages} == {"synthvit", "generate", "pretrain", "finetune"}
    assert {"synthvit.data", "synthvit.models", "synthvit.compare", "generate.backends"} <= set(packages)
    on_disk = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in ROOT.glob("**/__init__.py")
               if not {"tests", "benchmarks", ".venv", "build"} & set(p.relative_to(ROOT).parts)}
    assert on_disk <= set(packages), f"packages the wheel would leave out: {sorted(on_disk - set(packages))}"


@pytest.mark.slow
def test_python_m_synthvit_from_a_folder_holding_its_own_generate_models_and_compare(tmp_path):
    """A user's own generate.py, models/ and compare/ in the working directory shadow nothing (the working
    directory is dropped from sys.path as pip's __main__ does)."""
    (tmp_path / "generate.py").write_text("raise SystemExit('the user generate.py was imported')\n")
    for name in ("models", "compare", "finetune"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise SystemExit('the user {name}/ was imported')\n")
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-m", "synthvit", "generate", f"out_dir={out}", "num_samples=4",
                           "samples_per_shard=4", "image_size=32", "num_workers=0", "preview=0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "_info.json").is_file()
    proc = subprocess.run([sys.executable, "-m", "synthvit", "compare", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "budgets" in proc.stdout, proc.stdout + proc.stderr
