"""What users install: a wheel that holds every module of the source tree and the demo data, and a
test run that exercises the installed package, not the source tree beside it.

CI builds the sdist, builds the wheel from it, installs that wheel (not editable) into a fresh
virtualenv and runs this suite against it; a developer's editable install is checked by building a
wheel from the tree here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import chiptuning
from tests.conftest import REPO

DIST = "chip-tuning"
#: Source folder -> where it installs (setup.cfg package_dir).
INSTALLS_AS = {"chiptuning": "chiptuning", "extract": "chiptuning/extract", "cache": "chiptuning/cache",
               "probe": "chiptuning/probe", "prune": "chiptuning/prune"}


def source_files() -> set[str]:
    """Every module of the source tree, and every data file, as its path inside an installed wheel."""
    if not (REPO / "setup.cfg").is_file():
        pytest.skip("no source tree next to the tests (setup.cfg missing)")
    names = set()
    for folder, target in INSTALLS_AS.items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                names.add(f"{target}/{path.relative_to(REPO / folder).as_posix()}")
    return names


def install_is_editable() -> bool:
    direct_url = metadata.distribution(DIST).read_text("direct_url.json")
    return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))


def test_the_source_tree_has_the_modules_and_demo_data_users_need():
    names = source_files()
    assert {"chiptuning/data/demo.jsonl", "chiptuning/prune/baselines/__init__.py",
            "chiptuning/cli/__init__.py"} <= names


def test_tests_import_the_installed_package():
    """A wheel install must be what the tests import (the source tree must not shadow it)."""
    here = Path(chiptuning.__file__).resolve()
    if install_is_editable():
        assert here.is_relative_to(REPO / "chiptuning"), here
    else:  # (a virtualenv inside the clone is fine: only the source folders must not be imported)
        assert not any(here.is_relative_to(REPO / folder) for folder in INSTALLS_AS), \
            f"the tests imported the source tree ({here}), not the installed wheel"
        installed = {Path(f.locate()).resolve() for f in metadata.files(DIST)}
        assert here in installed
    assert metadata.version(DIST) == chiptuning.__version__


def test_the_installed_wheel_holds_every_module_and_the_demo_data():
    if install_is_editable():
        pytest.skip("editable install: its RECORD lists no modules (the tree's own wheel is checked below)")
    recorded = {f.as_posix() for f in metadata.files(DIST)}
    missing = sorted(source_files() - recorded)
    assert not missing, f"the installed wheel lacks {missing}"


def test_a_wheel_built_from_the_tree_holds_every_module_and_the_demo_data(tmp_path):
    # Built from a copy: a build writes build/ and *.egg-info beside its setup.py, and an egg-info in
    # the tree would shadow the installed distribution's metadata for every later test.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in INSTALLS_AS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("chip_tuning-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(source_files() - names)
    assert not missing, f"a wheel built from the tree lacks {missing}"
    # no generic top-level module (cache, probe, ...) leaks into site-packages
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"chiptuning"}, tops
