"""`pack`: a complete cache as one zip file (stored, not re-compressed: chunks are zstd already).

The entries are the store's keys (`zarr.json`, `labels/c/0`, ...), which is the layout zarr's ZipStore
reads, so `open_cache("NAME.zip")` works on the result and so does `zarr.open_group(ZipStore(...))`.
"""

from __future__ import annotations

import os
import zipfile

import fsspec

from cache_store._store import local_path
from cache_store.errors import CacheError
from cache_store.reader import open_cache


def pack_cache(url: str, out_zip: str) -> None:
    """Copy the complete cache at `url` (a directory or URL) into the local file `out_zip`, atomically."""
    if url.endswith(".zip"):
        raise CacheError(f"{url} is packed already")
    if not out_zip.endswith(".zip"):
        raise CacheError(f"{out_zip}: a packed cache must end in .zip (that is how readers recognise it)")
    open_cache(url)  # refuses an incomplete or malformed cache before anything is written
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    out_zip = local_path(out_zip)
    tmp = out_zip + ".partial"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for path in sorted(fs.find(root)):
                zf.writestr(path[len(root) + 1 :], fs.cat_file(path))
        os.replace(tmp, out_zip)  # a reader never sees a half-written zip
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
