"""Package layout and import boundaries (run in fresh subprocesses so nothing is pre-imported)."""

from __future__ import annotations

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
