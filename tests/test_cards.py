"""Model cards: the Hub metadata of an adapter (relation, pipeline tag, library, the base model's license), only Hub
ids as `base_model`, never a local path, and how each UI loads the edits."""

import json
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from huggingface_hub import HfApi

from diffusers_emcid import ConceptEdit, ConceptEdits, EMCIDConfig, EMCIDEditor, LowRankDelta
from diffusers_emcid.kohya import KOHYA_WEIGHTS_NAME
from diffusers_emcid.serialization import CARD_NAME, MANIFEST_NAME
from diffusers_emcid.testing import random_captions, tiny_sd_pipeline

TAGS = ["emcid", "concept-editing", "lora", "text-to-image", "diffusers"]


def small_edits(base_model: str | None = None) -> ConceptEdits:
    """One random rank-1 edit of layer 0 of the tiny SD 1.x pipeline's text encoder."""
    generator = torch.Generator().manual_seed(0)
    deltas = {
        "text_encoder": {
            0: LowRankDelta(torch.randn(32, 1, generator=generator), torch.randn(1, 64, generator=generator))
        }
    }
    return ConceptEdits(
        [ConceptEdit("dog", "cat")],
        {"text_encoder": torch.randn(1, 32, generator=generator)},
        deltas,
        EMCIDConfig(),
        {"text_encoder": 0},
        base_model=base_model,
    )


def read_card(folder: Path) -> tuple[dict, str]:
    """The YAML metadata and the markdown body of a folder's card."""
    text = (folder / CARD_NAME).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch) -> None:
    """Base models' cards are fetched into a temporary Hugging Face cache, never the user's."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def base_model_repo(hub, repo_id: str, card_metadata: str) -> str:
    """A model repo on the loopback Hub whose card has `card_metadata` as YAML."""
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_file(
        path_or_fileobj=f"---\n{card_metadata}\n---\n\n# A base model\n".encode(),
        path_in_repo="README.md",
        repo_id=repo_id,
    )
    return repo_id


def test_a_hub_base_model_is_named_with_its_license_and_the_adapter_relation(hub, tmp_path):
    base = base_model_repo(hub, "alice/licensed-base", "license: creativeml-openrail-m\nlibrary_name: diffusers")
    metadata, _ = read_card(small_edits(base).save_pretrained(tmp_path / "edits"))
    assert metadata == {
        "base_model": base,
        "base_model_relation": "adapter",
        "pipeline_tag": "text-to-image",
        "library_name": "diffusers",
        "license": "creativeml-openrail-m",
        "tags": TAGS,
    }


def test_an_other_license_keeps_its_name_and_link(hub, tmp_path):
    base = base_model_repo(
        hub,
        "alice/other-license-base",
        "license: other\nlicense_name: base-license\nlicense_link: https://example.com/LICENSE",
    )
    metadata, _ = read_card(small_edits(base).save_pretrained(tmp_path / "edits"))
    assert (metadata["license"], metadata["license_name"], metadata["license_link"]) == (
        "other",
        "base-license",
        "https://example.com/LICENSE",
    )


def test_an_unknown_license_is_left_out(hub, tmp_path):
    metadata, _ = read_card(small_edits("alice/not-on-the-hub").save_pretrained(tmp_path / "edits"))
    assert metadata["base_model"] == "alice/not-on-the-hub" and metadata["base_model_relation"] == "adapter"
    assert "license" not in metadata


def test_edits_of_a_pipeline_loaded_from_a_local_folder_name_no_path(tmp_path):
    base = tmp_path / "my-base-model"
    tiny_sd_pipeline(seed=0).save_pretrained(base)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    config = EMCIDConfig.from_preset("sd1-paper", num_steps=8, image_num_inference_steps=2)
    editor = EMCIDEditor(pipe, config, cache_dir=tmp_path / "cache", progress=False)
    editor.compute_statistics(random_captions())
    edits = editor.edit([("dog", "cat")])
    assert edits.base_model == str(base)
    folder = edits.save_pretrained(tmp_path / "edits")
    metadata, _ = read_card(folder)
    text = (folder / CARD_NAME).read_text(encoding="utf-8")
    assert str(tmp_path) not in text and "my-base-model" not in text
    assert not {"base_model", "base_model_relation", "license"} & set(metadata)
    assert metadata["pipeline_tag"] == "text-to-image" and metadata["library_name"] == "diffusers"
    assert json.loads((folder / MANIFEST_NAME).read_text())["base_model"] == str(base)  # kept for its owner


@pytest.mark.parametrize("path", ["/models/sd15", "./models/sd15", "~/models/sd15", r"C:\models\sd15", "models/sd/15"])
def test_a_local_looking_base_model_never_reaches_the_card(tmp_path, path):
    folder = small_edits(path).save_pretrained(tmp_path / "edits")
    metadata, body = read_card(folder)
    assert "base_model" not in metadata and "sd15" not in body and "models/sd" not in body


def test_the_card_says_how_each_ui_loads_the_edits(hub, tmp_path):
    _, local = read_card(small_edits().save_pretrained(tmp_path / "edits"))
    pushed_edits = small_edits()
    pushed_edits.push_to_hub("alice/card-uis", token=hub.token)
    card = HfApi(endpoint=hub.endpoint, token=hub.token).hf_hub_download(
        "alice/card-uis", CARD_NAME, cache_dir=tmp_path / "download"
    )
    _, pushed = read_card(Path(card).parent)
    for body in (local, pushed):
        assert "pipe.load_lora_weights(" in body and "pipe.load_concept_edits(" in body  # diffusers
        assert "## Use in ComfyUI" in body and "**Load LoRA**" in body and "`clip` input" in body
        assert "## Use in AUTOMATIC1111 and Forge" in body and "`models/Lora`" in body
    assert "emcid export <this folder> my-edits.safetensors" in local and "<lora:my-edits:1>" in local
    assert f"Put `{KOHYA_WEIGHTS_NAME}`" in pushed and "<lora:emcid_kohya:1>" in pushed and "emcid export" not in pushed
