"""Checkpoints in mdistiller's layout: {"model": state_dict, "epoch", "best_acc"} plus our "richkd" metadata.

mdistiller's `cifar_teachers` files (`<arch>_vanilla/ckpt_epoch_240.pth`) load strictly into our model of
the same name, and our files load back into mdistiller, which reads only the "model" key.
"""

from __future__ import annotations

import argparse
import errno
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from richkd_cache.errors import ModelError
from richkd_cache.files import atomic_path
from richkd_cache.models import torchvision_models
from richkd_cache.models._registry import canonical_name, create_model

FORMAT = 1


def save_checkpoint(path: str, model: nn.Module, *, arch: str, num_classes: int, epoch: int | None = None,
                    best_acc: float | None = None, extra: dict | None = None) -> None:
    """Write atomically (temp file in the same folder + rename): a crash never leaves a truncated checkpoint."""
    options = getattr(model, "model_options", None)  # how it was built (a timm ViT's input size), if not the default
    payload = {
        "model": model.state_dict(),
        "epoch": epoch,
        "best_acc": best_acc,
        # our keys last, so `extra` cannot make the file misstate what it holds
        "richkd": {**(extra or {}), "format": FORMAT, "arch": canonical_name(arch), "num_classes": num_classes,
                   **({"model_options": options} if options else {})},
    }
    atomic_torch_save(payload, path)


