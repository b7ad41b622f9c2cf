"""Finding the text encoders of a pipeline and the modules EMCID reads and edits, by structure.

transformers 5.x dropped the `text_model.` level of `CLIPTextModel` while `CLIPTextModelWithProjection`
kept it, so module paths are looked up from the module tree, never from a hard-coded string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from .config import resolve_edit_layers
from .families import SUPPORTED, pipeline_family

if TYPE_CHECKING:
    from .config import EMCIDConfig
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPTextEmbeddings

SUPPORTED_TEXT_ENCODERS = (CLIPTextModel, CLIPTextModelWithProjection)


def fc2_module_path(layer: int) -> str:
    """The path of `layer`'s fc2 below a CLIP text model, `"encoder.layers.{layer}.mlp.fc2"`: the LoRA target (PEFT
    matches it as a suffix, with or without transformers' `text_model.` level) and the stem of its keys in files."""
    return f"encoder.layers.{layer}.mlp.fc2"


@dataclass(frozen=True)
class TextEncoderLayout:
    """Where EMCID acts inside one CLIP text encoder.

    Attributes:
        model: the text encoder.
        encoder: the module that runs `layers` in order (a `CLIPEncoder`).
        embeddings: the token and position embeddings, whose output feeds layer 0.
        layers: its transformer layers (`encoder.layers`).
        text_model_path: the dotted path, with its final dot, of the module holding `encoder` inside `model` (`""` or
            `"text_model."`, depending on the transformers version and class).
        hidden_size: d, the width of the residual stream (fc2's output).
        intermediate_size: d_ff, the width of the MLP (fc2's input, the key).
    """

    model: nn.Module
    encoder: nn.Module
    embeddings: nn.Module
    layers: nn.ModuleList
    text_model_path: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.model.config.intermediate_size

    def fc2(self, layer: int) -> nn.Module:
        """The edited linear map of `layer` (keys in, values out); the base layer if an adapter wraps it."""
        module = self.layers[layer].mlp.fc2
        return module.get_base_layer() if hasattr(module, "get_base_layer") else module

    def fc2_path(self, layer: int) -> str:
        """Dotted path of `layer`'s fc2 inside the text encoder, e.g. `"text_model.encoder.layers.3.mlp.fc2"`."""
        return self.text_model_path + fc2_module_path(layer)


def find_text_encoder_layout(text_encoder: nn.Module, component: str = "text_encoder") -> TextEncoderLayout:
    """Returns the layout of a CLIP text encoder.

    Raises:
        ValueError: if `text_encoder` is not a CLIP text model (the only family EMCID supports).
    """
    if not isinstance(text_encoder, SUPPORTED_TEXT_ENCODERS):
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_TEXT_ENCODERS)
        raise ValueError(
            f"The pipeline's {component} is a {type(text_encoder).__name__}; EMCID edits CLIP text encoders "
            f"({supported}), as used by {SUPPORTED}."
        )
    modules = dict(text_encoder.named_modules())
    encoders = [path for path, module in modules.items() if isinstance(module, CLIPEncoder)]
    embeddings = [module for module in modules.values() if isinstance(module, CLIPTextEmbeddings)]
    if encoders and embeddings:
        encoder = modules[encoders[0]]
        return TextEncoderLayout(
            model=text_encoder,
            encoder=encoder,
            embeddings=embeddings[0],
            layers=encoder.layers,
            text_model_path=encoders[0].removesuffix("encoder"),
        )
    raise ValueError(f"No CLIPEncoder found inside the pipeline's {component} ({type(text_encoder).__name__}).")


def check_editable_pipeline(pipe: object) -> None:
    """Raises `ValueError` for pipelines EMCID cannot train through: components missing, or an inpainting UNet."""
    missing = [
        name for name in ("text_encoder", "tokenizer", "unet", "vae", "scheduler") if getattr(pipe, name, None) is None
    ]
    if missing:
        raise ValueError(f"{type(pipe).__name__} lacks {missing}; EMCID edits {SUPPORTED} pipelines.")
    if pipe.unet.config.in_channels != 4:
        raise ValueError(
            f"{type(pipe).__name__}'s UNet takes {pipe.unet.config.in_channels} input channels (an inpainting "
            "checkpoint); EMCID trains through a text-to-image UNet. Edit the text-to-image model of the same base, "
            "then load the edits into this pipeline with load_concept_edits(..., force=True)."
        )


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@dataclass(frozen=True)
class EditedEncoder:
    """One text encoder of a pipeline as EMCID edits it.

    Attributes:
        component: its attribute name in the pipeline (`"text_encoder"` or `"text_encoder_2"`).
        layout: where its layers are.
        tokenizer: the tokenizer that feeds it.
        layers: the edited layers, ascending.
        z_layer: the layer whose output carries the stage-1 vector.
        preservation_weight: lambda of its stage 2.
        conditioning: the hidden state the pipeline gives the UNet (its family's `PipelineFamily.conditioning`):
            `"last"` (the final, normalised one) or `"penultimate"` (the last layer but one, not normalised).
    """

    component: str
    layout: TextEncoderLayout
    tokenizer: PreTrainedTokenizerBase
    layers: list[int]
    z_layer: int
    preservation_weight: float
    conditioning: Literal["last", "penultimate"]


def find_edited_encoders(pipe: object, config: "EMCIDConfig") -> list[EditedEncoder]:
    """The text encoders EMCID edits in `pipe`, with the layers `config` selects in each.

    Raises:
        ValueError: for a pipeline without CLIP text encoders, or a z layer the UNet never sees.
    """
    family = pipeline_family(pipe)
    encoders = []
    for slot in family.text_encoders:
        model, tokenizer = getattr(pipe, slot.component, None), getattr(pipe, slot.tokenizer, None)
        if model is None or tokenizer is None:
            raise ValueError(
                f"{type(pipe).__name__} has no {slot.component if model is None else slot.tokenizer}; EMCID edits "
                f"{SUPPORTED} pipelines."
            )
        layout = find_text_encoder_layout(model, slot.component)
        layer_spec, z_spec = (
            getattr(config, "layers" + slot.config_suffix),
            getattr(config, "z_layer" + slot.config_suffix),
        )
        layers, z_layer = resolve_edit_layers(layer_spec, z_spec, layout.num_layers)
        weight = getattr(config, "preservation_weight" + slot.config_suffix)
        weight = config.preservation_weight if weight is None else weight
        if family.conditioning == "penultimate" and z_layer > layout.num_layers - 2:
            raise ValueError(
                f"The {slot.component}'s z layer {z_layer} lies after layer {layout.num_layers - 2}, whose output is "
                f"what {family.description} gives its UNet; choose layers ending at most there (e.g. '-4:-1')."
            )
        encoders.append(EditedEncoder(slot.component, layout, tokenizer, layers, z_layer, weight, family.conditioning))
    return encoders
