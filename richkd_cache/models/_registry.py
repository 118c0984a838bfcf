"""Every model name in one greppable place, and `create_model` / `list_models` over them."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from richkd_cache.errors import ModelError
from richkd_cache.models import (mobilenetv2, resnet_cifar, resnet_large, shufflenet, timm_models, torchvision_models,
                                 vgg, wrn)

_CIFAR: dict[str, Callable[[str, int], nn.Module]] = {
    **{name: resnet_cifar.make for name in resnet_cifar.CIFAR_RESNETS},
    **{name: wrn.make for name in wrn.WRNS},
    **{name: vgg.make for name in vgg.CONFIGS},
    "MobileNetV2": mobilenetv2.make,
    "ShuffleV1": shufflenet.make,
    "ShuffleV2": shufflenet.make,
    "ResNet18": resnet_large.make,
    "ResNet50": resnet_large.make,
}
_ALIASES = {"mobile_half": "MobileNetV2"}  # mdistiller's function name for the same network
_SMALL_LR = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def list_models(include_torchvision: bool = True, include_timm: bool = True) -> list[str]:
    """The CIFAR zoo, then a few common torchvision models (any `tv:<torchvision name>` works), then the
    ViT students of Table 11 that timm has (any `timm:<timm name>` works; see models/timm_models.py)."""
    names = list(_CIFAR)
    if include_torchvision:
        names += [torchvision_models.PREFIX + n for n in torchvision_models.LISTED]
    if include_timm:
        names += [timm_models.PREFIX + n for n in timm_models.LISTED]
    return names


def canonical_name(name: str) -> str:
    """The registered name behind an alias (mobile_half -> MobileNetV2); other names unchanged."""
    return _ALIASES.get(name, name)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A model with the shared interface: model(x) -> (logits, pooled feature); .num_features, .num_classes.

    `kwargs` reach torchvision's or timm's builder (`create_model("tv:vit_b_16", 10, image_size=64)`); the
    CIFAR models have a fixed recipe and take none, so their checkpoints always fit.
    """
    name = canonical_name(name)
    if name.startswith(torchvision_models.PREFIX):
        return torchvision_models.make(name, num_classes, **kwargs)
    if name.startswith(timm_models.PREFIX):
        return timm_models.make(name, num_classes, **kwargs)
    if name not in _CIFAR:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(
            f"unknown model {name!r}{hint}; valid: {', '.join(list_models(False, False))}, "
            f"or tv:<torchvision name>, or timm:<timm name>"
        )
    if kwargs:
        raise ModelError(f"{name} takes no options (got {', '.join(sorted(kwargs))}): only tv: and timm: models do")
    return _CIFAR[name](name, num_classes)


def input_size_options(name: str, image_size: int) -> dict[str, int]:
    """The options that build `name` for `image_size` px inputs: a timm model has a size (a ViT's patch grid);
    the CIFAR zoo has a fixed recipe, and torchvision's models keep the ImageNet size they are published at."""
    return {"image_size": image_size} if canonical_name(name).startswith(timm_models.PREFIX) else {}


def uses_small_lr(name: str) -> bool:
    """mdistiller trains MobileNet and ShuffleNet students with lr 0.01 instead of 0.05."""
    return canonical_name(name) in _SMALL_LR
