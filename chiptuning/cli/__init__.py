"""The `chiptuning` command: one click group; each stage's commands live in their own module."""

from __future__ import annotations

import logging
import sys

import click

from chiptuning import __version__
from chiptuning.errors import ChipTuningError


class _Group(click.Group):
    """Turns a user error into one line and exit 1; bugs keep their traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ChipTuningError as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
            raise click.ClickException(f"{err.strerror}: {err.filename}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chiptuning")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Prune a language model for one classification task with chips (tiny per-layer classifiers).

    Pipeline: extract -> probe train -> select -> prune -> eval; or `chiptuning run` for all of it.
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _register() -> None:
    # the commands' modules; each keeps its heavy imports inside its commands
    from chiptuning.cli import cache, compare, extract, probe, prune, run, tasks

    for module in (tasks, extract, cache, probe, prune, run, compare):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
