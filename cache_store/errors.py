"""The one error type of the cache format: its message is a complete, user-facing line."""


class CacheError(Exception):
    """A cache that is missing, incomplete, from other data, of an unknown version, or malformed."""
