"""`pack`: a complete cache as one zip file (stored, not re-compressed: chunks are zstd already)."""

from __future__ import annotations

import os
import zipfile

import fsspec

from cache_store.errors import CacheError
from cache_store.reader import open_cache


def pack_cache(url: str, out_zip: str) -> None:
    open_cache(url)  # refuses an incomplete or malformed cache before anything is written
    if not out_zip.endswith(".zip"):
        raise CacheError(f"{out_zip}: a packed cache must end in .zip (that is how readers recognise it)")
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    tmp = out_zip + ".partial"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for path in sorted(fs.find(root)):
            zf.writestr(path[len(root) + 1 :], fs.cat_file(path))
    os.replace(tmp, out_zip)  # a reader never sees a half-written zip
