"""What the UNet is conditioned on during stage 1: each text encoder's hidden states for tokenised prompts (with the
stage-1 vector added, or the layers up to it skipped), SD-XL's added conditioning, and the masks that hide the
padding that batching prompts of different lengths adds."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import Stage1Padding
from .encoders import EditedEncoder
from .hooks import captured_outputs, layers_skipped_to, residual_addition
from .tokens import TokenizedPrompts, tokenize, tokenize_as_pipeline


def padded_cat(tensors: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Concatenates (B_i, T_i, ...) tensors along dim 0, padding dim 1 at the end to the longest T_i with `value`."""
    length = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
        padded.append(F.pad(t, pad, value=value))
    return torch.cat(padded)


def length_mask(lengths: Sequence[int], rows: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """(sum(rows), max(lengths)) mask of the first `lengths[i]` columns for the `rows[i]` rows of group i;
    `None` when it masks nothing. It hides the padding that batching added from the UNet's cross-attention."""
    if len(set(lengths)) == 1:
        return None
    length = torch.tensor(lengths, device=device).repeat_interleave(torch.tensor(rows, device=device))
    return (torch.arange(max(lengths), device=device)[None] < length[:, None]).long()


@dataclass
class Conditioning:
    """What the UNet is given for the prompts of one concept, and the pooled outputs of the text-alignment term.

    Attributes:
        hidden: (P, T, D) encoder hidden states (both encoders' concatenated for SD-XL).
        pooled: per encoder, (P, d_e) pooled outputs (SD-XL's second encoder: its projected `text_embeds`).
    """

    hidden: torch.Tensor
    pooled: list[torch.Tensor]


def encode_prompts(
    encoders: list[EditedEncoder],
    batches: list[TokenizedPrompts],
    states: list[torch.Tensor] | None = None,
    deltas: list[torch.Tensor] | None = None,
    positions: list[torch.Tensor] | None = None,
) -> Conditioning:
    """Runs every text encoder on its tokens.

    With `states` (each encoder's z-layer output for these tokens, (B, T, d), delta already added) only the layers
    after the z layer run; with `deltas` ((B, d) per encoder, added at `positions`), the full encoder runs with the
    delta added by a hook; with neither, the plain encoder runs.
    """
    hidden, pooled = [], []
    for index, (encoder, batch) in enumerate(zip(encoders, batches)):
        layout = encoder.layout
        conditioning_layer = layout.num_layers - (2 if encoder.conditioning == "penultimate" else 1)
        with contextlib.ExitStack() as stack:
            if states is not None:
                stack.enter_context(layers_skipped_to(layout, encoder.z_layer, states[index]))
            elif deltas is not None:
                stack.enter_context(residual_addition(layout.layers[encoder.z_layer], positions[index], deltas[index]))
            captured = {}
            if encoder.conditioning == "penultimate" and not (
                states is not None and encoder.z_layer == conditioning_layer
            ):
                captured = stack.enter_context(captured_outputs({"hidden": layout.layers[conditioning_layer]}))
            output = layout.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        if encoder.conditioning == "last":
            hidden.append(output.last_hidden_state)
        else:
            hidden.append(captured["hidden"] if captured else states[index])
        pooler = getattr(output, "pooler_output", None)
        pooled.append(pooler if pooler is not None else output.text_embeds)
    return Conditioning(torch.cat(hidden, dim=-1), pooled)


def unet_inputs(
    conditioning: Conditioning, mask: torch.Tensor | None, time_ids: torch.Tensor | None
) -> dict[str, object]:
    """The UNet's keyword arguments: the hidden states, the cross-attention `mask` of `length_mask`, and
    SD-XL's added conditioning when `time_ids` (1, 6) is given."""
    added = None
    if time_ids is not None:
        added = {"text_embeds": conditioning.pooled[-1], "time_ids": time_ids.expand(conditioning.hidden.shape[0], -1)}
    return {"encoder_hidden_states": conditioning.hidden, "added_cond_kwargs": added, "encoder_attention_mask": mask}


def tokenize_alike(
    encoders: list[EditedEncoder], prompts: list[str], padding: Stage1Padding = "longest"
) -> list[TokenizedPrompts]:
    """Each encoder's tokens of `prompts`, padded to one common length (their hidden states are concatenated).

    With `padding="pipeline"` every prompt is padded to the tokenizer's maximum length and the attention mask
    covers every position, as the pipeline encodes prompts; with `"longest"` the prompts are padded to the longest
    and the padding is masked."""
    if padding == "pipeline":
        batches = [tokenize_as_pipeline(encoder.tokenizer, prompts) for encoder in encoders]
        batches = [TokenizedPrompts(b.input_ids, torch.ones_like(b.attention_mask)) for b in batches]
    else:
        batches = [tokenize(encoder.tokenizer, prompts) for encoder in encoders]
    length = max(batch.input_ids.shape[1] for batch in batches)
    padded = []
    for encoder, batch in zip(encoders, batches):
        extra = length - batch.input_ids.shape[1]
        padded.append(
            TokenizedPrompts(
                F.pad(batch.input_ids, (0, extra), value=pad_id(encoder)), F.pad(batch.attention_mask, (0, extra))
            )
        )
    return padded


def pad_id(encoder: EditedEncoder) -> int:
    tokenizer = encoder.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
