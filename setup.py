"""Package discovery; everything else (metadata, dependencies, extras) is declared in setup.cfg.

The four stage folders (extract/, cache/, probe/, prune/) sit at the repository root and install
under the one namespace ``chiptuning`` (setup.cfg ``package_dir``). Their subpackages are found
here, not listed by hand, so a new folder is in the wheel without a word.
"""

from setuptools import find_namespace_packages, setup

STAGES = ("extract", "cache", "probe", "prune")


def found(top: str) -> list[str]:
    """``top`` and every folder under it (``chiptuning/data`` is a folder of data, not code)."""
    return find_namespace_packages(include=[top, f"{top}.*"], exclude=["*__pycache__*"])


packages = found("chiptuning")
for stage in STAGES:
    packages += [f"chiptuning.{name}" for name in found(stage)]

setup(packages=packages)
