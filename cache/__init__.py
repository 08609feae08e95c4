"""The activation cache: HDF5 shards of last-token features, one dataset per layer.

Needs only numpy and h5py. See ``store.py`` for the on-disk layout.
"""

from chiptuning.cache.inspect import cache_info, verify_cache
from chiptuning.cache.store import (
    MANIFEST,
    STORAGE_DTYPES,
    CacheReader,
    CacheWriter,
    fingerprint,
    merge_rank_manifests,
    sha256_file,
    write_json_atomic,
)

__all__ = [
    "MANIFEST",
    "STORAGE_DTYPES",
    "CacheReader",
    "CacheWriter",
    "cache_info",
    "fingerprint",
    "merge_rank_manifests",
    "sha256_file",
    "verify_cache",
    "write_json_atomic",
]
