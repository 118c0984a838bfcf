"""Checkpoints in mdistiller's layout: {"model": state_dict, "epoch", "best_acc"} plus our "richkd" metadata.

mdistiller's `cifar_teachers` files (`<arch>_vanilla/ckpt_epoch_240.pth`) load strictly into our model of
the same name, and our files load back into mdistiller, which reads only the "model" key.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from richkd_cache.errors import ModelError
from richkd_cache.models._registry import canonical_name, create_model

FORMAT = 1


def save_checkpoint(path: str, model: nn.Module, *, arch: str, num_classes: int, epoch: int | None = None,
                    best_acc: float | None = None, extra: dict | None = None) -> None:
    """Write atomically (temp file + rename): a crash never leaves a truncated checkpoint behind."""
    payload = {
        "model": model.state_dict(),
        "epoch": epoch,
        "best_acc": best_acc,
        "richkd": {"format": FORMAT, "arch": canonical_name(arch), "num_classes": num_classes, **(extra or {})},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, target)


def load_checkpoint(path: str, arch: str | None = None, num_classes: int | None = None,
                    map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata). `arch` is needed for files without our metadata (mdistiller's)."""
    payload = _read(path)
    meta = payload.get("richkd", {}) if isinstance(payload, dict) else {}
    state = _state_dict(payload, path)
    arch = canonical_name(arch or meta.get("arch") or "")
    if not arch:
        raise ModelError(f"{path} does not say which architecture it holds: pass --teacher ARCH (e.g. resnet32x4)")
    found = _num_classes(state)
    if num_classes is not None and found is not None and found != num_classes:
        raise ModelError(f"{path} has {found} classes but the dataset has {num_classes}: it is a teacher for other data")
    model = create_model(arch, num_classes or found or meta.get("num_classes"))
    _load_strict(model, state, path, arch)
    return model.eval(), {"arch": arch, "epoch": payload.get("epoch"), "best_acc": payload.get("best_acc"), **meta}


def _read(path: str) -> dict:
    if not Path(path).is_file():
        raise ModelError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, IndexError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelError(f"{path} is not a readable PyTorch checkpoint ({first[:200]})") from None


def _state_dict(payload: object, path: str) -> dict[str, torch.Tensor]:
    """Accept {"model": sd}, {"state_dict": sd} or a bare state dict; strip DataParallel's "module."."""
    state = payload
    if isinstance(payload, dict):
        for key in ("model", "state_dict"):
            if isinstance(payload.get(key), dict):
                state = payload[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} holds no model state dict (expected weights under 'model')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """The output count of the final linear layer: the last 2-D weight with a matching 1-D bias."""
    for key in reversed(list(state)):
        if key.endswith(".weight") and state[key].ndim == 2 and key[: -len("weight")] + "bias" in state:
            return state[key].shape[0]
    return None


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str, arch: str) -> None:
    """Strict key and shape matching, summarised in one line when it fails."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: {list(state[k].shape)} vs {list(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({mismatched[0]})")
        raise ModelError(f"checkpoint {path} does not fit {arch}: {', '.join(parts)}")
    model.load_state_dict(state, strict=True)
