"""cache_store: the on-disk cache format (numpy + zarr + fsspec only, no torch), readable by anyone."""

from cache_store.errors import CacheError
from cache_store.pack import pack_cache
from cache_store.reader import CacheReader, open_cache
from cache_store.schema import FORMAT_VERSION, MANIFEST_KEY, ArraySpec, CacheLayout, choose_block_rows
from cache_store.verify import VerifyReport, verify_cache
from cache_store.writer import CacheWriter, create_cache, open_for_write

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_KEY",
    "ArraySpec",
    "CacheError",
    "CacheLayout",
    "CacheReader",
    "CacheWriter",
    "VerifyReport",
    "choose_block_rows",
    "create_cache",
    "open_cache",
    "open_for_write",
    "pack_cache",
    "verify_cache",
]
