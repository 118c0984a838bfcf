"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class RichKDError(Exception):
    """Base class: the message is a complete, user-facing sentence."""


class ModelError(RichKDError):
    """Unknown architecture, or a checkpoint that does not fit one."""


class DataError(RichKDError):
    """Unknown dataset, missing files, or data that does not match what was asked for."""


class ClipError(RichKDError):
    """Unknown CLIP name, weights that cannot be loaded, or a bad prompt set."""


class ConfigError(RichKDError):
    """A setting or a combination of settings that cannot work."""
