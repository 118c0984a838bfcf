"""The CLIP teacher on a tiny open_clip config: eq. 2-3 exactly, name resolution, local weights, prompts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from richkd_cache.clip import OPENAI_NAMES, ClipTeacher, load_clip, resolve_clip
from richkd_cache.clip_logits import clip_logits
from richkd_cache.errors import ClipError
from richkd_cache.prompts import (class_prompts, clean_class_name, default_prompt_set, get_prompt_set,
                                  list_prompt_sets, load_prompt_file)

CLASSES = ["apple", "aquarium_fish", "maple_tree", "ray"]
# CIFAR-100's fine label names in the order of its `meta` file
CIFAR100 = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout
tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
# CLIP's published CIFAR-10/100 zero-shot templates (openai/CLIP, data/prompts.md), written out here
CLIP_CIFAR_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
]
# the CIFAR-100 names in that file that differ from the dataset's raw names
# the 12 templates of the RichKD authors' released code (github.com/IPL-sharif/RichKD, cache.py, TEMPLATES)
RELEASED_CODE_TEMPLATES = [
    "a photo of a {}", "a blurry photo of a {}", "a cropped photo of a {}", "a close-up photo of a {}",
    "a low resolution photo of a {}", "a bright photo of a {}", "a picture of a {}", "a detailed image of a {}",
    "a sketch of a {}", "a natural photo of a {} in the wild", "a realistic image of a {}",
    "a high quality photo of a {}",
]
CLIP_CIFAR100_NAMES = {"aquarium_fish": "aquarium fish", "lawn_mower": "lawn mower", "maple_tree": "maple tree",
                       "oak_tree": "oak tree", "palm_tree": "palm tree", "pickup_truck": "pickup truck",
                       "pine_tree": "pine tree", "sweet_pepper": "sweet pepper", "willow_tree": "willow tree"}


@pytest.fixture(scope="module")
def clip():
    return load_clip(resolve_clip("richkd-tiny", "random"))


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def direct_prompt_logits(clip, images, prompt_set) -> torch.Tensor:
    """eq. 2 per prompt, then eq. 3's mean, straight from open_clip's encoders (no stored embeddings)."""
    with torch.no_grad():
        e = F.normalize(clip.model.encode_image(clip.preprocess_images(images)), dim=-1)
        per_prompt = []
        for filled in class_prompts(prompt_set, CLASSES):  # one template: [C][S]
            for s in range(len(filled[0])):
                h = F.normalize(clip.model.encode_text(clip.tokenizer([names[s] for names in filled])), dim=-1)
                per_prompt.append(clip.tau * e @ h.T)  # eq. 2
    return torch.stack(per_prompt).mean(0)  # eq. 3


@pytest.mark.parametrize("name", ["single", "multi"])
def test_stored_embeddings_give_the_mean_of_per_prompt_logits(clip, images, name) -> None:
    ps = get_prompt_set(name, "cifar100")
    embeds, _ = clip.encode_images(images)
    stored = torch.from_numpy(clip.encode_prompt_set(ps, CLASSES))
    assert stored.shape == (len(ps.templates), len(CLASSES), clip.embed_dim)
    assert torch.allclose(clip_logits(embeds, stored, clip.tau), direct_prompt_logits(clip, images, ps), atol=1e-4)


def test_synonyms_average_like_every_other_prompt(clip, images) -> None:
    shipped = get_prompt_set("complex", "cifar100")
    ps = dataclasses.replace(shipped, synonyms={c: shipped.synonyms[c] for c in CLASSES})
    assert len(ps.synonyms["ray"]) == 3  # names per class differ from prompts per template
    stored = torch.from_numpy(clip.encode_prompt_set(ps, CLASSES))
    embeds, _ = clip.encode_images(images)
    assert torch.allclose(clip_logits(embeds, stored, clip.tau), direct_prompt_logits(clip, images, ps), atol=1e-4)


def test_renormalised_variant_matches_open_clips_zero_shot_classifier(clip, images) -> None:
    ps = get_prompt_set("multi", "cifar100")
    names = [clean_class_name(c) for c in CLASSES]
    weights = open_clip.build_zero_shot_classifier(clip.model, clip.tokenizer, names, list(ps.templates))  # (D, C)
    embeds, _ = clip.encode_images(images)
    ours = clip_logits(embeds, torch.from_numpy(clip.encode_prompt_set(ps, CLASSES)), clip.tau, renormalize=True)
    assert torch.allclose(ours, clip.tau * embeds @ weights, atol=1e-4)
    assert not torch.allclose(ours, clip_logits(embeds, torch.from_numpy(clip.encode_prompt_set(ps, CLASSES)), clip.tau))


def test_released_code_prompt_set_reproduces_its_logits(clip, images) -> None:
    """The released code's CLIP logits: per class, the 12 templates filled with the dataset's raw class name
    (underscores kept), each text embedding normalised, their mean re-normalised; logits are the raw
    cosines with the normalised image embedding (tau 1, not CLIP's logit scale of eq. 2)."""
    assert "richkd-code" in list_prompt_sets()
    ps = get_prompt_set("richkd-code", "cifar100")
    assert list(ps.templates) == RELEASED_CODE_TEMPLATES
    assert class_prompts(ps, CLASSES)[0][1] == ["a photo of a aquarium_fish"]
    with torch.no_grad():
        e = F.normalize(clip.model.encode_image(clip.preprocess_images(images)), dim=-1)  # (N, D)
        weights = torch.stack([
            F.normalize(F.normalize(clip.model.encode_text(clip.tokenizer([t.format(c) for t in ps.templates])),
                                    dim=-1).mean(0), dim=0)
            for c in CLASSES])  # (C, D)
    embeds, _ = clip.encode_images(images)
    ours = clip_logits(embeds, torch.from_numpy(clip.encode_prompt_set(ps, CLASSES)), 1.0, renormalize=True)
    assert torch.allclose(ours, e @ weights.T, atol=1e-5)


def test_multi_is_the_default_prompt_set_by_name_not_by_order() -> None:
    assert default_prompt_set(["complex", "multi", "single"]) == "multi"  # sorted, complex would come first
    assert default_prompt_set(["single", "complex", "multi"]) == "multi"
    assert default_prompt_set(["single", "mine"]) == "single"  # no multi: the first stored
    with pytest.raises(ClipError, match="prompts add"):
        default_prompt_set([])


@pytest.mark.parametrize("name", list(OPENAI_NAMES))
def test_openai_names_resolve_to_quickgelu(name: str) -> None:
    spec = resolve_clip(name)
    assert spec.arch.endswith("-quickgelu") and spec.pretrained == "openai" and spec.quick_gelu


def test_open_clip_spelling_with_openai_weights_still_gets_quickgelu() -> None:
    assert resolve_clip("ViT-B-32", "openai").arch == "ViT-B-32-quickgelu"
    laion = resolve_clip("ViT-L-14", "laion2b_s32b_b82k")
    assert laion.arch == "ViT-L-14" and not laion.quick_gelu


def test_a_local_file_under_an_open_clip_name_needs_its_activation_named(tmp_path: Path) -> None:
    path = str(tmp_path / "weights.pt")  # never read: resolving decides the architecture only
    with pytest.raises(ClipError, match="--clip-activation quickgelu"):
        resolve_clip("ViT-L-14", None, path)
    quick = resolve_clip("ViT-L-14", None, path, "quickgelu")
    assert quick.arch == "ViT-L-14-quickgelu" and quick.quick_gelu and quick.activation_source == "--clip-activation"
    assert open_clip.get_model_config(quick.arch)["quick_gelu"]  # open_clip builds it with QuickGELU
    plain = resolve_clip("ViT-L-14", None, path, "gelu")
    assert plain.arch == "ViT-L-14" and not plain.quick_gelu
    assert not open_clip.get_model_config(plain.arch).get("quick_gelu", False)


def test_an_activation_that_contradicts_the_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClipError, match="OpenAI's weights.*gelu"):
        resolve_clip("ViT-L/14", None, str(tmp_path / "weights.pt"), "gelu")
    with pytest.raises(ClipError, match="weights tag openai"):
        resolve_clip("ViT-B-32", "openai", None, "gelu")
    with pytest.raises(ClipError, match="weights tag laion2b_s34b_b79k"):
        resolve_clip("ViT-B-32", "laion2b_s34b_b79k", None, "quickgelu")
    with pytest.raises(ClipError, match="valid: quickgelu, gelu"):
        resolve_clip("ViT-B-32", "random", None, "relu")
    assert resolve_clip("ViT-B-32", "openai").activation_source == "weights tag openai"
    assert resolve_clip("ViT-B-32", "random", None, "quickgelu").arch == "ViT-B-32-quickgelu"


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(ClipError, match="did you mean.*ViT-L/14"):
        resolve_clip("ViT-L/41")


