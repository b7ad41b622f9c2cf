"""The model card (README.md) of a concept-edit folder or Hub repo."""

from __future__ import annotations

import html

from huggingface_hub import ModelCardData

from .requests import ConceptEdit

CITATION = """@inproceedings{xiong2024emcid,
  title     = {Editing Massive Concepts in Text-to-Image Diffusion Models},
  author    = {Xiong, Tianwei and Wu, Yue and Xie, Enze and Wu, Yue and Li, Zhenguo and Liu, Xihui},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024},
  note      = {arXiv:2403.13807}
}"""

MAX_LISTED_CONCEPTS = 1000


def _cell(text: str) -> str:
    """A concept name made inert in a markdown table cell: HTML-escaped, pipes and line breaks neutralised."""
    escaped = html.escape(text, quote=False).replace("|", "&#124;").replace("`", "&#96;")
    return " ".join(escaped.split()) if escaped.strip() else "<i>(blank)</i>"


def render_model_card(requests: list[ConceptEdit], base_model: str | None, layers: dict[str, list[int]]) -> str:
    """README.md text with YAML metadata (base model, library, tags) and the list of edited concepts.

    Concept names only ever appear escaped in the markdown body, never in the YAML header, so no
    name can alter the card's metadata.
    """
    data = ModelCardData(
        base_model=base_model or None,
        library_name="diffusers",
        tags=["emcid", "concept-editing", "lora", "text-to-image", "diffusers"],
    )
    rows = "\n".join(
        f"| {index} | {_cell(request.source)} | {_cell(request.destination)} |"
        for index, request in enumerate(requests[:MAX_LISTED_CONCEPTS], start=1)
    )
    more = f"\n\n... and {len(requests) - MAX_LISTED_CONCEPTS} more (see emcid_manifest.json)." if len(requests) > MAX_LISTED_CONCEPTS else ""
    layer_text = "; ".join(f"{component}: layers {values}" for component, values in layers.items())
    base = _cell(base_model) if base_model else "the base model it was made on"
    return f"""---
{data.to_yaml()}
---

# Concept edits (EMCID)

This repository holds {len(requests)} concept edit(s) of {base}, made with
[diffusers-emcid](https://pypi.org/project/diffusers-emcid/), an implementation of EMCID (Xiong et al.,
ECCV 2024). The edits are a LoRA adapter on the text encoder's MLP `fc2` layers ({layer_text}): prompts
with a source concept are understood as its destination. Nothing else of the model changes.

| # | source | destination |
|---|--------|-------------|
{rows}{more}

## Use with diffusers-emcid

```python
import diffusers_emcid  # adds the concept-edit methods to the pipelines
pipe.load_concept_edits("<this repo or folder>", adapter_name="edits")
pipe.set_concept_edits(["edits"], strengths=[1.0])
pipe.disable_concept_edits()  # and enable_concept_edits(), fuse_concept_edits(), unload_concept_edits()
```

## Use with plain diffusers

```python
pipe.load_lora_weights("<this repo or folder>", adapter_name="edits")
```

The file `pytorch_lora_weights.safetensors` uses diffusers' LoRA key names; `emcid_manifest.json` lists the
concepts, prompt templates, seeds and settings, and `emcid_vectors.safetensors` holds the stage-1 vectors
from which the concepts can be combined or removed without re-running stage 1.

## Citation

```bibtex
{CITATION}
```
"""
