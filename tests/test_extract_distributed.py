"""Data-parallel extraction: two CPU processes (gloo) under torchrun write one cache."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from chiptuning.cache import CacheReader, verify_cache


def _cli(*args, launcher=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, "-m", "chiptuning", "-q", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=300)


def test_two_process_extraction_equals_single_process(tiny_models, sentiment_file, tmp_path):
    common = ["extract", "--model", tiny_models["llama"], "--data", str(sentiment_file),
              "--text-column", "text", "--device", "cpu", "--batch-size", "3", "--shard-size", "4"]
    single = _cli(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    multi = _cli(*common, "--out", str(tmp_path / "multi"), launcher=torchrun)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = CacheReader(tmp_path / "single"), CacheReader(tmp_path / "multi")
    assert b.manifest["world_size"] == 2
    assert {s["rank"] for s in b.shards} == {0, 1}
    assert a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.example_ids, b.example_ids)
    for layer in a.layers:
        np.testing.assert_array_equal(a.layer(layer), b.layer(layer))
    assert verify_cache(tmp_path / "multi") == []
    # a re-run of a complete data-parallel extraction is a no-op that keeps the cache
    again = _cli(*common, "--out", str(tmp_path / "multi"), launcher=torchrun)
    assert again.returncode == 0, again.stderr[-2000:]
    np.testing.assert_array_equal(CacheReader(tmp_path / "multi").layer(2), a.layer(2))
