"""The frozen CLIP teacher: name resolution, loading (tags, local files, random), preprocessing, encoders.

OpenAI's weights were trained with QuickGELU, most of open_clip's other weights with GELU. open_clip
loads either into either architecture without an error, and the outputs silently change. So the
activation is always decided explicitly: by an OpenAI name (QuickGELU), an architecture that fixes it,
a weights tag's own config, or, for a local weights file under an open_clip name (which says nothing
about it), by the caller (`--clip-activation`). The choice and what decided it go into the manifest.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from richkd_cache.errors import ClipError
from richkd_cache.files import file_sha256
from richkd_cache.prompts import PromptSet, class_prompts

# OpenAI's names -> open_clip's architecture names (weights tag "openai").
OPENAI_NAMES = {
    "RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336",
}
RANDOM = ("random", "none")  # no weights: a randomly initialised model (seeded, so reproducible)
RANDOM_SEED = 0
NETWORK_TIMEOUT_S = 3.0  # to open a connection to the weights' host before trusting the network


def _register_shipped_configs() -> None:
    """Our tiny config (`richkd-tiny`) joins open_clip's registry, for the quickstart and tests."""
    folder = resources.files("richkd_cache") / "clip_configs"
    open_clip.add_model_config(Path(str(folder)))


_register_shipped_configs()


ACTIVATIONS = ("quickgelu", "gelu")


@dataclass(frozen=True)
class ClipSpec:
    requested: str
    arch: str  # open_clip architecture name
    pretrained: str | None  # weights tag, or "random"
    checkpoint: str | None  # local weights file
    quick_gelu: bool
    activation_source: str  # what decided the activation, e.g. "OpenAI's weights", "--clip-activation"

    @property
    def activation(self) -> str:
        return "quickgelu" if self.quick_gelu else "gelu"


