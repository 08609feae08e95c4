"""`chiptuning cache info | verify`."""

from __future__ import annotations

import json

import click

from chiptuning.errors import CacheError


@click.group("cache", short_help="Inspect and check activation caches.")
def cache_group():
    """Inspect and check activation caches."""


@cache_group.command("info", short_help="Summarise a cache from its manifest.")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_cmd(cache_dir, as_json):
    """Summarise CACHE_DIR from its manifest."""
    from chiptuning.cache import cache_info  # here: `chiptuning --help` stays free of torch

    info = cache_info(cache_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(map(len, info))
    for key, value in info.items():
        for i, line in enumerate(value if key == "chip_reads" and value else [value]):
            click.echo(f"{key if i == 0 else '':<{width}}  {line}")


@cache_group.command("verify", short_help="Check every shard of a cache.")
@click.argument("cache_dir", type=click.Path(file_okay=False))
def verify_cmd(cache_dir):
    """Check every shard of CACHE_DIR: checksums, shapes, counts, finite values."""
    from chiptuning.cache import verify_cache  # here: `chiptuning --help` stays free of torch

    problems = verify_cache(cache_dir)
    if problems:
        raise CacheError(f"{cache_dir}: {len(problems)} problem(s): {'; '.join(problems)}")
    click.echo(f"{cache_dir}: OK")


COMMANDS = [cache_group]
