"""Checks that a text encoder can be edited by EMCID, and a judge of generated shape images.

A text encoder is editable at layer l when replacing the subject token's hidden state after layer l
by the destination's closes the gap between the source and destination conditionings the UNet sees
(every position, end-of-text and padding included, padded to the tokenizer's maximum length as the
pipeline does). An encoder whose end-of-text states hardly depend on the prompt is degenerate.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from ..encoders import find_text_encoder_layout
from ..evaluation import ImageClassifierJudge, concept_probability
from ..tokens import subject_token_positions
from .render import COLOURS, SHAPES


def pipeline_token_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids as `StableDiffusionPipeline` makes them: padded to the maximum length, truncated."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@contextlib.contextmanager
def _replaced_hidden_state(
    text_encoder: CLIPTextModel, layer: int, position: int, value: torch.Tensor
) -> Iterator[None]:
    """Within the context, the output of encoder layer `layer` holds `value` at `position`."""

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, position] = value.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = find_text_encoder_layout(text_encoder).layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def conditioning_gap_closed(
    pipe: StableDiffusionPipeline,
    source_prompt: str,
    destination_prompt: str,
    subject: str,
    destination_word: str,
    layer: int,
) -> float:
    """The fraction `1 - ||c_edit - c_dest|| / ||c_src - c_dest||` of the conditioning gap that closes when the
    subject token's hidden state after `layer` is replaced by the destination word's.

    Args:
        pipe: the pipeline whose text encoder and tokenizer are tested.
        source_prompt: e.g. `"a red circle"`.
        destination_prompt: e.g. `"a red square"`.
        subject: the edited word of the source prompt, e.g. `"circle"`.
        destination_word: the word of the destination prompt that replaces it, e.g. `"square"`.
        layer: the encoder layer after which the hidden state is replaced.
    """
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    device = encoder.device
    ids = pipeline_token_ids(tokenizer, [source_prompt, destination_prompt]).to(device)
    (source_position,) = subject_token_positions(tokenizer, [source_prompt], subject)
    (destination_position,) = subject_token_positions(tokenizer, [destination_prompt], destination_word)
    output = encoder(ids, output_hidden_states=True)
    source, destination = output.last_hidden_state.float()
    replacement = output.hidden_states[layer + 1][1, destination_position]
    with _replaced_hidden_state(encoder, layer, source_position, replacement):
        edited = encoder(ids[:1]).last_hidden_state[0].float()
    return float(1 - (edited - destination).norm() / (source - destination).norm())


@torch.no_grad()
def end_of_text_separation(pipe: StableDiffusionPipeline, prompts: Sequence[str]) -> float:
    """The smallest `||e_i - e_j|| / max(||e_i||, ||e_j||)` over pairs of the prompts' final end-of-text states
    (the pooled outputs); a healthy encoder gives at least 0.5 for prompts of different concepts."""
    ids = pipeline_token_ids(pipe.tokenizer, prompts).to(pipe.text_encoder.device)
    pooled = pipe.text_encoder(ids).pooler_output.float()
    norms = pooled.norm(dim=-1)
    ratios = torch.cdist(pooled, pooled) / torch.maximum(norms[:, None], norms[None, :])
    ratios.fill_diagonal_(float("inf"))
    return float(ratios.min())


def judge_images(judge: ImageClassifierJudge, images: Sequence | torch.Tensor) -> tuple[list[str], list[str]]:
    """The shapes judge's `(shapes, colours)` for images (PIL images, or a (B, 3, H, W) tensor in [0, 1]).

    The shape is the most probable shape after summing the class probabilities over colours, and the
    colour likewise.
    """
    if isinstance(images, torch.Tensor):
        images = [_to_pil(image) for image in images]
    probabilities = judge(list(images))
    colour_names = list(COLOURS)
    shapes = torch.stack([concept_probability(probabilities, judge.labels, s) for s in SHAPES], dim=1).argmax(1)
    colours = torch.stack([concept_probability(probabilities, judge.labels, c) for c in colour_names], dim=1).argmax(1)
    return [SHAPES[i] for i in shapes.tolist()], [colour_names[i] for i in colours.tolist()]


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
