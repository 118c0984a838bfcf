"""Teachers and students: the CIFAR zoo of mdistiller/RepDistiller (checkpoint-compatible), torchvision and timm."""

from richkd_cache.models._registry import canonical_name, create_model, input_size_options, list_models, uses_small_lr
from richkd_cache.models.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

__all__ = ["canonical_name", "create_model", "input_size_options", "list_models", "load_checkpoint", "resolve_checkpoint", "save_checkpoint",
           "uses_small_lr"]