def resolve_clip(name: str, pretrained: str | None = None, checkpoint: str | None = None,
                 activation: str | None = None) -> ClipSpec:
    """`ViT-L/14` -> ViT-L-14-quickgelu + openai; `ViT-L-14` + a tag -> the tag's activation; a local
    file under an open_clip name -> the `activation` the caller names (required: the file cannot tell)."""
    arch = OPENAI_NAMES.get(name, name)
    if name in OPENAI_NAMES and pretrained is None and checkpoint is None:
        pretrained = "openai"
    known = open_clip.list_models()
    if arch not in known:
        choices = list(OPENAI_NAMES) + known
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise ClipError(f"unknown CLIP model {name!r}{hint}")
    if pretrained is None and checkpoint is None:
        raise ClipError(f"CLIP {name}: say which weights: --clip-pretrained TAG, --clip-checkpoint FILE, or random")
    if activation is not None and activation not in ACTIVATIONS:
        raise ClipError(f"unknown CLIP activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    chosen, source = _choose_activation(name, arch, pretrained, activation)
    return ClipSpec(name, _arch_with(arch, chosen, known), pretrained, checkpoint, chosen == "quickgelu", source)


def recorded_activation(clip_manifest: dict) -> str:
    """The activation a cache's CLIP ran with (its manifest's `quick_gelu`), to rebuild the same model."""
    return "quickgelu" if clip_manifest.get("quick_gelu") else "gelu"


def _choose_activation(name: str, arch: str, pretrained: str | None, asked: str | None) -> tuple[str, str]:
    """(activation, what decided it). An asked-for activation that contradicts the weights is an error."""
    required, why = _required_activation(name, arch, pretrained)
    if required is not None:
        if asked is not None and asked != required:
            raise ClipError(f"CLIP {name} ({why}) runs with {required}; --clip-activation {asked} would "
                            "silently change its outputs")
        return required, why
    if asked is not None:
        return asked, "--clip-activation"
    if pretrained in RANDOM:
        return _config_activation(arch), "the architecture's config (random weights)"
    raise ClipError(f"CLIP {name} from a local file: the file does not say which activation its weights were "
                    "trained with; pass --clip-activation quickgelu (OpenAI's weights) or gelu (most open_clip "
                    "weights: LAION, DataComp)")


def _required_activation(name: str, arch: str, pretrained: str | None) -> tuple[str | None, str]:
    if name in OPENAI_NAMES:
        return "quickgelu", "OpenAI's weights"
    if _config_activation(arch) == "quickgelu":
        return "quickgelu", f"architecture {arch}"
    if pretrained not in (None, *RANDOM):
        cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
        needs = bool(cfg.get("quick_gelu", False)) or pretrained == "openai"
        return ("quickgelu" if needs else "gelu"), f"weights tag {pretrained}"
    return None, ""


def _config_activation(arch: str) -> str:
    return "quickgelu" if open_clip.get_model_config(arch).get("quick_gelu", False) else "gelu"


def _arch_with(arch: str, activation: str, known: list[str]) -> str:
    """The open_clip architecture name that builds `arch` with `activation` (its `-quickgelu` twin)."""
    if activation == _config_activation(arch):
        return arch
    if f"{arch}-quickgelu" not in known:
        raise ClipError(f"CLIP {arch} with QuickGELU: open_clip has no {arch}-quickgelu")
    return f"{arch}-quickgelu"


class ClipTeacher:
    """Frozen CLIP in eval mode. Images go in as uint8 batches; preprocessing happens here, on the device."""

    def __init__(self, model: torch.nn.Module, spec: ClipSpec, preprocess: dict, checkpoint_sha256: str | None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.preprocess = preprocess
        self.checkpoint_sha256 = checkpoint_sha256
        self.tokenizer = open_clip.get_tokenizer(spec.arch)
        self.tau = float(model.logit_scale.exp().item())  # eq. 2's temperature, CLIP's learned scale
        size = preprocess["size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean, self.std = tuple(preprocess["mean"]), tuple(preprocess["std"])
        self.embed_dim, self.feature_dim = self._dims()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _dims(self) -> tuple[int, int]:
        probe = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8, device=self.device)
        embeds, feats = self.encode_images(probe)
        return embeds.shape[1], feats.shape[1]

    def manifest(self) -> dict:
        return {
            "requested": self.spec.requested,
            "arch": self.spec.arch,
            "pretrained": self.spec.pretrained,
            "checkpoint": self.spec.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "quick_gelu": self.spec.quick_gelu,
            "activation": self.spec.activation,
            "activation_source": self.spec.activation_source,
            "image_size": self.image_size,
            "resize": "shorter side, bicubic a=-0.5 in two uint8 passes (as PIL), centre crop",
            "mean": list(self.mean),
            "std": list(self.std),
            "tau": self.tau,
            "embed_dim": self.embed_dim,
            "feature_dim": self.feature_dim,
            "feature": self._feature_source(),
            "open_clip": importlib.metadata.version("open_clip_torch"),
        }

    def _feature_source(self) -> str:
        visual = self.model.visual
        if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
            return "mean-pooled last stage (input of the attention pool)"
        if isinstance(visual, open_clip.transformer.VisionTransformer):
            return "pooled token before the projection"
        return "projected embedding (this tower has no separate pre-projection feature)"

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, S, S) float: CLIP's own resize, crop and normalisation.

        open_clip's transform resizes the PIL image (shorter side to S, bicubic), centre-crops and
        normalises. PIL's bicubic is Keys' kernel with a = -0.5, widened when shrinking, applied as two
        passes (horizontal, then vertical) that each round and clip to uint8. torch's antialiased
        bicubic is that kernel (its plain bicubic uses a = -0.75); running the same two rounded passes
        here matches open_clip's preprocessing to within one grey level on rare pixels.
        """
        x = images.float()
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, int(h * scale)), max(self.image_size, int(w * scale)))  # torchvision truncates
        for pass_size in ((h, size[1]), size):  # horizontal pass, then vertical (PIL's order)
            if pass_size != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=pass_size, mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp(0, 255).round()
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> (normalised embeddings (B, D), pre-projection features (B, Fc)), float32.

        One pass through the tower: the feature is taken on the way to the embedding.
        """
        x = self.preprocess_images(images.to(self.device))
        visual = self.model.visual
        if isinstance(visual, open_clip.transformer.VisionTransformer):
            tokens = visual.transformer(visual._embeds(x))
            feats, _ = visual._pool(tokens)  # (B, width)
            embeds = feats @ visual.proj if visual.proj is not None else feats
        elif isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
            x = visual.stem(x.to(visual.conv1.weight.dtype))
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
            feats = x.mean(dim=(2, 3))  # (B, width * 32)
            embeds = visual.attnpool(x)
        else:
            embeds = visual(x)
            feats = embeds
        return F.normalize(embeds.float(), dim=-1), feats.float()

    @torch.no_grad()
    def encode_prompt_set(self, prompt_set: PromptSet, class_names: list[str], batch_size: int = 256,
                          advance: Callable[[int], None] | None = None) -> np.ndarray:
        """[M, C, D] float32: entry (m, c) is the mean over class c's names of the normalised text
        embeddings of template m filled with each name. Every template uses the same names of a class,
        so the mean over m of (m, c) is the mean over all of class c's prompts: eq. 3 stays exact.
        `advance(n)` is told each batch of n prompts encoded (a progress bar's)."""
        filled = class_prompts(prompt_set, class_names)  # [M][C][S_c]
        flat = [p for per_template in filled for per_class in per_template for p in per_class]
        embeds = []
        for start in range(0, len(flat), batch_size):
            tokens = self.tokenizer(flat[start : start + batch_size]).to(self.device)
            embeds.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
            if advance is not None:
                advance(len(tokens))
        flat_embeds = torch.cat(embeds)
        out = torch.empty(len(filled), len(class_names), flat_embeds.shape[1])
        i = 0
        for m, per_template in enumerate(filled):
            for c, per_class in enumerate(per_template):
                out[m, c] = flat_embeds[i : i + len(per_class)].mean(0)
                i += len(per_class)
        return out.numpy()


def load_clip(spec: ClipSpec, device: str | torch.device = "cpu") -> ClipTeacher:
    """Build the model and load its weights: a pretrained tag, a local file, or (seeded) random."""
    sha = None
    if spec.checkpoint:
        if not Path(spec.checkpoint).is_file():
            raise ClipError(f"CLIP checkpoint {spec.checkpoint} not found")
        sha = file_sha256(spec.checkpoint)
        model = _create(spec.arch, None)
        try:
            open_clip.load_checkpoint(model, spec.checkpoint, strict=True)
        except Exception as e:  # wrong architecture, not a checkpoint: one line
            raise ClipError(f"CLIP checkpoint {spec.checkpoint} does not fit {spec.arch}: {_first_line(e)}") from None
    elif spec.pretrained in RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = _create(spec.arch, None)
    else:
        model = _fetch(spec.arch, spec.pretrained)
    preprocess_tag = spec.pretrained if spec.pretrained not in (None, *RANDOM) else None
    return ClipTeacher(model.to(device), spec, _preprocess_cfg(model, spec.arch, preprocess_tag), sha)


def _fetch(arch: str, tag: str) -> torch.nn.Module:
    """The model with a tag's weights: downloaded (or checked for updates) when their host answers; from the
    local caches alone, without a request, when it does not. Without a network the hub's client would
    retry for about a minute before failing, so a missing file is refused at once."""
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    host = _weights_host(cfg)
    try:
        if host is None or _reachable(host):
            return _create(arch, tag)
        if not _cached_weights(cfg):
            raise ClipError(f"could not fetch CLIP weights {arch}/{tag}: no network ({host} does not answer) and "
                            "they are not in the local caches (the Hugging Face hub's, ~/.cache/clip); download "
                            "them where there is network and pass --clip-checkpoint FILE")
        with _hub_offline():
            return _create(arch, tag)
    except ClipError:
        raise
    except Exception as e:
        raise ClipError(
            f"could not fetch CLIP weights {arch}/{tag} ({_first_line(e)}); "
            "download them where there is network and pass --clip-checkpoint FILE"
        ) from None


def _weights_host(cfg: dict) -> str | None:
    """The host a tag's weights come from (open_clip prefers the hub); None for a local file."""
    from huggingface_hub import constants

    if cfg.get("file"):
        return None
    if cfg.get("hf_hub"):
        return urllib.parse.urlparse(constants.ENDPOINT).hostname
    return urllib.parse.urlparse(cfg.get("url", "")).hostname


def _reachable(host: str) -> bool:
    """Whether one TCP connection to `host` opens within a few seconds. The hub's offline switch
    (HF_HUB_OFFLINE=1) counts as no network; behind a proxy the download itself is left to try."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((host, 443), timeout=NETWORK_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _cached_weights(cfg: dict) -> bool:
    """Whether the tag's weights file is already on this machine, where open_clip would look for it."""
    from huggingface_hub import try_to_load_from_cache

    if cfg.get("hf_hub"):
        model_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename, "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin"
                 else filename.rsplit(".", 1)[0] + ".safetensors"]
        return any(isinstance(try_to_load_from_cache(model_id, name), str) for name in names)
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


@contextmanager
def _hub_offline() -> Iterator[None]:
    """The hub's client in offline mode: it reads its local cache and makes no request (its switch is
    read from the environment once, at import, so the module's constant is set here)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def _create(arch: str, pretrained: str | None) -> torch.nn.Module:
    # open_clip logs a warning whenever no tag is given; here that is always deliberate
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR if pretrained is None else level)
    try:
        return open_clip.create_model(arch, pretrained=pretrained, device="cpu")
    finally:
        logger.setLevel(level)


def _preprocess_cfg(model: torch.nn.Module, arch: str, tag: str | None) -> dict:
    """The tag's preprocessing when there is one (a file does not carry it), else the config's."""
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    if tag:
        pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        cfg.update({k: pretrained_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained_cfg})
    return cfg


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0] if text else ''}"[:300]
