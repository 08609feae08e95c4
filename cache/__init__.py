"""The activation cache: HDF5 shards of last-token features, one dataset per layer (numpy, h5py and a
file lock; no torch): the layout (``store.py``), the records (``manifest.py``), ``cache info`` / ``verify``."""

from chiptuning.cache.inspect import cache_info, verify_cache
from chiptuning.cache.manifest import (
    CacheManifest,
    CacheMeta,
    ShardRecord,
    check_label_names,
    check_layers,
    check_model_stats,
)
from chiptuning.cache.store import (
    MANIFEST,
    MAX_ABS_FEATURE,
    STORAGE_DTYPES,
    CacheReader,
    CacheWriter,
    merge_rank_manifests,
    read_manifest,
)

__all__ = ["MANIFEST", "MAX_ABS_FEATURE", "STORAGE_DTYPES", "CacheManifest", "CacheMeta", "CacheReader", "CacheWriter",
           "ShardRecord", "cache_info", "check_label_names", "check_layers", "check_model_stats",
           "merge_rank_manifests", "read_manifest", "verify_cache"]
