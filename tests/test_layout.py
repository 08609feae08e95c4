"""Package layout and import boundaries (run in fresh subprocesses so nothing is pre-imported)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return set(out.stdout.split())


@pytest.mark.parametrize("stage", ["extract", "cache", "probe", "prune"])
def test_stages_install_under_chiptuning(stage):
    code = f"import chiptuning.{stage} as m; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert stage in out.stdout


def test_no_bare_stage_modules_leak():
    code = "import importlib.util as u; print([n for n in ('extract','cache','probe','prune') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_cache_needs_only_numpy_and_h5py():
    loaded = _modules_after_import("chiptuning.cache")
    assert "torch" not in loaded and "transformers" not in loaded and "sklearn" not in loaded


def test_probe_never_imports_transformers():
    loaded = _modules_after_import("chiptuning.probe")
    assert "transformers" not in loaded


def test_cli_help_is_light():
    loaded = _modules_after_import("chiptuning.cli")
    assert "torch" not in loaded and "transformers" not in loaded


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "chiptuning", "--help"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "extract" in out.stdout and "prune" in out.stdout


# -- import rules, read from the source (every import, including those inside functions) ----------

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: Where each part of the package lives in the repository (setup.cfg's package_dir).
PACKAGE_DIRS = {"chiptuning": REPO / "chiptuning", "chiptuning.extract": REPO / "extract",
                "chiptuning.cache": REPO / "cache", "chiptuning.probe": REPO / "probe",
                "chiptuning.prune": REPO / "prune"}
STAGES = ("cache", "extract", "probe", "prune")
#: What each layer may import from the project. Shared modules (registry, features, encoding, ...)
#: import no stage; a stage imports the shared modules and, of the stages before it, only the
#: cache's and the chips' public readers (the packages ``chiptuning.cache`` / ``chiptuning.probe``);
#: orchestration (the CLI, ``run``, ``compare``) sits on top and may import anything.
ALLOWED = {
    "shared": {"shared"},
    "cache": {"shared", "cache"},
    "extract": {"shared", "cache", "extract"},
    "probe": {"shared", "cache", "probe"},
    "prune": {"shared", "cache", "probe", "prune"},
    "orchestration": {"shared", "cache", "extract", "probe", "prune", "orchestration"},
}
ORCHESTRATION = ("chiptuning.cli", "chiptuning.pipeline", "chiptuning.compare", "chiptuning.__main__")
#: The package itself re-exports ``ChipModel`` (lazily): it stands on top as well.
TOP = "chiptuning"


def _project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "chiptuning" and parts and parts[0] in STAGES:
                continue  # not a real location of a stage
            modules[name] = path
    return modules


def _layer(module: str) -> str:
    if module == TOP or module.startswith(ORCHESTRATION):
        return "orchestration"
    for stage in STAGES:
        if module == f"chiptuning.{stage}" or module.startswith(f"chiptuning.{stage}."):
            return stage
    return "shared"


def _imports(path: Path):
    """(line, imported module, [names], inside a function) of every project import of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module, [a.name for a in node.names], id(node) in nested
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, [], id(node) in nested


def test_stage_import_rules():
    """No stage imports a later stage; earlier stages only through their public package."""
    problems = []
    for module, path in sorted(_project_modules().items()):
        here = _layer(module)
        for line, target, names, _ in _imports(path):
            if not target.startswith("chiptuning") or (target == TOP and names == ["__version__"]):
                continue
            there = _layer(target)
            where = f"{path.relative_to(REPO)}:{line} ({module} -> {target})"
            if there not in ALLOWED[here]:
                problems.append(f"{where}: a {here} module may not import {there}")
            elif there in STAGES and here != there and here != "orchestration" and target != f"chiptuning.{there}":
                problems.append(f"{where}: import the {there} stage through its package, chiptuning.{there}")
    assert not problems, "\n".join(problems)


def test_no_private_names_across_modules():
    problems = []
    for module, path in sorted(_project_modules().items()):
        for line, target, names, _ in _imports(path):
            if target.startswith("chiptuning") and target != module:
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                if private:
                    problems.append(f"{path.relative_to(REPO)}:{line}: imports {private} from {target}")
    assert not problems, "\n".join(problems)


def test_imports_inside_functions_say_why():
    """Imports sit at the top; a lazy one (a heavy optional dependency, or a CLI command keeping
    `--help` instant) carries a comment on its line or the line above."""
    problems = []
    for path in sorted(_project_modules().values()):
        lines = path.read_text().splitlines()
        for line, target, _, nested in _imports(path):
            if nested and not _explained(lines, line - 1):
                problems.append(f"{path.relative_to(REPO)}:{line}: import of {target} inside a function, no comment why")
    assert not problems, "\n".join(problems)


def _explained(lines: list[str], i: int) -> bool:
    """A comment on the import's line, or above the block of imports it is in (imports, blank
    lines, ``try:`` and the ``if`` choosing an optional backend may stand between)."""
    while i >= 0:
        text = lines[i].strip()
        if "#" in text:
            return True
        if not (not text or text.startswith(("import ", "from ", "if ", "elif ")) or text == "try:"):
            return False
        i -= 1
    return False


@pytest.mark.parametrize("module, old, new", [("chiptuning.prune", "TaskChip", "PrunedTask"),
                                              ("chiptuning.prune.provenance", "TaskEntry", "TaskRecord"),
                                              ("chiptuning.probe", "ChipRecord", "LayerChipRecord")])
def test_renamed_public_names_still_import_with_a_deprecation_warning(module, old, new):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        assert getattr(mod, old) is getattr(mod, new)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        mod.NoSuchName  # noqa: B018 - the attribute access is the test
