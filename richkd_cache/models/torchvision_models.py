"""ImageNet classifiers from torchvision by name (`tv:resnet18`, `tv:mobilenet_v2`, ...).

The model keeps torchvision's own class and state_dict keys (so torchvision checkpoints load strictly):
its final linear layer is swapped for a same-named `FeatureTap` (an nn.Linear that remembers its input),
and its class gains a mixin whose forward returns (logits, pooled feature) like every other model here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from richkd_cache.errors import ModelError

PREFIX = "tv:"
LISTED = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "convnext_tiny", "vit_b_16")


class FeatureTap(nn.Linear):
    """A linear head that keeps its input: the pooled penultimate feature."""

    last_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_input = x
        return super().forward(x)


class _TwoOutputs:
    """Mixed into a torchvision model's class: forward returns (logits, features)."""

    _tap: FeatureTap

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = super().forward(x)  # type: ignore[misc]
        feats, self._tap.last_input = self._tap.last_input, None
        return logits, feats


def available() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def make(name: str, num_classes: int) -> nn.Module:
    arch = name[len(PREFIX):]
    if arch not in available():
        raise ModelError(f"torchvision has no classification model {arch!r}")
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    path, head = _final_linear(net, num_classes)
    tap = FeatureTap(head.in_features, head.out_features, bias=head.bias is not None)
    tap.load_state_dict(head.state_dict())
    _set_submodule(net, path, tap)
    net.__class__ = type(f"Tapped{type(net).__name__}", (_TwoOutputs, type(net)), {})
    object.__setattr__(net, "_tap", tap)  # not registered twice: it is already in the module tree
    net.num_features, net.num_classes = head.in_features, num_classes
    return net


def _final_linear(net: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not linears:
        raise ModelError(f"{type(net).__name__}: no final linear layer with {num_classes} outputs")
    return linears[-1]


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
