"""`chiptuning cache info` and `chiptuning cache verify`: look inside a cache without trusting it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chiptuning.cache.store import MANIFEST, MAX_ABS_FEATURE, first_bad_row, open_shard, read_manifest
from chiptuning.errors import CacheError
from chiptuning.io import sha256_file


def cache_info(path: str | Path) -> dict:
    """Summary of a cache from its manifest (cheap: reads no shard)."""
    path = Path(path)
    m = read_manifest(path / MANIFEST)
    meta = m.meta
    size = sum((path / s.file).stat().st_size for s in m.shards if (path / s.file).exists())
    return {"path": str(path), "fingerprint": m.fingerprint, "complete": m.complete,
            "rows": f"{m.stored_rows} / {m.n_rows}", "shards": len(m.shards), "model": meta.model,
            "task": meta.task_name, "split": meta.split, "layers": f"{m.layers[0]}..{m.layers[-1]} ({len(m.layers)})",
            "hidden_size": m.hidden_size, "storage_dtype": m.storage_dtype, "feature_mode": meta.feature_mode,
            "label_names": meta.label_names, "size_mb": round(size / 2**20, 2), "max_length": meta.max_length,
            "n_shortened": m.n_shortened,
            "chip_reads": [f"{p['id']}: ... {p['last_tokens']} -> {p['chip_reads']!r}" for p in m.preview]}


def verify_cache(path: str | Path) -> list[str]:
    """Every problem of a cache (an empty list when it is sound): shards missing or changed, shapes,
    row counts, labels out of range, features that are not finite or not below MAX_ABS_FEATURE."""
    path = Path(path)
    m = read_manifest(path / MANIFEST)
    problems: list[str] = []
    if not m.complete:
        problems.append(f"incomplete: {m.stored_rows} of {m.n_rows} rows stored")
    n_classes = len(m.meta.label_names) or None
    seen: list[np.ndarray] = []
    for shard in m.shards:
        file = path / shard.file
        if not file.exists():
            problems.append(f"{shard.file}: missing")
            continue
        try:
            digest = sha256_file(file)
        except OSError as err:
            problems.append(f"{shard.file}: cannot be read ({err.strerror or err})")
            continue
        if digest != shard.sha256:
            problems.append(f"{shard.file}: checksum mismatch (file changed or corrupt)")
            continue
        try:
            with open_shard(file) as f:
                rows = shard.rows
                for key in ("index", "labels", "example_ids", "n_tokens", "n_choices"):
                    if f[key].shape != (rows,):
                        problems.append(f"{shard.file}: {key} has shape {f[key].shape}, expected ({rows},)")
                labels = f["labels"][:]
                if n_classes and ((labels < 0) | (labels >= n_classes)).any():
                    problems.append(f"{shard.file}: labels outside 0..{n_classes - 1}")
                seen.append(f["index"][:])
                for layer in m.layers:
                    data = f["hidden"][str(layer)]
                    if data.shape != (rows, m.hidden_size):
                        problems.append(f"{shard.file}: hidden/{layer} has shape {data.shape}")
                        continue
                    bad = first_bad_row(data[:], m.storage_dtype)
                    if bad is not None:
                        problems.append(f"{shard.file}: hidden/{layer} has values that are not finite or of "
                                        f"magnitude >= {MAX_ABS_FEATURE:.0f} (first in row {bad})")
        except CacheError as err:
            problems.append(f"{shard.file}: {err}")
        except (OSError, KeyError, ValueError, TypeError) as err:
            problems.append(f"{shard.file}: unreadable ({err})")
    if seen and m.complete:
        index = np.concatenate(seen)
        if len(np.unique(index)) != len(index) or len(index) != m.n_rows:
            problems.append("row index is not a permutation of the examples (duplicate or missing rows)")
    return problems
