"""`chiptuning extract`: model + task data -> HDF5 cache of last-token features."""

from __future__ import annotations

import click

from chiptuning.cli.tasks import load_task_from_options, task_options


@click.command("extract")
@click.option("--model", required=True, help="Hugging Face model id or local directory.")
@task_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to write.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="Most examples per batch  [default: 16 with fixed batches, else the budget decides].")
@click.option("--max-tokens-per-batch", default="auto", show_default=True,
              help="Token budget per batch over length-sorted examples: an integer, 0 for fixed "
                   "batches in dataset order, or auto (from free GPU memory; 8192 on CPU).")
@click.option("--max-length", type=int, default=None, help="Longest prompt in tokens (default: the model's).")
@click.option("--padding-side", type=click.Choice(["right", "left"]), default="right", show_default=True)
@click.option("--storage-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="bfloat16 stores bf16 features exactly; float16 is checked for overflow.")
@click.option("--feature-mode", type=click.Choice(["raw", "normed"]), default="raw", show_default=True)
@click.option("--shard-size", type=int, default=1024, show_default=True, help="Rows per shard.")
@click.option("--device-map", default=None, help="'auto' to spread a large model over GPUs.")
@click.option("--adapter", default=None, help="PEFT/LoRA adapter directory merged into the model first.")
def extract_cmd(model, out, device, dtype, batch_size, max_tokens_per_batch, max_length, padding_side,
                storage_dtype, feature_mode, shard_size, device_map, adapter, **task_opts):
    """Run MODEL once over the data and cache every layer's last-token feature.

    Re-running the same command resumes an interrupted extraction; a cache made with other
    settings is refused.
    """
    from chiptuning.cache import cache_info
    from chiptuning.extract import ExtractConfig, extract

    if max_tokens_per_batch != "auto":
        try:
            max_tokens_per_batch = int(max_tokens_per_batch)
        except ValueError:
            raise click.BadParameter("an integer or auto", param_hint="--max-tokens-per-batch") from None
    task = load_task_from_options(**task_opts)
    config = ExtractConfig(
        out=out, model=model, dtype=dtype, device=device, batch_size=batch_size,
        max_tokens_per_batch=max_tokens_per_batch, max_length=max_length, padding_side=padding_side,
        storage_dtype=storage_dtype, feature_mode=feature_mode, shard_size=shard_size,
        device_map=device_map, adapter=adapter, progress=True,
    )
    path = extract(config, task)
    info = cache_info(path)
    click.echo(f"cache {path}: {info['rows']} rows, layers {info['layers']}, fingerprint {info['fingerprint']}")
    if info["n_shortened"]:
        click.echo(f"{info['n_shortened']} prompts were longer than {info['max_length']} tokens and were "
                   "shortened inside their long field (question, options and answer cue kept)")
    click.echo("what the chip reads (last tokens of the first prompts -> the token read):")
    for line in info["chip_reads"]:
        click.echo(f"  {line}")


COMMANDS = [extract_cmd]
