"""`chiptuning` commands of the run stage."""

import click  # noqa: F401

COMMANDS: list = []
