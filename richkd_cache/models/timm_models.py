"""Vision transformers (and any other classifier) from timm by name: `timm:deit_tiny_patch16_224`, ...

Table 11 of the paper distils a CIFAR-100 ResNet56 into four ViT students following Li et al. (LG,
"Locality guidance for improving vision transformers on tiny datasets", ECCV 2022) and AutoKD (Li et
al., ICCV 2023); LG's public code (lkhl/tiny-transformers) writes the settings down. LG builds every ViT at its ImageNet
size and feeds it CIFAR's 32x32 images resized to 224x224 (its `MODEL.IMG_SIZE` default 224 in
pycls/core/config.py, `transforms.Resize` / timm's bicubic crop in pycls/datasets/transforms.py),
with drop path 0.1 (`DROP_PATH_RATE` in every configs/*/*_c100_*.yaml). So here:
- `timm:deit_tiny_patch16_224` is LG's DeiT-Ti (configs/deit/deit-ti_c100_base.yaml: patch 16, dim 192,
  depth 12, 3 heads, mlp ratio 4);
- `timm:pit_ti_224` is LG's PiT-Ti (configs/pit/pit-ti_c100_base.yaml: patch 16, stride 8, dims
  64/128/256, depths 2/6/4, heads 2/4/8);
- `timm:pvt_v2_b0` is LG's PVTv2-b0 (configs/pvtv2/pvtv2-b0_c100_base.yaml), not one of Table 11's four.
Two of Table 11's students are not in timm, so they cannot be named here:
- T2T-ViT-7 (Yuan et al., 2021): timm has no Tokens-to-Token ViT at all (`timm.list_models("*t2t*")` is empty);
- PVT-Ti, PVT v1 tiny (Wang et al., 2021): timm ships only PVT v2 (`pvt_v2_b0`...), whose overlapping
  patch embedding, convolutional MLP and other widths make it a different network with other weights.

The model stays timm's own module tree and class, so its state_dict keys are timm's and timm checkpoints
load strictly; it gains the `_TwoOutputs` mixin, whose forward resizes the input to the size the model was
built for and returns (logits (B, C), pooled pre-logits feature (B, F)), like every model here.

Which size it is built for: `image_size` (timm's `img_size`: a ViT's patch grid and position embeddings).
Stage two passes the data's own size unless the recipe names `student_image_size` (LG's two recipes say
224), so a student is not silently run at 49x the pixels of CIFAR's 32 px images. A network without
`img_size` (a CNN) takes any size and is built as it is. The size goes into the checkpoint
(`model_options`), which rebuilds the same network.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.errors import ModelError

PREFIX = "timm:"
# LG's students that timm has: DeiT-Ti and PiT-Ti (Table 11), PVTv2-b0 (LG's stronger baseline)
LISTED = ("deit_tiny_patch16_224", "pit_ti_224", "pvt_v2_b0")
NOT_IN_TIMM = {"T2T-ViT-7": "timm has no Tokens-to-Token ViT",
               "PVT-Ti": "timm has PVT v2 only (pvt_v2_b0...), a different network from PVT v1 tiny"}
LG_DEFAULTS = {"drop_path_rate": 0.1}  # DROP_PATH_RATE of every LG config; in effect only while training


class _TwoOutputs:
    """Mixed into a timm model's class: forward returns (logits (B, C), pooled features (B, F))."""

    input_size: tuple[int, int]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[-2:]) != self.input_size:
            # LG resizes CIFAR's 32x32 images to the ImageNet size, bicubic (timm's train transform)
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)
        tokens = self.forward_features(x)  # type: ignore[attr-defined]
        pooled = self.forward_head(tokens, pre_logits=True)  # type: ignore[attr-defined]  # (B, F)
        return self.get_classifier()(pooled), pooled  # type: ignore[attr-defined]


def make(name: str, num_classes: int, image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """`timm:<arch>` randomly initialised for `image_size` px inputs (None: timm's default size, 224 for the
    ViTs); `kwargs` go to timm.create_model."""
    try:
        import timm  # here: importing timm costs a second or two that most commands never need
    except ModuleNotFoundError:  # a dependency (open_clip's too), so only a broken environment lacks it
        raise ModelError(f"{name} needs the timm package, which is not installed: pip install 'timm>=1.0'") from None

    arch = name[len(PREFIX):]
    if arch not in timm.list_models():
        raise ModelError(unknown_message(arch))
    options = {**(LG_DEFAULTS if arch in LISTED else {}), **kwargs}
    try:
        net = _create(timm, arch, num_classes, image_size, options)
    except TypeError as e:
        raise ModelError(f"{name} does not take these options ({e})") from None
    head = net.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ModelError(f"{name} does not end in one linear classifier (distilled two-head models and "
                         f"convolutional heads have no single pooled feature to distill): choose another")
    net.__class__ = _tapped_class(type(net))
    default = tuple(net.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])
    net.input_size = default if image_size is None else (image_size, image_size)
    net.model_options = {} if image_size is None else {"image_size": image_size}  # what rebuilds it (checkpoints)
    net.num_features, net.num_classes = head.in_features, num_classes
    return net


def _create(timm: Any, arch: str, num_classes: int, image_size: int | None, options: dict) -> nn.Module:
    """timm's model, built for `image_size` when it has a size (`img_size`); one that has none is built as is."""
    if image_size is not None:
        try:
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=image_size, **options)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **options)



def unknown_message(arch: str) -> str:
    import timm

    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
    hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
    missing = "; ".join(f"{k}: {v}" for k, v in NOT_IN_TIMM.items())
    return (f"timm has no model {arch!r}: {hint}the ViT students of Table 11 are "
            f"{', '.join(PREFIX + n for n in LISTED[:2])} ({missing}); any name in timm.list_models() works")


@functools.cache
def _tapped_class(base: type) -> type:
    """One subclass per timm class, not one per model built."""
    return type(f"Tapped{base.__name__}", (_TwoOutputs, base), {})
