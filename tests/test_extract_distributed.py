"""Data-parallel extraction: two CPU processes (gloo) under torchrun write one cache."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from chiptuning.cache import CacheReader, verify_cache
from chiptuning.errors import CacheError

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")

# Runs the CLI with rank 1 killed (os._exit, no cleanup) at its third batch, a second after the
# second one (time for the background writer to store the first two batches' shards).
DIES = """
import os, sys, time
import chiptuning.extract.extractor as ex

real, calls = ex.features_for_batch, [0]

def dies_on_rank_1(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        calls[0] += 1
        if calls[0] == 3:
            time.sleep(1.0)
            os._exit(3)
    return real(*args, **kwargs)

ex.features_for_batch = dies_on_rank_1
from chiptuning.cli import main
main(sys.argv[1:])
"""


def _cli(*args, launcher=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, "-m", "chiptuning", "-q", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=300)


def test_two_process_extraction_equals_single_process(tiny_models, sentiment_file, tmp_path):
    common = ["extract", "--model", tiny_models["llama"], "--data", str(sentiment_file),
              "--text-column", "text", "--device", "cpu", "--batch-size", "3", "--shard-size", "4"]
    single = _cli(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    multi = _cli(*common, "--out", str(tmp_path / "multi"), launcher=TORCHRUN)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = CacheReader(tmp_path / "single"), CacheReader(tmp_path / "multi")
    assert b.manifest.world_size == 2
    assert {s.rank for s in b.shards} == {0, 1}
    assert a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.example_ids, b.example_ids)
    for layer in a.layers:
        np.testing.assert_array_equal(a.layer(layer), b.layer(layer))
    assert verify_cache(tmp_path / "multi") == []
    # a re-run of a complete data-parallel extraction is a no-op that keeps the cache
    again = _cli(*common, "--out", str(tmp_path / "multi"), launcher=TORCHRUN)
    assert again.returncode == 0, again.stderr[-2000:]
    np.testing.assert_array_equal(CacheReader(tmp_path / "multi").layer(2), a.layer(2))


def test_interrupted_data_parallel_run_resumes_per_rank(tiny_models, sentiment_file, tmp_path):
    """Rank 1 is killed mid-run: the cache is refused as unfinished; the same command again
    resumes each rank from what it had stored and ends with the single-process cache."""
    common = ["extract", "--model", tiny_models["llama"], "--data", str(sentiment_file),
              "--text-column", "text", "--device", "cpu", "--batch-size", "3", "--shard-size", "2"]
    single = _cli(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    script = tmp_path / "dies.py"
    script.write_text(DIES)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, *TORCHRUN, str(script), "-q", *common, "--out", str(tmp_path / "multi")],
                            capture_output=True, text=True, env=env, cwd="/", timeout=300)
    assert killed.returncode != 0
    with pytest.raises(CacheError):
        CacheReader(tmp_path / "multi")
    stored = {p.name: p.read_bytes() for p in (tmp_path / "multi").glob("shard-r01-*.h5")}
    assert len(stored) >= 1  # rank 1 had written shards before it died: something to resume from
    resumed = _cli(*common, "--out", str(tmp_path / "multi"), launcher=TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = CacheReader(tmp_path / "single"), CacheReader(tmp_path / "multi")
    np.testing.assert_array_equal(a.example_ids, b.example_ids)
    for layer in a.layers:
        np.testing.assert_array_equal(a.layer(layer), b.layer(layer))
    assert verify_cache(tmp_path / "multi") == []
    for name, content in stored.items():  # rank 1 kept what it had stored and computed only the rest
        assert (tmp_path / "multi" / name).read_bytes() == content
    assert len(list((tmp_path / "multi").glob("shard-r01-*.h5"))) > len(stored)
