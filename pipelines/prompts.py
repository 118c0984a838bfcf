"""`richkd-cache prompts add`: a new prompt set for an existing cache, from CLIP's text tower alone.

Image embeddings are already cached, so a prompt set is [M, C, D] text embeddings (eq. 2-3 need
nothing else). The CLIP weights must be the ones the cache was built with: their identity is checked
against the manifest before anything is written.
"""

from __future__ import annotations

from cache_store import open_cache, open_for_write
from pipelines.build import resolve_prompt_set
from pipelines.config import resolve_device
from pipelines.summary import prompt_set_accuracy
from richkd_cache.clip import load_clip, recorded_activation, resolve_clip
from richkd_cache.errors import ClipError
from richkd_cache.prompts import prompt_set_manifest


def add_prompt_set(url: str, name_or_file: str, name: str | None, clip_checkpoint: str | None, device: str,
                   clip_model: str | None = None) -> str:
    """Store a prompt set for CLIP model `clip_model` (None: the cache's only one; `ensemble` or A+B:
    each of them, from its own text tower)."""
    reader = open_cache(url)
    models = reader.select_clip(clip_model)
    if clip_checkpoint and len(models) > 1:
        raise ClipError("--clip-checkpoint is one model's weights: add the prompt set to one --clip-model at a time")
    for model in models:
        stored = add_to_model(url, reader, model, name_or_file, name, clip_checkpoint, device)
    return stored


def add_to_model(url: str, reader, model: str, name_or_file: str, name: str | None, clip_checkpoint: str | None,
                 device: str) -> str:
    recorded = reader.clip_records[model]
    dataset = reader.manifest["dataset"]
    prompt_set = resolve_prompt_set(name_or_file, dataset["name"], dataset["classes"], name)  # before CLIP loads
    spec = resolve_clip(recorded["requested"], recorded.get("pretrained"), clip_checkpoint, recorded_activation(recorded))
    clip = load_clip(spec, device=str(resolve_device(device)))
    if not same_weights(clip.manifest(), recorded):
        raise ClipError(
            f"these CLIP weights are not the ones cache {url} was built with "
            f"({recorded['arch']}, {recorded.get('pretrained') or recorded.get('checkpoint_sha256')})"
        )
    classes = dataset["classes"]
    writer = open_for_write(url)
    writer.put_text_embeddings(prompt_set.name, clip.encode_prompt_set(prompt_set, classes),
                               prompt_set_manifest(prompt_set, classes), model=model)
    zero_shot = {r["prompt_set"]: r["clip_top1"] for r in prompt_set_accuracy(open_cache(url), 0.7, model)}
    writer.update_clip_record(model, zero_shot_accuracy=zero_shot)
    writer.finalize()
    return prompt_set.name


def same_weights(loaded: dict, recorded: dict) -> bool:
    """Same architecture, and the same tag or the same checkpoint file (by content hash)."""
    if loaded["arch"] != recorded["arch"]:
        return False
    if recorded.get("checkpoint_sha256"):
        return loaded.get("checkpoint_sha256") == recorded["checkpoint_sha256"]
    return loaded.get("pretrained") == recorded.get("pretrained")
