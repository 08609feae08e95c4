"""`chiptuning extract`: model + task data -> HDF5 cache of last-token features."""

from __future__ import annotations

import click

from chiptuning.cli.tasks import batching_options, load_task_from_options, offload_option, task_options


@click.command("extract", short_help="Cache every layer's last-token feature of the data.")
@click.option("--model", required=True, help="Hugging Face model id, local directory, or GGUF file (converted once).")
@task_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to write.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Compute dtype of the model; bf16 halves memory (fast on GPUs and on CPUs with AMX / AVX512-BF16).")
@batching_options
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Longest prompt in tokens, at most the model's limit (default: that limit).")
@click.option("--padding-side", type=click.Choice(["right", "left"]), default="right", show_default=True,
              help="Side prompts are padded on; the last real token is found from the mask either way.")
@click.option("--storage-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="bfloat16 stores bf16 features exactly; float16 is checked for overflow.")
@click.option("--feature-mode", type=click.Choice(["raw", "normed"]), default="raw", show_default=True,
              help="raw: each block's residual-stream output (the layer convention); normed: with the final norm "
                   "applied.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True, help="Rows per shard.")
@click.option("--device-map", default=None, help="'auto' to spread a large model over GPUs.")
@offload_option
@click.option("--adapter", default=None, help="PEFT/LoRA adapter directory merged into the model first.")
@click.option("--lens/--no-lens", default=True, show_default=True,
              help="Decoders: also store the LM head's logits of the label words at every layer (the "
                   "model's own answer by depth; at the last layer its zero-shot answer).")
def extract_cmd(model, out, device, dtype, batch_size, max_tokens_per_batch, max_length, padding_side,
                storage_dtype, feature_mode, shard_size, device_map, offload, adapter, lens, **task_opts):
    """Run MODEL once over the data and cache every layer's last-token feature.

    Re-running the same command resumes an interrupted extraction; a cache made with other
    settings, a non-empty directory that is not a cache, and a second extraction writing the same
    cache at the same time are refused.
    """
    from chiptuning.cache import cache_info  # here: `chiptuning --help` stays free of torch
    from chiptuning.extract import ExtractConfig, extract

    task = load_task_from_options(**task_opts)
    config = ExtractConfig(out=out, model=model, dtype=dtype, device=device, batch_size=batch_size,
                           max_tokens_per_batch=max_tokens_per_batch, max_length=max_length, padding_side=padding_side,
                           storage_dtype=storage_dtype, feature_mode=feature_mode, shard_size=shard_size,
                           device_map=device_map, offload=offload, adapter=adapter, lens=lens, progress=True)
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
