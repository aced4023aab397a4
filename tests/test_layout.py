"""The package layout (issue 26): installed as `tenure`, `tenure.models` independent of
`tenure.engine`, nothing importing the old top-level `engine` / `models` names (a module imported
under two names is two modules: `isinstance(e, TenureError)` fails across them), small packages,
and every package in the wheel."""
import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULES = 14  # per package: about 12 (engine/data/ has 14)
OLD_NAMES = {"engine", "models"}


def packages_on_disk() -> set[str]:
    return {"tenure." + ".".join(init.parent.relative_to(ROOT).parts)
            for top in ("engine", "models") for init in (ROOT / top).rglob("__init__.py")}


def test_models_never_import_engine():
    modules = sorted("tenure." + ".".join(path.with_suffix("").relative_to(ROOT).parts)
                     for path in (ROOT / "models").rglob("*.py") if path.name != "__init__.py")
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=ROOT.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert set(modules) <= loaded
    assert sorted(m for m in loaded if m.startswith("tenure.engine") or m.split(".")[0] in OLD_NAMES) == []


def test_no_import_of_old_top_level_names():
    offenders = []
    for top in ("engine", "models", "tests", "scripts"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "fixtures" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    # importlib targets and `python -m` modules written as strings
                    names = [node.value] if node.value.split(".")[0] in OLD_NAMES and "." in node.value \
                        and node.value.replace(".", "").replace("_", "").isalnum() else []
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names
                              if name.split(".")[0] in OLD_NAMES]
    assert offenders == []


def test_packages_stay_small():
    sizes = {str(init.parent.relative_to(ROOT)): sum(1 for p in init.parent.glob("*.py") if p.name != "__init__.py")
             for init in (ROOT / "engine").rglob("__init__.py")}
    assert len(sizes) > 1
    assert {name: n for name, n in sizes.items() if n > MAX_MODULES} == {}


def test_every_package_is_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"tenure.engine": "engine", "tenure.models": "models"}
    assert set(setuptools["packages"]) == packages_on_disk()


def _kind_literals(node, names: set[str]) -> list[str]:
    """Kind names written as string constants in `node` (a constant, or a tuple / list / set of them)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [item.value for item in items if isinstance(item, ast.Constant) and item.value in names]


def test_task_kind_behaviour_lives_in_the_kind_objects():
    """No comparison with a task kind's name and no table keyed by kind names in engine/ outside
    engine/tasks/kinds/: the rest asks the kind object. (models/ builds and maps model heads, whose
    names the kinds share; it never imports engine/.)"""
    from tenure.engine.tasks.kinds import KINDS
    names = set(KINDS)
    offenders = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        if (ROOT / "engine" / "tasks" / "kinds") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                found = [v for operand in [node.left, *node.comparators] for v in _kind_literals(operand, names)]
            elif isinstance(node, ast.Dict):
                found = [v for key in node.keys if key is not None for v in _kind_literals(key, names)]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {value}" for value in found]
    assert offenders == []
