"""How much an edit moves the conditioning a pipeline gives its UNet: the specificity measure of `EMCIDConfig`'s
statistics and stage-2 options, without drawing images."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline

from ..edits import ConceptEdits
from ..families import pipeline_family


@torch.no_grad()
def pipeline_conditioning(pipe: DiffusionPipeline, prompts: Sequence[str]) -> torch.Tensor:
    """What the pipeline's own `encode_prompt` gives its UNet for `prompts`: (B, 77, D), every position included."""
    return pipeline_family(pipe).prompt_embeds(pipe, list(prompts))


def conditioning_change(pipe: DiffusionPipeline, edits: ConceptEdits, prompts: Sequence[str]) -> list[float]:
    """Per prompt, `||c_after - c_before|| / ||c_before||` of its 77-position conditioning, with `edits` applied for
    the "after" and removed again (also on errors)."""
    before = pipeline_conditioning(pipe, prompts)
    edits.apply(pipe, name="emcid-drift")
    try:
        after = pipeline_conditioning(pipe, prompts)
    finally:
        edits.remove(pipe, name="emcid-drift")
    return [float((a - b).norm() / b.norm()) for a, b in zip(after, before)]
