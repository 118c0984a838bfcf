"""richkd_cache: the library half of richkd-cache (models, data, CLIP, fusion and losses)."""

__version__ = "0.1.0"
