"""Opening a cache's zarr group from a location string: a directory, a .zip file, or an fsspec URL.

Locations stay strings (URLs) end to end: `s3://bucket/x.zarr` and `simplecache::s3://...` must survive.
"""

from __future__ import annotations

import json
import os
import zipfile

import fsspec
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import GroupNotFoundError
from zarr.storage import FsspecStore, LocalStore, ZipStore

from cache_store.errors import CacheError

LOCAL_SCHEME = "file://"
# What zarr raises for a location that holds no group, and for one whose metadata or zip is damaged.
_NOT_THERE = (GroupNotFoundError, FileNotFoundError, KeyError)
# zarr parses zarr.json without checking its shape: a list where an object belongs raises TypeError, and a
# document nested thousands of levels deep exhausts the JSON parser's recursion.
_DAMAGED = (ValueError, TypeError, AttributeError, RecursionError, zipfile.BadZipFile, NotADirectoryError)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith(LOCAL_SCHEME)


def local_path(url: str) -> str:
    """`file:///x` and `/x` are the same directory (fsspec's local files do not create parents)."""
    return url[len(LOCAL_SCHEME) :] if url.startswith(LOCAL_SCHEME) else url


def check_filesystem(url: str) -> None:
    """The fsspec filesystem a remote location needs is known and installed (s3fs for s3://, gcsfs for
    gs://): said in one line before anything reads or computes, not when the first write fails."""
    if not is_remote(url):
        return
    protocol = url.split("::")[-1].split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        raise CacheError(f"{url} needs a package that is not installed ({e}; for object stores: "
                         "pip install 'richkd-cache[s3]' or 'richkd-cache[gcs]')") from None
    except ValueError as e:
        raise CacheError(f"{url}: {e} (local paths, s3://, gs:// and other fsspec URLs are understood)") from None


def open_store(url: str, read_only: bool) -> Store:
    check_filesystem(url)
    if url.endswith(".zip"):
        if not read_only:
            raise CacheError(f"{url} is a packed cache, which is read-only; build into a directory and pack it")
        if is_remote(url):
            return FsspecStore.from_url(f"zip://::{url}", read_only=True)
        if not os.path.isfile(local_path(url)):
            raise CacheError(f"no packed cache at {url}")
        return ZipStore(local_path(url), mode="r")
    if is_remote(url):
        return FsspecStore.from_url(url, read_only=read_only)
    return LocalStore(local_path(url), read_only=read_only)


def open_group_read(url: str, consolidated: bool = True) -> zarr.Group:
    """Read-only, through the consolidated metadata when the build wrote it (one request on object stores);
    `consolidated=False` reads every node's own zarr.json instead (what `verify` checks too)."""
    if not is_remote(url) and not os.path.exists(local_path(url)):
        raise CacheError(f"no cache at {url}")
    try:
        return zarr.open_group(open_store(url, read_only=True), mode="r", use_consolidated=None if consolidated else False)
    except _NOT_THERE:
        raise CacheError(f"no cache at {url} (no zarr group there)") from None
    except _DAMAGED as e:
        raise CacheError(f"{url} is not a readable zarr group ({type(e).__name__}: {e})") from None


def open_group_write(url: str) -> zarr.Group:
    """An existing group, for writing, through every node's own metadata (never a consolidated view)."""
    try:
        return zarr.open_group(open_store(url, read_only=False), mode="r+", use_consolidated=False)
    except _DAMAGED as e:
        raise CacheError(f"{url} holds a damaged zarr group ({type(e).__name__}: {e}); nothing was changed") from None


def group_exists(url: str) -> bool:
    if url.endswith(".zip"):
        return not is_remote(url) and os.path.isfile(local_path(url))
    try:
        zarr.open_group(open_store(url, read_only=True), mode="r", use_consolidated=False)
        return True
    except _NOT_THERE:
        return False
    except _DAMAGED:
        return True  # something is there; the caller decides whether it may be replaced


def occupied(url: str) -> bool:
    """Anything at all at `url` (a file, a non-empty directory or prefix): creating there would delete it."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return False
    return not fs.isdir(path) or bool(fs.ls(path))


def stored_keys(store: Store) -> set[str]:
    """Every key in the store (one listing: a directory walk, a zip's index, or a few object-store pages)."""

    async def collect() -> set[str]:
        return {key async for key in store.list()}

    return sync(collect())


def key_exists(store: Store, key: str) -> bool:
    return sync(store.exists(key))


def delete_keys(store: Store, keys: set[str]) -> None:
    """Delete exactly these keys, and the folders of top-level nodes that no longer hold anything."""

    async def delete() -> None:
        for key in sorted(keys):
            await store.delete(key)

    sync(delete())
    if isinstance(store, LocalStore):  # empty folders are the only thing left of the deleted nodes
        for top in sorted({key.split("/")[0] for key in keys if "/" in key}):
            for folder, _, _ in sorted(os.walk(store.root / top), reverse=True):
                if not os.listdir(folder):
                    os.rmdir(folder)


def read_json_key(store: Store, key: str) -> object:
    """The JSON document at `key`, None when there is none; CacheError when it is not JSON."""

    async def get() -> bytes | None:
        buffer = await store.get(key, prototype=default_buffer_prototype())
        return None if buffer is None else buffer.to_bytes()

    raw = sync(get())
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{key} is not JSON ({e})") from None