def test_checkpoint_file_loads_and_matches_its_model(clip, images, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = load_clip(resolve_clip("richkd-tiny", None, str(path)))
    assert torch.equal(loaded.encode_images(images)[0], clip.encode_images(images)[0])
    assert loaded.manifest()["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_for_another_architecture_is_refused(clip, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    with pytest.raises(ClipError, match="does not fit RN50-quickgelu"):
        load_clip(resolve_clip("RN50", None, str(path)))


def test_random_weights_are_reproducible_and_recorded(clip, images) -> None:
    again = load_clip(resolve_clip("richkd-tiny", "random"))
    assert torch.equal(again.encode_images(images)[0], clip.encode_images(images)[0])
    manifest = clip.manifest()
    assert manifest["pretrained"] == "random" and manifest["quick_gelu"]
    assert manifest["activation"] == "quickgelu" and manifest["activation_source"] == "architecture richkd-tiny"
    assert manifest["tau"] == pytest.approx(clip.model.logit_scale.exp().item())
    assert manifest["image_size"] == 32 and len(manifest["mean"]) == 3


def test_image_encoder_outputs(clip, images) -> None:
    embeds, feats = clip.encode_images(images)
    assert embeds.shape == (5, clip.embed_dim) and feats.shape == (5, clip.feature_dim)
    assert torch.allclose(embeds.norm(dim=1), torch.ones(5), atol=1e-5)
    assert clip.feature_dim == clip.model.visual.proj.shape[0]  # the width before the projection
    with torch.no_grad():  # the embedding is the model's own
        reference = F.normalize(clip.model.encode_image(clip.preprocess_images(images)), dim=-1)
    assert torch.allclose(embeds, reference, atol=1e-5)


def test_resnet_tower_gives_its_own_embedding_and_the_last_stage_feature(images) -> None:
    # a tiny ModifiedResNet (the RN50 family): widths 8 -> last stage 8 * 32 channels
    model = open_clip.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=dict(layers=(1, 1, 1, 1), width=8, head_width=8, image_size=64),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    spec = resolve_clip("richkd-tiny", "random")
    teacher = ClipTeacher(model, spec, {"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3}, None)
    embeds, feats = teacher.encode_images(images)
    assert (teacher.embed_dim, teacher.feature_dim) == (32, 8 * 32)
    with torch.no_grad():
        reference = F.normalize(model.encode_image(teacher.preprocess_images(images)), dim=-1)
    assert torch.allclose(embeds, reference, atol=1e-5)
    assert "attention pool" in teacher.manifest()["feature"]


@pytest.mark.parametrize("shape", [(32, 32), (40, 56)])
def test_preprocessing_matches_open_clips_pil_transform(shape) -> None:
    """open_clip's own preprocess (PIL resize, centre crop, normalise) on a noise image, upscaled to 224."""
    from PIL import Image

    big = load_clip(resolve_clip("ViT-B-32", "random"))
    reference = open_clip.image_transform(big.image_size, is_train=False, mean=big.mean, std=big.std)
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = reference(Image.fromarray(pixels))  # (3, 224, 224)
    ours = big.preprocess_images(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0]
    grey = ((ours - expected) * torch.tensor(big.std).view(3, 1, 1) * 255).abs()  # in 0..255 levels
    assert ours.shape == (3, 224, 224)
    assert grey.max() <= 1.0 + 1e-3 and (grey > 0.5).float().mean() < 1e-3  # PIL's fixed-point rounding


def test_shipped_synonyms_cover_every_cifar_class() -> None:
    for dataset, classes in (("cifar100", CIFAR100), ("cifar10", ["airplane", "automobile", "bird", "cat", "deer",
                                                                   "dog", "frog", "horse", "ship", "truck"])):
        ps = get_prompt_set("complex", dataset)
        assert set(ps.synonyms) == set(classes)
        assert all(len(v) >= 2 for v in ps.synonyms.values())
    assert len(get_prompt_set("multi", "imagefolder").templates) == 80


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_multi_prompts_are_clips_published_cifar_prompts(dataset: str) -> None:
    assert list(get_prompt_set("multi", dataset).templates) == CLIP_CIFAR_TEMPLATES
    assert get_prompt_set("single", dataset).templates == ("a photo of a {}.",)


def test_cifar100_prompts_read_as_clips_own() -> None:
    filled = class_prompts(get_prompt_set("multi", "cifar100"), CIFAR100)  # [M][C][1]
    for m, template in enumerate(CLIP_CIFAR_TEMPLATES):
        expected = [[template.format(CLIP_CIFAR100_NAMES.get(c, c))] for c in CIFAR100]
        assert filled[m] == expected


def test_prompt_files_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "mine.toml"
    good.write_text('templates = ["a photo of {}, a fruit."]\n[synonyms]\napple = ["apple", "green apple"]\n'
                    '[class_names]\nray = "stingray"\n')
    ps = load_prompt_file(str(good))
    assert ps.name == "mine"
    assert class_prompts(ps, CLASSES)[0][0] == ["a photo of apple, a fruit.", "a photo of green apple, a fruit."]
    assert class_prompts(ps, CLASSES)[0][3] == ["a photo of stingray, a fruit."]
    cases = {
        "no_braces.json": ({"templates": ["a photo"]}, "exactly one"),
        "unknown.json": ({"templates": ["{}"], "synonyms": {"unicorn": ["u"]}}, "does not have: unicorn"),
        "count.json": ({"templates": ["{}"], "classes": ["a", "b"]}, "written for 2 classes"),
        "key.json": ({"templates": ["{}"], "prompts": []}, "unknown key"),
    }
    for name, (table, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(table))
        with pytest.raises(ClipError, match=message):
            class_prompts(load_prompt_file(str(tmp_path / name)), CLASSES)
    with pytest.raises(ClipError, match="complex"):
        get_prompt_set("complicated", "cifar100")


OFFLINE_BUILD = ["build", "--dataset", "digits", "--clip", "ViT-B/32", "--teacher-views", "clean", "--device", "cpu",
                 "--workers", "0", "--quiet"]


@pytest.fixture
def no_network(monkeypatch, tmp_path: Path) -> list:
    """No connection opens, the hub's cache and ~/.cache/clip are empty folders; returns the calls that
    reached open_clip.create_model with a weights tag (a download, or its minute of retries)."""
    import socket

    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    fetched = []
    create = open_clip.create_model

    def recording(arch, pretrained=None, **kwargs):
        if pretrained:
            fetched.append((arch, pretrained, constants.is_offline_mode()))
            raise RuntimeError("weights not found in the local cache")
        return create(arch, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", recording)
    return fetched


def test_offline_build_with_weights_not_on_this_machine_fails_at_once(no_network, teacher, tmp_path: Path) -> None:
    from clirun import invoke

    result = invoke(*OFFLINE_BUILD, "--teacher-checkpoint", teacher, "--out", tmp_path / "c.zarr")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "ViT-B-32-quickgelu/openai: no network (huggingface.co does not answer)" in lines[0]
    assert "--clip-checkpoint FILE" in lines[0]
    assert no_network == [], "no download was tried, so no retries"
    assert not (tmp_path / "c.zarr").exists()


def test_offline_build_with_cached_weights_loads_them_without_a_request(no_network, teacher, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """Weights in the hub's cache: open_clip loads them with the hub's client offline (no request, no retry)."""
    from huggingface_hub import constants

    from clirun import invoke

    cached = Path(constants.HF_HUB_CACHE) / "models--timm--vit_base_patch32_clip_224.openai"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0" * 40)
    (cached / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (cached / "snapshots" / ("0" * 40) / "open_clip_model.safetensors").write_bytes(b"")
    result = invoke(*OFFLINE_BUILD, "--teacher-checkpoint", teacher, "--out", tmp_path / "c.zarr")
    assert result.exit_code == 2 and "weights not found in the local cache" in result.output
    assert no_network == [("ViT-B-32-quickgelu", "openai", True)]
    assert not constants.is_offline_mode(), "the hub's switch is restored afterwards"
