"""The pipeline families EMCID edits, and everything that differs between them: the one place that names them.

A family says which text encoders (and tokenizers) a pipeline has, which hidden state of them conditions the UNet,
whether the UNet also takes size/crop time ids, how the pipeline's own `encode_prompt` is called, the presets EMCID
runs with by default and for each kind of edit, and the pipeline classes that get the concept-edit methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family.

    Attributes:
        component: its attribute in the pipeline, e.g. `"text_encoder_2"`.
        tokenizer: the attribute of the tokenizer that feeds it.
        config_suffix: the suffix of its `EMCIDConfig` fields (`layers{suffix}`, `z_layer{suffix}`,
            `preservation_weight{suffix}`).
    """

    component: str
    tokenizer: str
    config_suffix: str = ""


def _sd_prompt_embeds(pipe: Any, prompts: list[str]) -> torch.Tensor:
    return pipe.encode_prompt(prompts, pipe.device, 1, False)[0]


def _sdxl_prompt_embeds(pipe: Any, prompts: list[str]) -> torch.Tensor:
    return pipe.encode_prompt(prompts, device=pipe.device, do_classifier_free_guidance=False)[0]


@dataclass(frozen=True)
class PipelineFamily:
    """What EMCID needs to know about a family of Stable Diffusion pipelines.

    Attributes:
        name: `"sd"` (Stable Diffusion 1.x/2.x) or `"sdxl"`.
        description: how messages name it.
        text_encoders: its text encoders, in the order their hidden states are concatenated for the UNet.
        conditioning: the hidden state the UNet reads: `"last"` (the final, normalised one) or `"penultimate"` (the
            output of the last layer but one, not normalised).
        time_ids: whether the UNet takes the pooled text embedding and size/crop time ids (text-time conditioning).
        prompt_embeds: `prompt_embeds(pipe, prompts)` calls the pipeline's own `encode_prompt`: (B, 77, D).
        default_preset: the `EMCIDConfig` preset used when no config is given.
        kind_presets: the presets of the paper's runs of each kind of edit (`"debias"`, `"rectify"`).
        pipelines: the pipeline classes that get the concept-edit methods (text-to-image first).
        kohya_version: kohya's `ss_base_model_version` of the family's models (the UIs read it to tell families).
        kohya_versions_by_width: the version of variants told apart by the (first) text encoder's width d.
    """

    name: Literal["sd", "sdxl"]
    description: str
    text_encoders: tuple[TextEncoderSlot, ...]
    conditioning: Literal["last", "penultimate"]
    time_ids: bool
    prompt_embeds: Callable[[Any, list[str]], torch.Tensor]
    default_preset: str
    kind_presets: dict[str, str] = field(default_factory=dict)
    pipelines: tuple[type, ...] = ()
    kohya_version: str = ""
    kohya_versions_by_width: dict[int, str] = field(default_factory=dict)


FAMILIES: dict[str, PipelineFamily] = {
    "sd": PipelineFamily(
        name="sd",
        description="Stable Diffusion 1.x/2.x",
        text_encoders=(TextEncoderSlot("text_encoder", "tokenizer"),),
        conditioning="last",
        time_ids=False,
        prompt_embeds=_sd_prompt_embeds,
        default_preset="sd1-paper",
        kind_presets={"debias": "sd1-debias", "rectify": "sd1-rectify"},
        pipelines=(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline),
        kohya_version="sd_v1",
        kohya_versions_by_width={1024: "sd_v2"},  # SD 2.x's OpenCLIP ViT-H/14 (SD 1.x's CLIP ViT-L/14 has 768)
    ),
    "sdxl": PipelineFamily(
        name="sdxl",
        description="SD-XL",
        text_encoders=(
            TextEncoderSlot("text_encoder", "tokenizer"),
            TextEncoderSlot("text_encoder_2", "tokenizer_2", "_2"),
        ),
        conditioning="penultimate",
        time_ids=True,
        prompt_embeds=_sdxl_prompt_embeds,
        default_preset="sdxl-paper",
        pipelines=(StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline),
        kohya_version="sdxl_base_v1-0",
    ),
}
"""Every family EMCID supports, by name."""

SUPPORTED: str = " and ".join(family.description for family in FAMILIES.values())
"""The supported families, for messages: "Stable Diffusion 1.x/2.x and SD-XL"."""


def pipeline_family(pipe: object) -> PipelineFamily:
    """The family of a pipeline: the one whose every text encoder it has, the family with the most encoders first
    (an SD-XL pipeline also has SD 1.x's `text_encoder`)."""
    for family in sorted(FAMILIES.values(), key=lambda f: -len(f.text_encoders)):
        if all(getattr(pipe, slot.component, None) is not None for slot in family.text_encoders):
            return family
    return FAMILIES["sd"]


def family_of_components(components: Iterable[str]) -> PipelineFamily | None:
    """The family whose text encoders are exactly `components`, if any."""
    wanted = set(components)
    return next((f for f in FAMILIES.values() if {slot.component for slot in f.text_encoders} == wanted), None)


def text_encoder_components() -> tuple[str, ...]:
    """Every text-encoder component any family has, in a fixed order."""
    return tuple(dict.fromkeys(slot.component for family in FAMILIES.values() for slot in family.text_encoders))


def all_pipeline_classes() -> Sequence[type]:
    """The pipeline classes of every family."""
    return [cls for family in FAMILIES.values() for cls in family.pipelines]
