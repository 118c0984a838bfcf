"""cache_store: the on-disk cache format (numpy + zarr + fsspec only, no torch), readable by anyone.

The names below are imported on first use (PEP 562): importing zarr takes over a second, and the CLI
imports `CacheError` before it knows whether a command reads a cache at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cache_store.errors import CacheError

if TYPE_CHECKING:
    from cache_store.pack import pack_cache
    from cache_store.reader import CacheReader, open_cache
    from cache_store.schema import FORMAT_VERSION, MANIFEST_KEY, ArraySpec, CacheLayout, choose_block_rows
    from cache_store.verify import VerifyReport, verify_cache
    from cache_store.writer import CacheWriter, create_cache, open_for_write

_WHERE = {
    "pack_cache": "pack",
    "CacheReader": "reader", "open_cache": "reader",
    "FORMAT_VERSION": "schema", "MANIFEST_KEY": "schema", "ArraySpec": "schema", "CacheLayout": "schema",
    "choose_block_rows": "schema",
    "VerifyReport": "verify", "verify_cache": "verify",
    "CacheWriter": "writer", "create_cache": "writer", "open_for_write": "writer",
}

__all__ = ["CacheError", *_WHERE]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'cache_store' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cache_store.{_WHERE[name]}"), name)
    globals()[name] = value  # once: later lookups find it without this hook
    return value
