"""Finding the text encoders of a pipeline and the modules EMCID reads and edits, by structure.

transformers 5.x dropped the `text_model.` level of `CLIPTextModel` while `CLIPTextModelWithProjection`
kept it, so module paths are looked up from the module tree, never from a hard-coded string.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from transformers.models.clip.modeling_clip import CLIPEncoder

SUPPORTED_TEXT_ENCODERS = (CLIPTextModel, CLIPTextModelWithProjection)


@dataclass(frozen=True)
class TextEncoderLayout:
    """Where EMCID acts inside one CLIP text encoder.

    Attributes:
        model: the text encoder.
        layers: its transformer layers (`encoder.layers`).
        layers_path: the dotted path of `layers` inside `model` (`"encoder.layers"` or
            `"text_model.encoder.layers"`, depending on the transformers version and class).
        hidden_size: d, the width of the residual stream (fc2's output).
        intermediate_size: d_ff, the width of the MLP (fc2's input, the key).
    """

    model: nn.Module
    layers: nn.ModuleList
    layers_path: str

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
        """Dotted path of `layer`'s fc2 inside the text encoder, e.g. `"encoder.layers.3.mlp.fc2"`."""
        return f"{self.layers_path}.{layer}.mlp.fc2"


def find_text_encoder_layout(text_encoder: nn.Module, component: str = "text_encoder") -> TextEncoderLayout:
    """Returns the layout of a CLIP text encoder.

    Raises:
        ValueError: if `text_encoder` is not a CLIP text model (the only family EMCID supports).
    """
    if not isinstance(text_encoder, SUPPORTED_TEXT_ENCODERS):
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_TEXT_ENCODERS)
        raise ValueError(
            f"The pipeline's {component} is a {type(text_encoder).__name__}; EMCID edits CLIP text encoders "
            f"({supported}), as used by Stable Diffusion 1.x, 2.x and SD-XL."
        )
    for path, module in text_encoder.named_modules():
        if isinstance(module, CLIPEncoder):
            return TextEncoderLayout(model=text_encoder, layers=module.layers, layers_path=f"{path}.layers")
    raise ValueError(f"No CLIPEncoder found inside the pipeline's {component} ({type(text_encoder).__name__}).")


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
