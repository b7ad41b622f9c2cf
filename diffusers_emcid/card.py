"""The model card (README.md) of a concept-edit folder or Hub repo."""

from __future__ import annotations

import html
import logging
from pathlib import PurePath

from huggingface_hub import ModelCard, ModelCardData

from .requests import ConceptEdit

logger = logging.getLogger(__name__)

LICENSE_FIELDS = ("license", "license_name", "license_link")
"""The card fields of a license (`license_name` and `license_link` go with `license: other`)."""

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


def base_model_license(repo_id: str | None, token: str | None = None) -> dict[str, str]:
    """The `LICENSE_FIELDS` of a Hub model's own card (read from the Hub, or the local Hugging Face cache when
    offline); empty when unknown: no id, no card, no license, or the card cannot be reached."""
    if repo_id is None:
        return {}
    try:
        data = ModelCard.load(repo_id, token=token, ignore_metadata_errors=True).data
    except (OSError, ValueError) as error:  # not found, gated, offline, unreadable
        logger.debug("No license of %s for the model card: %s", repo_id, error)
        return {}
    return {key: value for key in LICENSE_FIELDS if isinstance(value := getattr(data, key, None), str)}


def _ui_sections(kohya_file: str | None) -> str:
    """The card's ComfyUI and AUTOMATIC1111/Forge sections: with the kohya-format file `kohya_file` next to the card,
    or with how to write one."""
    if kohya_file:
        comfy_file = f"`{kohya_file}` (or `pytorch_lora_weights.safetensors`)"
        kohya = f"Put `{kohya_file}` (the same factors under kohya's key names)"
        name = PurePath(kohya_file).stem
    else:
        comfy_file, name = "`pytorch_lora_weights.safetensors`", "my-edits"
        kohya = (
            "Write the edits as a kohya-format file, `emcid export <this folder> my-edits.safetensors` (or\n"
            '`edits.export_kohya("my-edits.safetensors")` in Python), and put it'
        )
    return f"""## Use in ComfyUI

Put {comfy_file} into `ComfyUI/models/loras` and add a **Load LoRA** node between the checkpoint
loader and the CLIP Text Encode nodes, with its `clip` input and output connected: the edits change only the text
encoder, so `strength_clip` sets their strength, `strength_model` does nothing, and a model-only LoRA loader applies
nothing.

## Use in AUTOMATIC1111 and Forge

{kohya} into `models/Lora` and add `<lora:{name}:1>` to the prompt (the number is the strength).
"""


def render_model_card(
    requests: list[ConceptEdit],
    base_model: str | None,
    layers: dict[str, list[int]],
    base_license: dict[str, str] | None = None,
    kohya_file: str | None = None,
) -> str:
    """README.md text with YAML metadata, the list of edited concepts and how each UI loads them.

    Concept names only ever appear escaped in the markdown body, never in the YAML header, so no
    name can alter the card's metadata.

    Args:
        requests: the edited concepts.
        base_model: the Hub id of the base model, or None; never a local path (the Hub rejects one).
        layers: component -> its edited layers.
        base_license: the base model's `LICENSE_FIELDS` (`base_model_license`), which the edits inherit.
        kohya_file: the name of the kohya-format file next to the card, if there is one.
    """
    data = ModelCardData(
        base_model=base_model or None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["emcid", "concept-editing", "lora", "text-to-image", "diffusers"],
        **(base_license or {}),
        **({"base_model_relation": "adapter"} if base_model else {}),
    )
    rows = "\n".join(
        f"| {index} | {_cell(request.source)} | {_cell(request.destination)} |"
        for index, request in enumerate(requests[:MAX_LISTED_CONCEPTS], start=1)
    )
    unlisted = len(requests) - MAX_LISTED_CONCEPTS
    more = f"\n\n... and {unlisted} more (see emcid_manifest.json)." if unlisted > 0 else ""
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

{_ui_sections(kohya_file)}
The file `pytorch_lora_weights.safetensors` uses diffusers' LoRA key names; `emcid_manifest.json` lists the
concepts, prompt templates, seeds and settings, and `emcid_vectors.safetensors` holds the stage-1 vectors
from which the concepts can be combined or removed without re-running stage 1.

## Citation

```bibtex
{CITATION}
```
"""
