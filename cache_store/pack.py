"""`pack`: a complete cache as one zip file (stored, not re-compressed: chunks are zstd already).

The entries are the store's keys (`zarr.json`, `labels/c/0`, ...), which is the layout zarr's ZipStore
reads, so `open_cache("NAME.zip")` works on the result and so does `zarr.open_group(ZipStore(...))`.
Only the cache's own keys are packed (zarr metadata and chunk keys of its nodes): never a stray file,
a killed write's `.partial` leftover, or anything a symbolic link points to.
"""

from __future__ import annotations

import os
import secrets
import zipfile

import fsspec

from cache_store._store import is_remote, local_path
from cache_store.errors import CacheError
from cache_store.reader import open_cache
from cache_store.schema import CACHE_KEY


def pack_cache(url: str, out_zip: str, overwrite: bool = False) -> None:
    """Copy the complete cache at `url` (a directory or URL) into the local file `out_zip`, atomically.
    An existing `out_zip` is replaced only when `overwrite`."""
    if url.endswith(".zip"):
        raise CacheError(f"{url} is packed already")
    if not out_zip.endswith(".zip"):
        raise CacheError(f"{out_zip}: a packed cache must end in .zip (that is how readers recognise it)")
    out_zip = local_path(out_zip)
    if os.path.isdir(out_zip):
        raise CacheError(f"{out_zip} is a directory; choose a file name")
    if os.path.lexists(out_zip) and not overwrite:
        raise CacheError(f"{out_zip} already exists; pass --overwrite to replace it")
    open_cache(url)  # refuses an incomplete, damaged or malformed cache before anything is written
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    keys = _local_keys(local_path(url)) if not is_remote(url) else _remote_keys(fs, root)
    folder = os.path.dirname(os.path.abspath(out_zip))
    tmp = os.path.join(folder, f"{os.path.basename(out_zip)}.{secrets.token_hex(4)}.partial")
    try:
        # created like any new file (0666 less the umask: 0644 as a rule, as the cache's own files are),
        # not private as tempfile's would be: a packed cache is made to be shared
        handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, "wb") as file, zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED,
                                                               allowZip64=True) as zf:
            for key in keys:
                zf.writestr(key, fs.cat_file(f"{root}/{key}"))
        os.replace(tmp, out_zip)  # a reader never sees a half-written zip
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _local_keys(root: str) -> list[str]:
    """The cache's keys under a local directory, walked without following links. A link where a cache
    key belongs is refused: packing it would copy whatever it points to (or leave a hole)."""
    keys = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root).replace(os.sep, "/")
            if os.path.islink(path) and (CACHE_KEY.fullmatch(key) or (name in dirs and _inside_cache_node(key))):
                raise CacheError(f"{path} is a symbolic link; pack copies only the cache's own files "
                                 "(replace the link by the file itself)")
            if name in files and not os.path.islink(path) and CACHE_KEY.fullmatch(key):
                keys.append(key)
    return sorted(keys)


def _inside_cache_node(key: str) -> bool:
    """A folder a cache key could lie under (`teacher`, `teacher/logits/c`, ...)."""
    return any(CACHE_KEY.fullmatch(f"{key}/{below}") for below in ("zarr.json", "0", "c/0"))


def _remote_keys(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Object stores have no links: every object under the prefix that is a cache key."""
    keys = (path[len(root) + 1 :] for path in fs.find(root))
    return sorted(key for key in keys if CACHE_KEY.fullmatch(key))