def atomic_torch_save(obj: dict, path: str | Path) -> None:
    """torch.save through a temporary file and a rename. torch's own file writer reports a full disk
    as a RuntimeError from its C++ stream writer ("[enforce fail at inline_container.cc] ... unexpected
    pos"): it is raised as the OSError it is, with the space left, so callers name the file in one line."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
                raise
            free = shutil.disk_usage(Path(tmp).parent).free
            raise OSError(errno.ENOSPC if free < (1 << 20) else errno.EIO,
                          f"torch's writer failed with {free:,} bytes free on that disk") from None


def resolve_checkpoint(spec: str, arch: str | None) -> str:
    """A weights file path as given, or `torchvision:TAG` (torchvision's published weights of a `tv:` arch)
    as the path of its file in torch.hub's cache, downloaded when missing."""
    if not spec.startswith(torchvision_models.WEIGHTS_PREFIX):
        return spec
    if not arch or not canonical_name(arch).startswith(torchvision_models.PREFIX):
        raise ModelError(f"{spec} names torchvision's published weights: pass the architecture as --teacher "
                         f"tv:<name> (e.g. --teacher tv:resnet34)")
    return torchvision_models.weights_file(canonical_name(arch), spec[len(torchvision_models.WEIGHTS_PREFIX):])


def load_checkpoint(path: str, arch: str | None = None, num_classes: int | None = None,
                    map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on `map_location`, metadata). `arch` is required for files without our metadata.

    The metadata holds arch, num_classes, epoch, best_acc (plain Python numbers) and our "richkd" entries.
    """
    payload = _read(path, map_location)
    state = _state_dict(payload, path)
    meta = payload.get("richkd", {})
    arch = _resolve_arch(path, arch, meta.get("arch"))
    num_classes = _resolve_num_classes(path, num_classes, _num_classes(state), meta.get("num_classes"))
    model = create_model(arch, num_classes, **meta.get("model_options", {})).to(map_location)
    _load_strict(model, state, path, arch)
    info = {"epoch": payload.get("epoch"), "best_acc": payload.get("best_acc"), **meta,
            "arch": arch, "num_classes": num_classes}
    return model.eval(), {k: _plain(v) for k, v in info.items()}


def _plain_data_globals() -> list:
    """Plain data that training scripts store beside the weights: numpy numbers and arrays (a best
    accuracy) and argparse.Namespace (timm's `args`). Unpickling them runs no code, so weights_only
    loading may accept them; anything else is refused."""
    numpy_types = [np.dtype, np.ndarray, *(getattr(np.dtypes, n) for n in np.dtypes.__all__)]
    # the functions numpy pickles numbers and arrays with; numpy 1 files call their module numpy.core,
    # numpy 2 files numpy._core, so both names are allowed
    rebuilders = (np.float64(0).__reduce__()[0], np.zeros(1).__reduce__()[0])
    numpy_functions = [(f, f"{module}.multiarray.{f.__name__}") for f in rebuilders
                       for module in ("numpy._core", "numpy.core")]
    return [argparse.Namespace, *numpy_types, *numpy_functions]


def _read(path: str, map_location: str) -> dict:
    if not Path(path).is_file():
        raise ModelError(f"checkpoint {path} not found")
    allowed = _plain_data_globals()
    try:
        payload = load_plain_data(path, map_location, allowed)
    except pickle.UnpicklingError as e:
        refusal = holds_code(path, e, allowed)
        if refusal:
            raise ModelError(f"{refusal}: save only model.state_dict() from the program that trained it") from None
        raise ModelError(f"{path} is not a PyTorch checkpoint (not written by torch.save)") from None
    except (ValueError, IndexError, KeyError):  # what torch's unpickler raises on arbitrary bytes
        raise ModelError(f"{path} is not a PyTorch checkpoint (not written by torch.save)") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"{path} is not a readable PyTorch checkpoint, perhaps truncated ({_first_line(e)})") from None
    if not isinstance(payload, dict):
        raise ModelError(f"{path} holds a {type(payload).__name__}, not a state dict or a dict with one under 'model'")
    return payload


def load_plain_data(path: str | Path, map_location: str = "cpu", allowed: list | tuple = (), mmap: bool = False) -> Any:
    """torch.load as plain data only (tensors, numbers, strings, containers, and the `allowed` globals):
    a file is untrusted, and unpickling anything else could run code. torch's warnings about the
    pickle protocol of such a file are not the user's concern (a refusal is one line). `mmap`: tensors
    stay on disk until touched (a zip checkpoint only)."""
    with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def holds_code(path: str | Path, error: Exception, allowed: list | tuple = ()) -> str | None:
    """The refusal of a file whose pickle names other Python objects (a crafted file: loading it would run
    their code), naming them; None when `error` is another failure. torch's own message advises
    retrying with full unpickling, which is what must never be done with such a file."""
    if "Weights only load failed" not in str(error):
        return None
    objects = _unsafe_objects(str(path), list(allowed), str(error))
    named = f" ({', '.join(objects[:3])})" if objects else ""
    return f"{path} holds Python objects besides weights{named}, that is code, which would run if it were unpickled; it will not be loaded"


def _unsafe_objects(path: str, allowed: list, message: str) -> list[str]:
    """Names of the pickled globals that weights_only loading refused; [] if there are none to name. torch
    lists them for zip files; for a legacy (pre-zip) file, the format of torchvision's published weights,
    its refusal `message` names the first one."""
    names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in allowed}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError):
        found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return [g for g in found if g not in names]


def _first_line(e: Exception) -> str:
    """The first sentence of torch's message: the rest is advice on reporting bugs."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0][:160] if text else type(e).__name__


def _state_dict(payload: dict, path: str) -> dict[str, torch.Tensor]:
    """Accept {"model": sd}, {"state_dict": sd} or a bare state dict; strip DataParallel's "module."."""
    state = payload
    for key in ("model", "state_dict"):
        if isinstance(payload.get(key), dict):
            state = payload[key]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} holds no model state dict (expected weights under 'model')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _resolve_arch(path: str, asked: str | None, recorded: str | None) -> str:
    if asked and recorded and canonical_name(asked) != canonical_name(recorded):
        raise ModelError(f"{path} holds a {recorded}, not a {asked}: pass --teacher {recorded}, or no --teacher")
    arch = asked or recorded
    if not arch:
        raise ModelError(f"{path} does not say which architecture it holds: pass --teacher ARCH (e.g. resnet32x4)")
    return canonical_name(arch)


def _resolve_num_classes(path: str, asked: int | None, found: int | None, recorded: int | None) -> int:
    if asked is not None and found is not None and found != asked:
        raise ModelError(f"{path} has {found} classes but the dataset has {asked}: it is a teacher for other data")
    resolved = asked or found or recorded
    if resolved is None:
        raise ModelError(f"{path} has no final linear layer to count classes from: pass the number of classes")
    return resolved


def _num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """The output count of the final linear layer: the last 2-D weight with a matching 1-D bias."""
    for key in reversed(list(state)):
        if key.endswith(".weight") and state[key].ndim == 2 and key[: -len("weight")] + "bias" in state:
            return state[key].shape[0]
    return None


def _plain(value: Any) -> Any:
    """A one-element tensor or numpy number as a Python number (mdistiller stores best_acc as a tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


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
