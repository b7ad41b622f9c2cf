from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid.testing import tiny_sd_pipeline

CAPTIONS = [
    "a photo of a house",
    "a red car on the street",
    "a green tree in the park",
    "an apple and a banana",
    "a painting of a blue house",
    "a drawing of a circle and a square",
    "the president of the united states",
    "a doctor and a nurse",
    "a picture of a red apple",
    "an image of a green car",
    "a blue square",
    "a photo of a tree by a house",
]


@pytest.fixture
def pipe() -> StableDiffusionPipeline:
    return tiny_sd_pipeline(seed=0)


@pytest.fixture
def fast_config() -> EMCIDConfig:
    """The paper preset with few steps, so stage 1 takes a fraction of a second per concept."""
    return EMCIDConfig.from_preset("sd1-paper", num_steps=8, image_num_inference_steps=2)


@pytest.fixture
def editor(pipe: StableDiffusionPipeline, fast_config: EMCIDConfig, tmp_path) -> EMCIDEditor:
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path / "cache", progress=False)
    editor.compute_statistics(CAPTIONS)
    return editor


def model_state(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """A copy of every weight of the pipeline's networks."""
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("text_encoder", "unet", "vae")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def hook_counts(pipe: StableDiffusionPipeline) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks)
        for name in ("text_encoder", "unet", "vae")
        for m in getattr(pipe, name).modules()
    )


def assert_pipeline_unchanged(pipe: StableDiffusionPipeline, state: dict[str, torch.Tensor], hooks: int = 0) -> None:
    now = model_state(pipe)
    assert now.keys() == state.keys(), "the pipeline's module structure changed"
    changed = [key for key in state if not torch.equal(state[key], now[key])]
    assert not changed, f"weights changed: {changed[:5]}"
    assert hook_counts(pipe) == hooks, "hooks were left on the pipeline"


def encode(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """The conditioning the pipeline gives its UNet: (B, 77, d)."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]
