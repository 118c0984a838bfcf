"""cache_store: the on-disk cache format (numpy + zarr only, no torch)."""
