"""Opening a cache's zarr group from a location string: a directory, a .zip file, or an fsspec URL.

Locations stay strings (URLs) end to end: `s3://bucket/x.zarr` and `simplecache::s3://...` must survive.
"""

from __future__ import annotations

import os

import zarr
from zarr.errors import GroupNotFoundError
from zarr.storage import FsspecStore, LocalStore, ZipStore

from cache_store.errors import CacheError


def is_remote(url: str) -> bool:
    return "://" in url


def open_store(url: str, read_only: bool):
    if url.endswith(".zip"):
        if not read_only:
            raise CacheError(f"{url} is a packed cache: it is read-only; build into a directory and `pack` it")
        if not os.path.isfile(url):
            raise CacheError(f"no packed cache at {url}")
        return ZipStore(url, mode="r")
    if is_remote(url):
        return FsspecStore.from_url(url, read_only=read_only)
    return LocalStore(url, read_only=read_only)


def open_group_read(url: str) -> zarr.Group:
    if not is_remote(url) and not os.path.exists(url):
        raise CacheError(f"no cache at {url}")
    try:
        return zarr.open_group(open_store(url, read_only=True), mode="r")
    except (GroupNotFoundError, FileNotFoundError, KeyError):
        raise CacheError(f"no cache at {url} (no zarr group there)") from None


def open_group_write(url: str, mode: str) -> zarr.Group:
    """mode "w" replaces whatever is there; "r+" opens an existing group (no consolidated view)."""
    store = open_store(url, read_only=False)
    if mode == "w":
        return zarr.open_group(store, mode="w", zarr_format=3)
    return zarr.open_group(store, mode="r+", use_consolidated=False)


def exists(url: str) -> bool:
    if url.endswith(".zip"):
        return os.path.isfile(url)
    try:
        zarr.open_group(open_store(url, read_only=True), mode="r", use_consolidated=False)
        return True
    except (GroupNotFoundError, FileNotFoundError, KeyError):
        return False
