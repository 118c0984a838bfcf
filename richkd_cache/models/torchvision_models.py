"""ImageNet classifiers from torchvision by name (`tv:resnet18`, `tv:mobilenet_v2`, ...).

The model stays torchvision's own module tree, so its state_dict keys are torchvision's and torchvision
or timm checkpoints load strictly. Two changes make it answer like every model here:
- its final linear layer is swapped for a `FeatureTap` at the same path (same parameters, same keys):
  an nn.Linear that remembers its input, the pooled penultimate feature;
- its class gains the `_TwoOutputs` mixin, whose forward returns (logits, that feature).
The model still passes `isinstance(model, torchvision.models.ResNet)` and friends.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision

from richkd_cache.errors import ModelError

PREFIX = "tv:"
WEIGHTS_PREFIX = "torchvision:"  # --teacher-checkpoint torchvision:IMAGENET1K_V1: torchvision's published weights
LISTED = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "convnext_tiny", "vit_b_16")


class FeatureTap(nn.Linear):
    """A linear head that keeps its input (B, F): the pooled penultimate feature."""

    last_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_input = x
        return super().forward(x)


class _TwoOutputs:
    """Mixed into a torchvision model's class: forward returns (logits (B, C), features (B, F))."""

    _tap_path: str

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().forward(x)  # type: ignore[misc]
        # GoogLeNet and Inception v3 return (logits, aux logits...) while training; the aux heads are
        # ignored here, so they get no gradient: one interface matters more than their small boost.
        logits = getattr(out, "logits", out)
        # looked up by path, not held: a deepcopy or a DataParallel replica then reads its own tap
        tap = self.get_submodule(self._tap_path)  # type: ignore[attr-defined]
        feats, tap.last_input = tap.last_input, None
        return logits, feats


def available() -> list[str]:
    """Every torchvision classification model name (its detection, video... models are elsewhere)."""
    return torchvision.models.list_models(module=torchvision.models)


def _arch(name: str) -> str:
    """`tv:<arch>` -> <arch>, which torchvision must have."""
    arch = name[len(PREFIX):]
    if arch not in available():
        close = difflib.get_close_matches(arch, available(), n=3)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
        raise ModelError(f"torchvision has no classification model {arch!r}: {hint}"
                         f"see torchvision.models.list_models(module=torchvision.models)")
    return arch


def weights_file(name: str, tag: str) -> str:
    """The local file of torchvision's published weights `tag` (IMAGENET1K_V1, DEFAULT...) of `tv:<arch>`.

    It lives where torchvision keeps it, torch.hub's cache ($TORCH_HOME/hub/checkpoints/<file of the url>),
    and is downloaded there when missing (its sha256 checked against the prefix in the file name, as
    torchvision does). A file already there is used as it is, as torchvision uses it. It is then an
    ordinary weights file: loaded weights_only, hashed into the manifest.
    """
    arch = _arch(name)
    weights = torchvision.models.get_model_weights(arch)
    if tag not in weights.__members__:
        raise ModelError(f"torchvision has no weights {tag!r} for {arch}; it has "
                         f"{', '.join(WEIGHTS_PREFIX + t for t in weights.__members__)}")
    url = weights[tag].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if path.is_file():
        return str(path)
    digest = re.search(torch.hub.HASH_REGEX, path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=digest.group(1) if digest else None,
                                       progress=False)
    except (OSError, RuntimeError, ValueError) as e:  # offline (URLError is an OSError), a bad hash
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot download {arch}'s weights {tag} ({reason}): download {url} on a machine that is "
                         f"online and put it at {path}, or pass --teacher-checkpoint FILE") from None
    return str(path)


def make(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """`tv:<arch>` randomly initialised; `kwargs` go to torchvision's builder (e.g. image_size for ViTs)."""
    arch = _arch(name)
    try:
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ModelError(f"{name} does not take these options ({e})") from None
    path, head = _final_linear(net, name, num_classes)
    tap = FeatureTap(head.in_features, head.out_features, bias=head.bias is not None)
    tap.load_state_dict(head.state_dict())
    net.set_submodule(path, tap)
    net.__class__ = _tapped_class(type(net))
    net._tap_path = path
    net.num_features, net.num_classes = head.in_features, num_classes
    return net


@functools.cache
def _tapped_class(base: type) -> type:
    """One subclass per torchvision class, not one per model built."""
    return type(f"Tapped{base.__name__}", (_TwoOutputs, base), {})


def _final_linear(net: nn.Module, name: str, num_classes: int) -> tuple[str, nn.Linear]:
    """The last nn.Linear with `num_classes` outputs (auxiliary heads come earlier in the module tree)."""
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not linears:
        raise ModelError(f"{name} ends in no linear layer, so it has no pooled feature to distill: "
                         f"choose another architecture")
    return linears[-1]
