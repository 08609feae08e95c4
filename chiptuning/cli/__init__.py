"""The `chiptuning` command: one click group; each stage's commands live in their own module."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

import click

from chiptuning import __version__
from chiptuning.errors import ChipTuningError, first_line, is_hub_error

#: Exit status of an interrupted command, by signal (the shell's 128 + signal number).
_INTERRUPTED_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
#: A full disk (or quota), as an errno and as the text other libraries wrap it in (safetensors' Rust
#: "os error 28", HDF5's "errno = 28").
_DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_DISK_FULL = ("No space left on device", "os error 28", "errno = 28", "Disk quota exceeded")


def describe_error(err: BaseException) -> str | None:
    """The one line a user sees for an error they can cause or meet, or None for a bug (which keeps
    its traceback): chip-tuning's own errors, a full disk anywhere, other OS errors (files,
    permissions, network), safetensors and Hugging Face Hub errors."""
    if isinstance(err, ChipTuningError):
        return first_line(err)
    text = str(err)
    if (isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS) or any(s in text for s in _DISK_FULL):
        where = f" (writing {err.filename})" if isinstance(err, OSError) and err.filename else ""
        return (f"no space left on the device{where}; free some space and re-run the same command "
                "(finished work is kept, nothing half-written stays)")
    if is_hub_error(err):
        return (f"the Hugging Face Hub could not be reached or refused the request ({type(err).__name__}: "
                f"{first_line(err)}); check the network, HF_HUB_OFFLINE and your token")
    if type(err).__name__ == "SafetensorError":
        return f"a safetensors file could not be read or written ({first_line(err)})"
    if isinstance(err, OSError):
        if err.strerror and err.filename:
            return f"{err.strerror}: {err.filename}"
        return first_line(err)
    return None


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(signum)  # unwinds like Ctrl-C: temporaries are removed on the way out


class _Group(click.Group):
    """Turns a user error into one line and exit 1 (an interruption: 130 / 143); bugs keep their
    traceback; ``--debug`` (or ``CHIPTUNING_DEBUG=1``) shows every traceback."""

    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug")) or os.environ.get("CHIPTUNING_DEBUG", "") not in ("", "0")
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: signals stay as they are
            previous = None
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # a bad option value or name: one line too, status 2 as click gives
            if debug:
                raise
            hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            one_line = click.ClickException(err.format_message() + hint)  # no usage block
            one_line.exit_code = 2
            raise one_line from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as err:
            if debug:
                raise
            signum = err.args[0] if err.args and err.args[0] in _INTERRUPTED_STATUS else signal.SIGINT
            click.echo("Error: interrupted; re-run the same command to resume (finished work is kept)", err=True)
            ctx.exit(_INTERRUPTED_STATUS[signum])
        except Exception as err:
            message = describe_error(err)
            if message is None or debug:
                raise
            raise click.ClickException(message) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chiptuning")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--debug", is_flag=True, help="Show the full traceback of any error (also CHIPTUNING_DEBUG=1).")
def main(verbose: int, quiet: bool, debug: bool) -> None:
    """Prune a language model for one classification task with chips (tiny per-layer classifiers).

    Pipeline: extract -> probe train -> select -> prune -> eval; or `chiptuning run` for all of it.
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _register() -> None:
    # imported once `main` exists: the commands' modules import this package
    from chiptuning.cli import baselines, cache, compare, extract, probe, prune, run, tasks

    for module in (tasks, extract, cache, probe, prune, baselines, run, compare):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
